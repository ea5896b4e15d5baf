"""The HvError tree.

Library code raises these; only the CLI turns them into a one-line message and an
exit status.  Wrap, don't swallow: ``raise QMPError(...) from exc``.

    HvError
     +-- UsageError          bad input from the user (sizes, names, targets)
     +-- ConfigError         a configuration file that does not validate
     +-- HostError           the host cannot do what hv needs (sysfs, swap, /proc)
     |    +-- NativeError    a C call failed; carries errno
     +-- VMError             something about one VM
     |    +-- VMNotFound     no such VM / socket
     |    +-- QMPError       QMP connect failed or a command returned an error
     |    |    +-- QMPBusy   another client (e.g. `hv run`) holds the VM's QMP socket
     |    +-- LibvirtError   libvirtd unreachable, refused, or an operation failed
     |    +-- VMGone         the VM died (before or during an operation)
     |    +-- LaunchError    QEMU failed to start; carries command and output
     +-- AdmissionError      admission control refused a VM
     +-- StateFileError      a page-state file is truncated, foreign or corrupt
"""

from __future__ import annotations

import errno as _errno
import os


class HvError(Exception):
    """Root of every error hv raises on purpose."""

    exit_code = 1


class UsageError(HvError):
    """Bad input from the user."""

    exit_code = 2


class ConfigError(HvError):
    """A configuration that does not validate."""

    exit_code = 2


class HostError(HvError):
    """The host cannot do something hv needs."""


class NativeError(HostError):
    """A call into the C extension failed; ``errno`` says why."""

    def __init__(self, what: str, err: int) -> None:
        self.what = what
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{what}: {os.strerror(err)} ({name})")


class VMError(HvError):
    """Something about one VM."""

    def __init__(self, vm: str, message: str) -> None:
        self.vm = vm
        super().__init__(f"{vm}: {message}")


class VMNotFound(VMError):
    """No VM by that name, or its QMP socket does not exist."""


class QMPError(VMError):
    """QMP refused a connection or a command returned an error."""


class QMPBusy(QMPError):
    """The QMP socket accepted the connection but never greeted: another client holds it."""


class LibvirtError(VMError):
    """libvirtd cannot be reached, refused hv, or failed an operation on a domain.

    ``code`` is libvirt's ``virErrorNumber`` when libvirt gave one.
    """

    def __init__(self, vm: str, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(vm, message)


class VMGone(VMError):
    """The VM exited (before or in the middle of an operation)."""


class LaunchError(VMError):
    """QEMU failed to start."""

    def __init__(self, vm: str, message: str, command: list[str], output: str) -> None:
        self.command = command
        self.output = output
        super().__init__(vm, message)


class AdmissionError(HvError):
    """Admission control refused a VM."""


class StateFileError(HvError):
    """A page-state file is truncated, from another VM, or otherwise unusable."""
