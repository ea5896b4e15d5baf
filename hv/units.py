"""Sizes, parsed and printed in one place.

hv counts memory in bytes internally and in 4 KiB pages where the kernel does.
User input is a number with an optional binary suffix: ``512M``, ``1G``, ``4096K``,
``300MiB``, or a plain number of bytes.  Negative, empty and unknown-suffix sizes are
refused with a :class:`~hv.errors.UsageError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

from hv.errors import UsageError

PAGE_SIZE = 4096
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SUFFIX = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}

# The largest size hv accepts: what a C long (the kernel's and QEMU's sizes) holds.
MAX_SIZE_BYTES = 2**63 - 1
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``text`` ("512M", "1.5G", "4096") into bytes."""
    if text.strip().startswith("-"):
        raise UsageError(f"size {text!r} is negative")
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(
            f"cannot parse size {text!r}: use a number with an optional K, M, G or T suffix"
        )
    number, suffix = m.groups()
    if len(number) > 32:  # 10^32 bytes is far past any memory: refuse before computing
        raise UsageError(f"size {text.strip()[:40]!r}... has too many digits")
    value = Fraction(number) * _SUFFIX[suffix.lower()]  # exact: no float rounding or overflow
    if value.denominator != 1:
        raise UsageError(f"size {text!r} is not a whole number of bytes")
    if value > MAX_SIZE_BYTES:
        raise UsageError(f"size {text!r} is too large (at most {format_size(MAX_SIZE_BYTES)})")
    return int(value)


def format_size(nbytes: int | float) -> str:
    """Print bytes the way a person reads them: ``512.0M``, ``1.50G``.

    Any number prints, so a message about a bad value never fails itself: a
    non-finite one as ``nan`` or ``inf``, an int past a float's range as ``~2^N B``.
    """
    if isinstance(nbytes, float) and not math.isfinite(nbytes):
        return str(nbytes)
    sign = "-" if nbytes < 0 else ""
    try:
        n = abs(float(nbytes))
    except OverflowError:  # an int past a float: its order of magnitude
        return f"{sign}~2^{abs(int(nbytes)).bit_length() - 1}B"
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= unit:
            value = n / unit
            return f"{sign}{value:.2f}{suffix}" if value < 10 else f"{sign}{value:.1f}{suffix}"
    return f"{sign}{int(n)}B"


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Plain aligned columns, ``-`` for a missing value (every table hv prints)."""
    cells = [list(map(str, header))] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def mib(nbytes: int | float) -> float:
    """Bytes to MiB."""
    return nbytes / MiB


def pages(nbytes: int) -> int:
    """Bytes to whole 4 KiB pages (rounded down)."""
    return nbytes // PAGE_SIZE
