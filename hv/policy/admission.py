"""Admission control (paper, section 6.2).

A VM may start only if hv can keep its promises to it and to every VM already
admitted:

- memory: its ``min`` plus its overhead fits in the managed memory not yet reserved
  (managed minus the ``min + overhead`` of every admitted VM);
- swap: its ``max - min`` fits in the swap space not yet reserved (the swap hv may
  use minus the ``max - min`` of every admitted VM), because that part of the VM may
  have to live in host swap when memory is overcommitted.

Overhead per VM (:func:`overhead_bytes`) is a constant plus a fraction of ``max``:

- 40 MiB: a q35 QEMU with a virtio-balloon device measured here holds 23 MiB of
  anonymous memory and 22 MiB of (mostly shared) library pages before the guest
  runs; the rest is headroom for TCG's translation cache and virtio queues, and it
  is of the order of the paper's typical 32 MB per VM.
- 1/64 of ``max`` (1.6 %): memory that grows with guest size: host page tables
  (8 bytes per 4 KiB page, 0.2 %), KVM's second-level tables and reverse maps (about
  as much again) and hv's own per-page state arrays (hash, flags, stable count:
  16 bytes per page, 0.4 %), with the rest as margin.

Refusals raise :class:`~hv.errors.AdmissionError` saying how much is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hv.errors import AdmissionError
from hv.units import MiB, format_size

__all__ = [
    "OVERHEAD_BASE_BYTES",
    "OVERHEAD_MAX_DIVISOR",
    "Reservation",
    "overhead_bytes",
    "reservation_for",
    "check_admission",
    "AdmissionControl",
]

# Per-VM constant overhead: measured QEMU footprint (23 MiB anon + 22 MiB libs) with
# headroom for TCG; see module doc.
OVERHEAD_BASE_BYTES = 40 * MiB

# Size-proportional overhead is max / 64: page tables, KVM maps and hv's per-page
# state come to about 0.8 % of guest memory; 1.6 % leaves margin (module doc).
OVERHEAD_MAX_DIVISOR = 64


def overhead_bytes(max_bytes: int) -> int:
    """Memory a VM costs the host beyond its guest RAM (see module doc)."""
    if max_bytes < 0:
        raise ValueError(f"negative max {max_bytes}")
    return OVERHEAD_BASE_BYTES + -(-max_bytes // OVERHEAD_MAX_DIVISOR)


@dataclass(frozen=True)
class Reservation:
    """What an admitted VM holds: memory (``min + overhead``) and swap (``max - min``)."""

    name: str
    memory_bytes: int
    swap_bytes: int


def reservation_for(name: str, min_bytes: int, max_bytes: int) -> Reservation:
    """The reservation a VM with these bounds needs."""
    if not 0 <= min_bytes <= max_bytes:
        raise ValueError(f"{name}: need 0 <= min <= max, got {min_bytes} and {max_bytes}")
    return Reservation(
        name=name,
        memory_bytes=min_bytes + overhead_bytes(max_bytes),
        swap_bytes=max_bytes - min_bytes,
    )


def check_admission(
    name: str,
    min_bytes: int,
    max_bytes: int,
    managed_bytes: int,
    swap_bytes: int,
    admitted: Iterable[Reservation],
) -> Reservation:
    """Admit a VM or raise :class:`AdmissionError`; return its reservation.

    ``swap_bytes`` is the swap space hv's VMs may use in total (the host's swap
    minus what other processes hold), not what is free right now: the swap the
    admitted VMs may use is accounted for by their reservations.
    """
    admitted = list(admitted)
    if any(r.name == name for r in admitted):
        raise AdmissionError(f"{name}: already admitted")
    want = reservation_for(name, min_bytes, max_bytes)
    unreserved_memory = managed_bytes - sum(r.memory_bytes for r in admitted)
    unreserved_swap = swap_bytes - sum(r.swap_bytes for r in admitted)
    missing: list[str] = []
    if want.memory_bytes > unreserved_memory:
        missing.append(
            f"needs {format_size(want.memory_bytes - max(0, unreserved_memory))} more memory "
            f"(min {format_size(min_bytes)} + overhead "
            f"{format_size(want.memory_bytes - min_bytes)}, "
            f"{format_size(max(0, unreserved_memory))} unreserved)"
        )
    if want.swap_bytes > unreserved_swap:
        missing.append(
            f"needs {format_size(want.swap_bytes - max(0, unreserved_swap))} more swap "
            f"(max - min = {format_size(want.swap_bytes)}, "
            f"{format_size(max(0, unreserved_swap))} unreserved)"
        )
    if missing:
        raise AdmissionError(f"{name}: refused: " + "; ".join(missing))
    return want


class AdmissionControl:
    """The set of admitted VMs and what they reserve, for one host."""

    def __init__(self, managed_bytes: int, swap_bytes: int) -> None:
        if managed_bytes <= 0 or swap_bytes < 0:
            raise ValueError(
                f"need managed > 0 and swap >= 0, got {managed_bytes} and {swap_bytes}"
            )
        self.managed_bytes = managed_bytes
        self.swap_bytes = swap_bytes
        self._admitted: dict[str, Reservation] = {}

    def admit(self, name: str, min_bytes: int, max_bytes: int) -> Reservation:
        """Reserve for ``name`` or raise :class:`AdmissionError` (nothing changes then)."""
        r = check_admission(
            name, min_bytes, max_bytes, self.managed_bytes, self.swap_bytes,
            self._admitted.values(),
        )
        self._admitted[name] = r
        return r

    def release(self, name: str) -> None:
        """Give back what ``name`` reserved (the VM stopped); unknown names are an error."""
        if name not in self._admitted:
            raise AdmissionError(f"{name}: not admitted")
        del self._admitted[name]

    @property
    def admitted(self) -> tuple[Reservation, ...]:
        """Current reservations, in admission order."""
        return tuple(self._admitted.values())

    @property
    def unreserved_memory_bytes(self) -> int:
        """Managed memory not reserved by any admitted VM."""
        return self.managed_bytes - sum(r.memory_bytes for r in self._admitted.values())

    @property
    def unreserved_swap_bytes(self) -> int:
        """Swap not reserved by any admitted VM."""
        return self.swap_bytes - sum(r.swap_bytes for r in self._admitted.values())
