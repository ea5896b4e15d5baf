"""Host swap for an experiment: made up to what it needs, removed after.

    with host_swap(need_bytes, workdir, progress) as created_mib:
        ...   # at least need_bytes of host swap are free
    # the swap file it created (if any) is off and gone, error or ^C included

Experiments that page guests out (hypervisor swap) or start an ``hv run`` (whose
admission reserves every VM's max - min in swap) need it; the machines have none
configured by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from hv.bench.fleet import Progress
from hv.errors import HvError
from hv.host import swap
from hv.units import MiB

__all__ = ["host_swap"]

MARGIN_BYTES = 64 * MiB  # what swap files lose to their header and rounding, and then some


@contextlib.contextmanager
def host_swap(need_bytes: int, where: Path, progress: Progress) -> Iterator[int]:
    """At least ``need_bytes`` of free host swap: a swap file under ``where`` makes up
    what is missing; yields the MiB created (0 when the host had enough).  A removal
    that fails is said, not raised (``hv swap remove`` later)."""
    _, free = swap.totals()
    if free >= need_bytes:
        yield 0
        return
    size = need_bytes - free + MARGIN_BYTES
    path = swap.create(size, where / "swapfile")
    progress(f"host swap: created {size // MiB} MiB at {path} (removed at the end)")
    try:
        yield size // MiB
    finally:
        try:
            swap.remove(path)
            progress(f"host swap: removed {path}")
        except HvError as exc:
            progress(f"could not remove {path}: {exc} (`hv swap remove` later)")
