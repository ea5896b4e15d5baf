"""Checks on what QEMU answers, at the one place hv reads each answer.

A peer on a QMP socket is not necessarily QEMU, nor a QEMU hv knows.  Every field hv
takes from an answer goes through one of these, so a malformed answer becomes a
:class:`QMPError` naming the VM, the command and the field, never a ``ValueError``
three calls later.

    summary = record(name, "query-memory-size-summary", answer)
    ram = integer(name, "query-memory-size-summary", summary, "base-memory")
"""

from __future__ import annotations

from typing import Any

from hv.errors import QMPError

# A C long: the largest size or count QEMU's own int64 fields can hold.
INT64_MAX = 2**63 - 1

_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def malformed(name: str, command: str, what: str, value: Any) -> QMPError:
    """The error for an answer that is not what QEMU sends."""
    shown = "missing" if value is _MISSING else f"{_show(value)}"
    return QMPError(name, f"{command}: malformed answer: {what} is {shown}")


def record(name: str, command: str, answer: Any) -> dict[str, Any]:
    """The answer as a JSON object."""
    if not isinstance(answer, dict):
        raise malformed(name, command, "the answer (expected an object)", answer)
    return answer


def listing(name: str, command: str, answer: Any) -> list[dict[str, Any]]:
    """The answer as a JSON array of objects."""
    if not isinstance(answer, list) or not all(isinstance(x, dict) for x in answer):
        raise malformed(name, command, "the answer (expected a list of objects)", answer)
    return answer


def text(name: str, command: str, answer: Any) -> str:
    """The answer as a string (HMP output)."""
    if not isinstance(answer, str):
        raise malformed(name, command, "the answer (expected text)", answer)
    return answer


def integer(name: str, command: str, obj: dict[str, Any], field: str, *, minimum: int = 0,
            maximum: int = INT64_MAX, default: Any = _MISSING) -> int:
    """``obj[field]`` as an integer in [minimum, maximum] (``default`` if absent and given)."""
    value = obj.get(field, _MISSING)
    if value is _MISSING and default is not _MISSING:
        return int(default)
    return scalar_int(name, command, value, f"field {field!r}", minimum=minimum, maximum=maximum)


def boolean(name: str, command: str, obj: dict[str, Any], field: str) -> bool:
    return scalar_bool(name, command, obj.get(field, _MISSING), f"field {field!r}")


def string(name: str, command: str, obj: dict[str, Any], field: str) -> str:
    value = obj.get(field, _MISSING)
    if not isinstance(value, str):
        raise malformed(name, command, f"field {field!r}", value)
    return value


def scalar_int(name: str, command: str, answer: Any, what: str, *, minimum: int = 0,
               maximum: int = INT64_MAX) -> int:
    """A bare integer answer (``qom-get`` of an integer property)."""
    if isinstance(answer, bool) or not isinstance(answer, int) or not minimum <= answer <= maximum:
        raise malformed(name, command, what, answer)
    return answer


def scalar_bool(name: str, command: str, answer: Any, what: str) -> bool:
    """A bare boolean answer (``qom-get`` of a boolean property)."""
    if not isinstance(answer, bool):
        raise malformed(name, command, what, answer)
    return answer


__all__ = ["record", "listing", "text", "integer", "boolean", "string", "scalar_int",
           "scalar_bool", "malformed", "INT64_MAX"]
