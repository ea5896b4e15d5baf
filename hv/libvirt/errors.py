"""libvirt's errors onto hv's tree (:mod:`hv.errors`), one line each.

    no such domain                      -> VMNotFound
    domain not running (shut off)       -> VMGone
    libvirtd not running / unreachable  -> LibvirtError ("is libvirtd running?")
    permission denied                   -> LibvirtError ("permission denied")
    anything else                       -> LibvirtError (libvirt's own first line)

The codes are libvirt's ``virErrorNumber`` (``include/libvirt/virterror.h``, part of
its stable ABI; ``tests/unit/test_libvirt_pure.py`` checks them against the binding).
"""

from __future__ import annotations

from hv.errors import HvError, LibvirtError, VMGone, VMNotFound

__all__ = ["VIR_ERR_NO_DOMAIN", "VIR_ERR_OPERATION_INVALID", "from_libvirt", "connect_error"]

VIR_ERR_NO_SUPPORT = 3
VIR_ERR_NO_CONNECT = 5
VIR_ERR_OPERATION_DENIED = 29
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_RPC = 39
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_AUTH_FAILED = 45
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_CONFIG_UNSUPPORTED = 67
VIR_ERR_AUTH_CANCELLED = 79
VIR_ERR_OPERATION_UNSUPPORTED = 84
VIR_ERR_ACCESS_DENIED = 88
VIR_ERR_AUTH_UNAVAILABLE = 94

_DENIED = frozenset({VIR_ERR_OPERATION_DENIED, VIR_ERR_AUTH_FAILED, VIR_ERR_AUTH_CANCELLED,
                     VIR_ERR_ACCESS_DENIED, VIR_ERR_AUTH_UNAVAILABLE})
_UNREACHABLE = frozenset({VIR_ERR_NO_CONNECT, VIR_ERR_SYSTEM_ERROR, VIR_ERR_RPC})
_UNSUPPORTED = frozenset({VIR_ERR_NO_SUPPORT, VIR_ERR_CONFIG_UNSUPPORTED,
                          VIR_ERR_OPERATION_UNSUPPORTED})


def _line(message: str | None) -> str:
    lines = [s.strip() for s in (message or "").splitlines() if s.strip()]
    return lines[0] if lines else "no message from libvirt"


def connect_error(vm: str, uri: str, code: int | None, message: str | None) -> HvError:
    """Why ``libvirt.open(uri)`` failed."""
    if code in _DENIED:
        return LibvirtError(vm, f"permission denied connecting to {uri}: {_line(message)}", code)
    return LibvirtError(vm, f"cannot connect to libvirt at {uri} (is libvirtd running?): "
                        f"{_line(message)}", code)


def from_libvirt(vm: str, what: str, code: int | None, message: str | None) -> HvError:
    """The HvError for libvirt error ``code`` raised while doing ``what`` to ``vm``."""
    line = _line(message)
    if code == VIR_ERR_NO_DOMAIN:
        return VMNotFound(vm, f"no such libvirt domain ({line})")
    if code == VIR_ERR_OPERATION_INVALID and "not running" in line:
        return VMGone(vm, "the domain is not running (shut off)")
    if code in _DENIED:
        return LibvirtError(vm, f"{what}: permission denied: {line}", code)
    if code in _UNREACHABLE:
        return LibvirtError(vm, f"{what}: lost libvirtd (is it running?): {line}", code)
    if code in _UNSUPPORTED:
        return LibvirtError(vm, f"{what}: not supported for this domain: {line}", code)
    return LibvirtError(vm, f"{what}: {line}", code)
