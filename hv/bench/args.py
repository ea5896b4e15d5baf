"""Argument checks the experiments share: bad input is one UsageError, before anything starts."""

from __future__ import annotations

from hv.errors import UsageError

__all__ = ["int_list"]


def int_list(flag: str, text: str, least: int = 1) -> tuple[int, ...]:
    """``"1,2,4"`` as numbers, each at least ``least``; ``flag`` names the option in errors."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise UsageError(f"{flag} takes numbers separated by commas, not {text!r}") from exc
    if min(values) < least:
        raise UsageError(f"{flag}: every number must be at least {least}")
    return values
