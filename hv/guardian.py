"""The guardian: undoes what a dead ``hv run`` left behind.

``hv run`` spawns ``python -m hv.guardian HV_PID GUARD_FILE`` in its own session.
The guardian waits on a pidfd of hv (no polling, no pid reuse race) and, when hv
is gone for whatever reason (SIGKILL included), reads the guard file the daemon
keeps up to date (:class:`GuardFile`: the VMs hv paused, whether it raised KSM's
rate, and a host tunable it has lowered for a moment: :mod:`hv.host.reclaim`) and
resumes every such VM and restores KSM's tunables and that one.  A daemon that
stops cleanly has already done all of it and removed the file, so the guardian then
has nothing to do.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hv import paths
from hv.errors import HostError, HvError
from hv.host.ksm import Ksm
from hv.host.reclaim import restore_sysctls

__all__ = ["GuardFile", "undo", "main"]

RESUME_TIMEOUT_S = 10.0  # a live QEMU answers "cont" in milliseconds


@dataclass
class GuardFile:
    """What a running daemon has changed that must not outlive it."""

    path: Path
    hv_pid: int = 0
    paused: dict[str, str] = field(default_factory=dict)  # VM name -> QMP socket
    ksm_raised: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)  # path -> value to put back

    @classmethod
    def load(cls, path: Path) -> GuardFile:
        try:
            data = json.loads(path.read_text())
            paused = {str(k): str(v) for k, v in dict(data.get("paused", {})).items()}
            sysctls = {str(k): str(v) for k, v in dict(data.get("sysctls", {})).items()}
            return cls(path, int(data.get("hv_pid", 0)), paused,
                       bool(data.get("ksm_raised", False)), sysctls)
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return cls(path)  # none, torn or garbled: nothing known to undo

    def save(self) -> None:
        """Write the record (HostError if it cannot: then hv must not change what it
        would record)."""
        try:
            paths.write_json_atomic(self.path, {"hv_pid": self.hv_pid, "paused": self.paused,
                                                "ksm_raised": self.ksm_raised,
                                                "sysctls": self.sysctls})
        except OSError as exc:
            raise HostError(f"cannot write the guard file {self.path}: "
                            f"{exc.strerror or exc}") from exc

    @property
    def empty(self) -> bool:
        return not self.paused and not self.ksm_raised and not self.sysctls

    def remember_sysctls(self, values: dict[str, str]) -> None:
        """Record host tunables to put back (``{}``: put back already), and save."""
        self.sysctls = dict(values)
        self.save()


async def _resume(name: str, sock: str) -> str:
    from hv.backends import handle_for  # libvirt's binding only when a domain needs it

    vm = handle_for(name, sock)
    try:
        await asyncio.wait_for(vm.attach(), RESUME_TIMEOUT_S)
        await asyncio.wait_for(vm.resume(), RESUME_TIMEOUT_S)
        return f"{name}: resumed"
    except (HvError, asyncio.TimeoutError) as exc:
        return f"{name}: cannot resume: {exc}"
    finally:
        await vm.detach()


def undo(path: Path) -> list[str]:
    """Resume, restore KSM and tunables as recorded in ``path``; remove it; say what was done."""
    guard = GuardFile.load(path)
    done: list[str] = []
    for name, sock in list(guard.paused.items()):
        line = asyncio.run(_resume(name, sock))
        done.append(line)
        if line.endswith(": resumed"):
            del guard.paused[name]
    if guard.ksm_raised:
        try:
            done.append("ksm: restored" if Ksm().restore() else "ksm: nothing to restore")
            guard.ksm_raised = False
        except FileNotFoundError:  # another undo (the next hv's, or a guardian's) did it
            done.append("ksm: restored already")
            guard.ksm_raised = False
        except (HvError, OSError) as exc:
            done.append(f"ksm: cannot restore: {exc}")
    if guard.sysctls:
        try:
            restore_sysctls(guard.sysctls)
            done.append("restored " + ", ".join(f"{p}={v}" for p, v in guard.sysctls.items()))
            guard.sysctls = {}
        except HvError as exc:
            done.append(f"cannot restore {', '.join(guard.sysctls)}: {exc}")
    if guard.empty:
        path.unlink(missing_ok=True)
    else:  # what could not be undone stays recorded for the next hv
        guard.save()
    return done


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hv.guardian HV_PID GUARD_FILE", file=sys.stderr)
        return 2
    pid, path = int(argv[0]), Path(argv[1])
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1  # already gone: undo at once
    if fd >= 0:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
        os.close(fd)
    guard = GuardFile.load(path)
    if guard.hv_pid not in (0, pid):
        return 0  # a newer hv owns the file now
    for line in undo(path):
        print(f"hv-guardian: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
