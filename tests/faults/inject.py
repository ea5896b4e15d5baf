"""Fault injectors for the fault suite: what a test does to QEMU, to hv and to the host.

Not a test module.  Everything here acts on real processes and the real host:

- :func:`shut_qmp_connection` shuts down the QMP connection QEMU accepted, from
  QEMU's side (its own socket, taken with ``pidfd_getfd``), as a monitor that
  drops its client would;
- :func:`wait_proc_file` waits until a process holds a given ``/proc`` file open
  (hv opens ``/proc/QEMU_PID/mem`` only while it scans that VM's pages: for sharing,
  or to pick the pages to page out), so a kill can land in the middle of that work;
- :class:`SwapFiller` fills host swap with its own pages (``MADV_PAGEOUT``);
- :func:`small_tmpfs` mounts a small tmpfs and always unmounts it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import REPO

SYS_PIDFD_GETFD = 438  # x86_64 <asm/unistd_64.h>
MADV_PAGEOUT = 21  # <asm-generic/mman-common.h> (Python 3.11's mmap lacks it)
_libc = ctypes.CDLL(None, use_errno=True)


def _connected_inodes(path: str) -> set[int]:
    """Inodes of the connected (accepted) unix sockets bound to ``path``."""
    out = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; St 03 = connected.
            if len(parts) >= 8 and parts[7] == path and parts[5] == "03":
                out.add(int(parts[6]))
    return out


def shut_qmp_connection(qemu_pid: int, sock_path: str) -> int:
    """Shut down every client connection QEMU holds on its QMP socket ``sock_path``
    (the path it was bound to); returns how many were shut."""
    inodes = _connected_inodes(sock_path)
    fds = []
    for fd in os.listdir(f"/proc/{qemu_pid}/fd"):
        try:
            link = os.readlink(f"/proc/{qemu_pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inodes:
            fds.append(int(fd))
    pidfd = os.pidfd_open(qemu_pid)
    try:
        for target in fds:
            mine = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
            if mine < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd of QEMU's fd {target}")
            with socket.socket(fileno=mine) as s:
                s.shutdown(socket.SHUT_RDWR)  # acts on QEMU's socket itself, not a copy
    finally:
        os.close(pidfd)
    return len(fds)


def holds_open(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open right now."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            continue
    return False


def wait_proc_file(pid: int, path: str, timeout_s: float) -> float:
    """Poll every millisecond (the window lasts tens of them) until ``pid`` holds
    ``path`` open; returns the monotonic time it was seen.  AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if holds_open(pid, path):
            return time.monotonic()
        os.kill(pid, 0)  # ProcessLookupError if the watched process died
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} did not open {path} within {timeout_s:.0f} s")


class SwapFiller:
    """A child process whose own pages fill host swap (written, then ``MADV_PAGEOUT``).

    The child exits with its parent; :meth:`close` ends it and frees its swap.
    """

    def __init__(self, size_bytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.inject", str(size_bytes)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise AssertionError(f"swap filler did not start: {line!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _fill_swap(size_bytes: int) -> None:
    """(In the child.)  Write ``size_bytes`` of distinct pages and page them out."""
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    buf = mmap.mmap(-1, size_bytes)
    for off in range(0, size_bytes, mmap.PAGESIZE):
        buf[off:off + 8] = (off + 1).to_bytes(8, "little")  # no two pages alike (no KSM)
    buf.madvise(MADV_PAGEOUT)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes or kills us


@contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount option syntax, e.g. ``2m``) on a fresh directory;
    unmounted and removed afterwards, whatever happened."""
    where = Path(tempfile.mkdtemp(prefix="hv-fault-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True, capture_output=True)
        where.rmdir()


def fill_fs(where: Path) -> Path:
    """Fill the file system holding ``where`` with one file; returns its path."""
    filler = where / "filler"
    with open(filler, "ab", buffering=0) as f:  # unbuffered: nothing left to flush
        for size in (1 << 20, 65536, 4096, 512, 1):  # big writes, then the last bytes
            try:
                while True:
                    f.write(b"\xff" * size)
            except OSError:
                pass
    return filler


if __name__ == "__main__":
    _fill_swap(int(sys.argv[1]))
