"""Real host memory pressure: lock anonymous memory until MemAvailable is a chosen level.

A forced state tests one action; only natural pressure tests hv's loop.  This module
makes it (for the tests, the soak and ``hv bench tax``): a separate process ``mmap``s anonymous memory and ``mlock``s it (locked
pages cannot be reclaimed or swapped, so the kernel drops its page cache and the
rest of the host must give memory back) in chunks, re-reading ``/proc/meminfo``
after each, until ``MemAvailable`` is the asked percentage of ``MemTotal``.

Levels are percentages of MemTotal, like hv's thresholds (high 6, soft 4, hard 2,
low 1).  The holder never locks a chunk that would take MemAvailable below
:data:`SAFETY_FLOOR_PCT`, and a watchdog thread unlocks chunks whenever something
else on the host pushes MemAvailable below it, so the host's OOM killer is never
the one to end the pressure.

The memory is held by a child process so that nothing the test does can leave it
locked: the child exits (and the kernel frees everything it locked) when its
parent dies (``PR_SET_PDEATHSIG``, a ``getppid`` check, and end of file on its
stdin), when told to, or when killed.

From Python::

    with MemoryLocker() as locker:
        level = locker.lock_until_available(3.0)   # MemAvailable ~3 % of MemTotal
        locker.set_level(1.5)                      # lock more
        locker.set_level(10)                       # unlock some
        locker.status().locked_bytes
    # released here, whatever happened

From a shell (scripts/demo.sh)::

    python -m hv.host.pressure --pct 3 --hold &   # until SIGTERM/SIGINT
    kill $!

or with the line protocol on stdin/stdout (one command per line, one reply each)::

    level PCT   ->  ok locked_bytes=N available_bytes=N total_bytes=N
    status      ->  ok locked_bytes=N available_bytes=N total_bytes=N
    release     ->  ok locked_bytes=0 ...
    quit        ->  ok ... (then exits)
    (anything that fails)  ->  error MESSAGE
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from hv.errors import HostError

MiB = 1024 * 1024

# Lock 64 MiB at a time, then re-read MemAvailable: small enough that one step
# never jumps far past the level (under 0.3 % of a 24 GiB host), big enough that
# reaching 3 % of 24 GiB takes ~350 steps (a few seconds).
CHUNK_BYTES = 64 * MiB

# Never lock below 0.5 % of MemTotal available (~120 MiB on 24 GiB): that is just
# above the kernel's own reserve (min_free_kbytes and the zone watermarks, ~70-100 MiB
# here), where reclaim stops keeping up and the OOM killer starts choosing.  hv's
# lowest state ("low", 1 %) is reachable with room to spare.
SAFETY_FLOOR_PCT = 0.5

# The watchdog checks MemAvailable this often: another process (a guest growing, a
# test elsewhere on the machine) can eat ~100 MiB in a fraction of a second.
WATCHDOG_INTERVAL_S = 0.1

# A reply from the holder takes one mlock of at most CHUNK_BYTES per step; locking
# most of 24 GiB takes a few seconds, so 120 s means the holder is stuck.
REPLY_TIMEOUT_S = 120.0

# Far from the goal, chunks are locked as transparent huge pages (MADV_HUGEPAGE):
# measured here, 4.2 GB/s against 1.25 GB/s in 4 KiB pages, so locking 20 GiB takes
# ~5 s instead of ~30 s.  Within 1 GiB of the goal, small pages: a huge-page fault
# on a nearly full host compacts memory synchronously and can stall.
HUGE_MARGIN_BYTES = 1024 * MiB

# A level is reached when MemAvailable is within 8 MiB of it: MemAvailable moves by a
# few MiB between two reads on a busy host, and chasing that would never settle.
TOLERANCE_BYTES = 8 * MiB

# At most this many lock/unlock steps per command: far more than any level needs
# (24 GiB / 64 MiB = 384), so hitting it means the host is fighting back; stop there.
MAX_STEPS = 4096

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PAGE = mmap.PAGESIZE


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def available_pct() -> float:
    """MemAvailable as a percentage of MemTotal, now."""
    m = meminfo()
    return 100.0 * m["MemAvailable"] / m["MemTotal"]


@dataclass(frozen=True)
class Level:
    """What the holder reported: bytes it holds locked, and the host as it saw it."""

    locked_bytes: int
    available_bytes: int
    total_bytes: int

    @property
    def available_pct(self) -> float:
        return 100.0 * self.available_bytes / self.total_bytes

    def __str__(self) -> str:
        return (f"locked {self.locked_bytes / MiB:.0f} MiB, available "
                f"{self.available_bytes / MiB:.0f} MiB ({self.available_pct:.2f} %)")


class LockerError(HostError):
    """The holder process failed, refused a command, or stopped answering."""


class MemoryLocker:
    """Owns one holder process; see the module doc.  Always use it as a context manager
    (or call :meth:`close` in a ``finally``)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, floor_pct: float = SAFETY_FLOOR_PCT) -> None:
        self.chunk_bytes = chunk_bytes
        self.floor_pct = floor_pct
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> MemoryLocker:
        repo = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hv.host.pressure", "--parent", str(os.getpid()),
             "--chunk-mib", str(self.chunk_bytes // MiB), "--floor-pct", str(self.floor_pct)],
            cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._expect_ok(self._read_line())  # "ok ..." once it is ready
        return self

    def __enter__(self) -> MemoryLocker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def set_level(self, pct: float) -> Level:
        """Lock or unlock until MemAvailable is ``pct`` % of MemTotal (never below the
        floor); returns where it got.  Raising the level unlocks, lowering it locks."""
        return self._command(f"level {pct}")

    def lock_until_available(self, pct: float) -> Level:
        """Lock more until MemAvailable is down to ``pct`` % of MemTotal."""
        return self.set_level(pct)

    def status(self) -> Level:
        return self._command("status")

    def release(self) -> Level:
        """Unlock everything (the holder keeps running)."""
        return self._command("release")

    def close(self, timeout_s: float = 30.0) -> None:
        """Release everything and end the holder; kills it if it does not answer."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                    proc.stdin.close()
                except OSError:
                    pass
                proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()  # the kernel frees whatever it locked
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()

    # -- protocol ----------------------------------------------------------------
    def _command(self, line: str) -> Level:
        if self.proc is None or self.proc.stdin is None:
            raise LockerError("the memory locker is not running")
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise LockerError(f"memory locker gone ({self.proc.poll()}): {exc}") from exc
        return self._expect_ok(self._read_line())

    def _read_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(REPLY_TIMEOUT_S)
        if not out:
            raise LockerError(f"memory locker did not answer in {REPLY_TIMEOUT_S:.0f} s")
        if not out[0]:
            raise LockerError(f"memory locker exited with {self.proc.wait(5)}")
        return out[0].strip()

    @staticmethod
    def _expect_ok(reply: str) -> Level:
        word, _, rest = reply.partition(" ")
        if word != "ok":
            raise LockerError(f"memory locker: {reply}")
        fields = dict(kv.split("=", 1) for kv in rest.split())
        return Level(int(fields["locked_bytes"]), int(fields["available_bytes"]),
                     int(fields["total_bytes"]))


# ---------------------------------------------------------------------------------
# The holder process.

class _Holder:
    """Chunks of locked anonymous memory (runs in the child)."""

    def __init__(self, chunk_bytes: int, floor_pct: float) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.chunk_bytes = max(PAGE, chunk_bytes // PAGE * PAGE)
        self.floor_pct = floor_pct
        self.chunks: list[tuple[int, int]] = []  # (address, bytes), locked
        self.lock = threading.Lock()
        self.total = meminfo()["MemTotal"]
        self.floor_bytes = int(self.total * floor_pct / 100)

    @property
    def locked_bytes(self) -> int:
        return sum(size for _, size in self.chunks)

    def report(self) -> str:
        return (f"ok locked_bytes={self.locked_bytes} available_bytes={meminfo()['MemAvailable']} "
                f"total_bytes={self.total}")

    def _lock_one(self, size: int, huge: bool) -> None:
        addr = self.libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {size} bytes: {os.strerror(ctypes.get_errno())}")
        if huge:  # a hint only: if it fails, small pages lock just as well
            self.libc.madvise(addr, size, mmap.MADV_HUGEPAGE)
        if self.libc.mlock(addr, size) != 0:  # faults every page in, then pins it
            err = ctypes.get_errno()
            self.libc.munmap(addr, size)
            raise OSError(err, f"mlock {size} bytes: {os.strerror(err)}")
        self.chunks.append((addr, size))

    def _unlock_bytes(self, size: int) -> None:
        """Unmap ``size`` bytes (page-rounded up) from the newest chunks."""
        size = -(-size // PAGE) * PAGE
        while size > 0 and self.chunks:
            addr, have = self.chunks.pop()
            if have > size:  # unmap the tail, keep the head
                self.libc.munmap(addr + have - size, size)
                self.chunks.append((addr, have - size))
                return
            self.libc.munmap(addr, have)
            size -= have

    def set_level(self, pct: float) -> None:
        goal = max(int(self.total * pct / 100), self.floor_bytes)
        with self.lock:
            for _ in range(MAX_STEPS):
                avail = meminfo()["MemAvailable"]
                if avail > goal + TOLERANCE_BYTES:
                    # Lock more, never past the goal: the last step is a partial chunk.
                    self._lock_one(min(self.chunk_bytes, (avail - goal) // PAGE * PAGE),
                                   huge=avail - goal > HUGE_MARGIN_BYTES)
                elif avail < goal - TOLERANCE_BYTES and self.chunks:
                    self._unlock_bytes(min(self.chunk_bytes, goal - avail))
                else:
                    return

    def release(self) -> None:
        with self.lock:
            self._unlock_bytes(self.locked_bytes)

    def watchdog(self) -> None:
        """Give memory back whenever MemAvailable is below the floor (see the module doc)."""
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            with self.lock:
                short = self.floor_bytes - meminfo()["MemAvailable"]
                if short > 0 and self.chunks:
                    self._unlock_bytes(short + self.chunk_bytes)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies (the kernel then frees everything locked)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def poll() -> None:  # a second guard, in case the parent was a thread that exited
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=poll, daemon=True).start()


def _serve(holder: _Holder, inp: IO[str], out: IO[str]) -> None:
    def reply(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    reply(holder.report())
    for line in inp:  # end of file: the parent is gone or done
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "level" and len(words) == 2:
                holder.set_level(float(words[1]))
            elif words[0] == "release":
                holder.release()
            elif words[0] == "quit":
                holder.release()
                reply(holder.report())
                return
            elif words[0] != "status":
                raise ValueError(f"unknown command {line.strip()!r}")
            reply(holder.report())
        except (OSError, ValueError) as exc:
            reply(f"error {exc}".replace("\n", " "))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hv.host.pressure",
                                 description="Lock host memory until MemAvailable is PCT %% of MemTotal.")
    ap.add_argument("--pct", type=float, help="level to reach at start")
    ap.add_argument("--hold", action="store_true",
                    help="ignore stdin; hold until SIGTERM/SIGINT (for shell scripts)")
    ap.add_argument("--parent", type=int, default=os.getppid(), help="exit when this pid is not our parent")
    ap.add_argument("--chunk-mib", type=int, default=CHUNK_BYTES // MiB)
    ap.add_argument("--floor-pct", type=float, default=SAFETY_FLOOR_PCT)
    args = ap.parse_args(argv)
    if args.floor_pct < SAFETY_FLOOR_PCT:
        ap.error(f"--floor-pct below {SAFETY_FLOOR_PCT} risks the host's OOM killer")
    _die_with_parent(args.parent)
    holder = _Holder(args.chunk_mib * MiB, args.floor_pct)
    threading.Thread(target=holder.watchdog, daemon=True).start()
    stop = threading.Event()
    if args.hold:  # otherwise a signal's default action ends us (the kernel frees it all)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
    try:
        if args.pct is not None:
            holder.set_level(args.pct)
        if args.hold:
            print(holder.report(), flush=True)
            while not stop.wait(1.0):
                pass
        else:
            _serve(holder, sys.stdin, sys.stdout)
    finally:
        holder.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
