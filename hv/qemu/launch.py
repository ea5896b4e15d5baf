"""Launching test guests and stopping them; the run directory as hv's VM registry.

Each VM hv knows has a folder ``RUN/NAME`` (see :mod:`hv.paths`).  For a guest hv
launched it holds QEMU's ``qmp.sock`` (mode 0600), ``qemu.pid``, ``console.log`` and
``meta.json`` (the command line).  For a VM hv did not start, ``hv attach`` makes the
folder with ``qmp.sock`` as a symlink to that VM's socket; nothing else differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hv import paths
from hv.errors import HvError, LaunchError, UsageError, VMError, VMGone, VMNotFound
from hv.host import proc
from hv.qemu.accel import QEMU
from hv.qemu.qmp import path_kind
from hv.qemu.vm import FLOOR_MIN_BYTES, VM
from hv.units import MiB, format_size

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
QUIT_WAIT_S = 5.0  # a QEMU told to quit exits in well under a second
KILL_WAIT_S = 5.0  # after SIGTERM, then SIGKILL
WORKLOADS = ("idle", "toucher", "hog", "filecache")
MIN_GUEST_BYTES = FLOOR_MIN_BYTES  # below the balloon floor a guest could never be ballooned


@dataclass
class GuestSpec:
    """What to launch."""

    name: str
    mem_bytes: int
    workload: str = "idle"
    params: dict[str, str] = field(default_factory=dict)  # hv.KEY=VALUE on the kernel command line
    cpus: int = 1
    accel: str = "tcg"
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    initrd: str | None = None  # default: the hv guest image (paths.guest_initrd)
    disk: str | None = None  # a root file system image, attached read-only (snapshot=on)
    extra_args: list[str] = field(default_factory=list)
    thp: bool = True  # False: no transparent huge pages for guest RAM (PR_SET_THP_DISABLE)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"bad VM name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name


def check_memory(mem_bytes: int) -> int:
    """A guest's memory size as QEMU takes it: whole MiB, and room for the balloon floor."""
    if mem_bytes < MIN_GUEST_BYTES or mem_bytes % MiB:
        raise UsageError(f"guest memory {format_size(mem_bytes)} must be a whole number of MiB, "
                         f"at least {format_size(MIN_GUEST_BYTES)}")
    return mem_bytes


def vm_dir(name: str) -> Path:
    return paths.run_dir() / check_name(name)


def socket_of(name_or_path: str) -> tuple[str, str]:
    """Resolve a VM argument (a name in the run directory, or a socket path) to (name, socket)."""
    if "/" in name_or_path:
        path = Path(name_or_path)
        kind = path_kind(path)
        if kind is None:
            raise VMNotFound(name_or_path, "no such QMP socket")
        if kind != "socket":
            raise VMError(name_or_path, f"is {kind}, not a QMP socket")
        name = path.parent.name if path.name == "qmp.sock" else path.stem
        return name, str(path)
    sock = vm_dir(name_or_path) / "qmp.sock"
    if not os.path.lexists(sock):
        raise VMNotFound(name_or_path, f"no VM by that name in {paths.run_dir()} "
                         "(see `hv status`, or pass the path of its QMP socket)")
    return name_or_path, str(sock)


def known_vms() -> list[tuple[str, str]]:
    """Every (name, socket) registered in the run directory, sorted by name."""
    root = paths.run_dir()
    if not root.is_dir():
        return []
    return [(d.name, str(d / "qmp.sock")) for d in sorted(root.iterdir())
            if os.path.lexists(d / "qmp.sock")]


def command_line(spec: GuestSpec, where: Path, kernel: Path, initrd: Path) -> list[str]:
    """The QEMU command line for a test guest."""
    mem_mib = spec.mem_bytes // MiB
    append = ["console=ttyS0", "panic=-1", f"hv.workload={spec.workload}"]
    append += [f"hv.{k}={v}" for k, v in spec.params.items()]
    balloon = (f"virtio-balloon-pci,id=balloon0,"
               f"deflate-on-oom={'on' if spec.deflate_on_oom else 'off'},"
               f"free-page-reporting={'on' if spec.free_page_reporting else 'off'}")
    return [
        # debug-threads names the vCPU threads ("CPU 0/TCG"), so hv finds their run-queue wait.
        QEMU, "-name", f"{spec.name},debug-threads=on", "-accel", spec.accel,
        "-cpu", "host" if spec.accel == "kvm" else "max",
        "-machine", "pc,memory-backend=ram0", "-smp", str(spec.cpus), "-m", f"{mem_mib}M",
        "-object", f"memory-backend-ram,id=ram0,size={mem_mib}M,merge=on",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", " ".join(append),
        "-device", balloon,
        *(["-drive", f"file={spec.disk},if=virtio,format=raw,snapshot=on"] if spec.disk else []),
        "-qmp", f"unix:{where / 'qmp.sock'},server=on,wait=off",
        "-serial", f"file:{where / 'console.log'}",
        "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
        "-daemonize", "-pidfile", str(where / "qemu.pid"),
        *spec.extra_args,
    ]


async def launch(spec: GuestSpec) -> VM:
    """Start a guest, wait for its QMP socket, enable balloon statistics; returns an attached VM.

    A launch that fails leaves nothing behind: no QEMU, no folder in the run directory.
    """
    check_name(spec.name)
    if not set(spec.workload.split(",")) <= set(WORKLOADS):  # the image runs "a,b" together
        raise UsageError(f"unknown workload {spec.workload!r}: choose from {', '.join(WORKLOADS)}")
    check_memory(spec.mem_bytes)
    initrd = Path(spec.initrd) if spec.initrd else paths.guest_initrd()
    for image in (initrd, *([Path(spec.disk)] if spec.disk else [])):
        if not image.exists():
            raise UsageError(f"{spec.name}: no guest image at {image}")
    where = vm_dir(spec.name)
    if os.path.lexists(where / "qmp.sock"):
        raise UsageError(f"a VM named {spec.name!r} is already registered in {where}")
    paths.private_dir(where)  # issue 9: and the run directory above it, 0700
    for stale in ("console.log", "qemu.pid"):
        (where / stale).unlink(missing_ok=True)
    try:
        return await _start(spec, where, initrd)
    except BaseException:
        await stop(spec.name)  # whatever QEMU got to: the process, the socket
        if where.is_dir():
            _remove_dir(where)
        raise


def _child_setup(thp: bool) -> None:
    """In the forked child, before QEMU runs: a private umask; THP off if asked."""
    os.umask(0o077)
    if not thp:
        proc.disable_thp()


async def _start(spec: GuestSpec, where: Path, initrd: Path) -> VM:
    cmd = command_line(spec, where, paths.guest_kernel(), initrd)
    (where / "meta.json").write_text(json.dumps({"spec": asdict(spec), "command": cmd}, indent=1))
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          preexec_fn=lambda: _child_setup(spec.thp))
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        first = output.splitlines()[-1] if output else f"exit status {done.returncode}"
        raise LaunchError(spec.name, f"QEMU failed to start: {first}", cmd, output)
    # QEMU's -daemonize sets umask 027 itself, so the socket is 0750: tighten it.
    os.chmod(where / "qmp.sock", 0o600)
    vm = VM(spec.name, str(where / "qmp.sock"))
    try:
        await vm.attach()
        await vm.enable_stats()
    except BaseException:
        await vm.detach()
        raise
    return vm


def _pid_of(name: str) -> int | None:
    try:
        return int((vm_dir(name) / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


async def stop(name: str) -> str:
    """Stop a guest hv launched: QMP ``quit``, then SIGTERM, then SIGKILL; always cleans up.

    For a VM hv only attached to, this just forgets it (the VM keeps running).
    Returns what was done.
    """
    where = vm_dir(name)
    sock = where / "qmp.sock"
    if sock.is_symlink():
        sock.unlink()
        _remove_dir(where)
        return "detached (hv did not start it; it keeps running)"
    pid = _pid_of(name)
    how = "already stopped"
    try:
        if os.path.exists(sock):
            vm = VM(name, str(sock))
            try:
                await asyncio.wait_for(vm.attach(), QUIT_WAIT_S)
                await vm.quit()
                how = "quit"
            except (HvError, asyncio.TimeoutError):
                pass
            finally:
                await vm.detach()
        if pid is not None and proc.alive(pid) and "qemu" in proc.exe_name(pid):
            if not _wait_exit(pid, QUIT_WAIT_S):
                os.kill(pid, signal.SIGTERM)
                how = "terminated"
                if not _wait_exit(pid, KILL_WAIT_S):
                    os.kill(pid, signal.SIGKILL)
                    how = "killed"
                    _wait_exit(pid, KILL_WAIT_S)
    finally:
        for leftover in ("qmp.sock", "qemu.pid"):
            (where / leftover).unlink(missing_ok=True)
    return how


def _remove_dir(where: Path) -> None:
    for child in where.iterdir():
        child.unlink()
    where.rmdir()


async def attach_external(name: str, socket_path: str) -> VM:
    """Register a VM hv did not start, by its QMP socket, and check it answers.

    A VM is its QEMU process: a socket already registered (by any path), or one that
    leads to a QEMU already registered, is refused.
    """
    _, sock = socket_of(socket_path if "/" in socket_path else f"./{socket_path}")
    target = Path(sock).resolve()
    where = vm_dir(name)
    if os.path.lexists(where / "qmp.sock"):
        raise UsageError(f"a VM named {name!r} is already registered in {where}")
    for other, other_sock in known_vms():
        with contextlib.suppress(OSError):
            if os.path.samefile(other_sock, target):
                raise UsageError(f"{socket_path} is already registered, as {other!r}")
    vm = VM(name, str(target))
    await vm.attach()  # refuse sockets that don't answer before registering anything
    try:
        twin = next((other for other, _ in known_vms() if registered_pid(other) == vm.info.pid), None)
        if twin is not None:
            raise UsageError(f"{socket_path} leads to QEMU pid {vm.info.pid}, already "
                             f"registered as {twin!r}")
        # -- issue 9: a socket hv is told to manage must be QEMU's (checked again at
        # every later connect: QMPSession.open).
        runs = proc.not_qemu(vm.info.pid)
        if runs is not None:
            raise UsageError(f"{socket_path} is served by process {vm.info.pid} ({runs}), "
                             "not QEMU: not attached")
        paths.private_dir(where)
        (where / "qmp.sock").symlink_to(target)
        (where / "meta.json").write_text(json.dumps({"attached": str(target), "pid": vm.info.pid}))
    except BaseException:
        await vm.detach()
        raise
    return vm


def registered_pid(name: str) -> int | None:
    """The QEMU pid hv recorded for a registered VM (launched or attached), if any."""
    pid = _pid_of(name)
    if pid is not None:
        return pid
    try:
        return int(json.loads((vm_dir(name) / "meta.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def console_log(name: str) -> Path:
    return vm_dir(name) / "console.log"


def describe(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


__all__ = ["GuestSpec", "launch", "check_memory", "stop", "attach_external", "known_vms", "socket_of",
           "console_log", "command_line", "check_name", "VMError", "VMGone"]
