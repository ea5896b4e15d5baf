"""Proportional shares with an idle memory tax, and min-funding revocation.

The paper (section 5.2) charges a VM more for an idle page than for an active one.
With tax rate ``tau`` the idle-page cost is ``k = 1 / (1 - tau)`` and a VM holding
``P`` pages of which a fraction ``f`` is active pays ``P * (f + k * (1 - f))``; its
adjusted shares-per-page ratio is

    rho = S / (P * (f + k * (1 - f)))

Min-funding revocation takes memory from the VM that pays least per page (lowest
``rho``) until the VMs fit, never taking a VM below its ``min`` and never giving one
more than its ``max``.

How the cost moves with the allocation.  ``f`` is measured at the VM's *current*
allocation ``P0``, so the paper's ratio is exact there; moving the allocation on
paper needs a rule for the pages taken or added:

- below ``P0``, idle pages go first (the balloon lets the guest give up what it does
  not use), so the ``A = f * P0`` active pages stay active and each idle page taken
  saves ``k``; once only active pages remain, each page taken saves 1;
- above ``P0``, new pages are assumed to be used like the current ones, each
  costing ``c = f + k * (1 - f)`` (a starved VM, ``f = 1``, pays 1 per page for the
  memory it is short of and so ramps up fast; an idle one pays nearly ``k``).

So the cost of holding ``P`` pages is piecewise linear and increasing::

    cost(P) = P                          if P <= A
            = A + k * (P - A)            if A < P <= P0
            = P0 * c + c * (P - P0)      if P > P0

and ``rho(P) = S / cost(P)``, which at ``P = P0`` is exactly the paper's formula.
(Holding ``f`` itself fixed instead would treat a half-active VM squeezed to a third
of its memory as still half idle, and take active pages from it.)

Targets come from the closed form of revocation ("water filling"): every VM is
given the allocation at which its ratio equals one common level ``lambda``, clamped
to ``[min, max]``, with ``lambda`` chosen so the targets add up to the memory
available.  Taking one page at a time from the lowest-ratio VM, starting from every
VM at its ``max``, reaches the same allocation (to within a page per VM); the unit
tests keep that iterative reference and compare.

Sizes here are bytes at the interface and 4 KiB pages inside.  No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hv.units import PAGE_SIZE

__all__ = [
    "DEFAULT_TAX_RATE",
    "VMDemand",
    "idle_cost_factor",
    "shares_per_page",
    "pick_victim",
    "compute_targets",
]

# The paper's default idle memory tax: most idle memory can be reclaimed while a
# buffer is left against a quickly growing working set (section 5.2).
DEFAULT_TAX_RATE = 0.75


@dataclass(frozen=True)
class VMDemand:
    """What revocation needs to know about one VM.

    ``allocated_bytes`` is the host memory the VM holds now; ``active_fraction`` is
    the fraction of that allocation it is actively using (the working-set
    estimator's output, 0..1).
    """

    name: str
    shares: int
    min_bytes: int
    max_bytes: int
    allocated_bytes: int
    active_fraction: float

    def __post_init__(self) -> None:
        if self.shares <= 0:
            raise ValueError(f"{self.name}: shares must be positive, not {self.shares}")
        if not 0 <= self.min_bytes <= self.max_bytes:
            raise ValueError(
                f"{self.name}: need 0 <= min <= max, got {self.min_bytes} and {self.max_bytes}"
            )
        if self.allocated_bytes < 0:
            raise ValueError(f"{self.name}: negative allocation {self.allocated_bytes}")
        if not 0.0 <= self.active_fraction <= 1.0:
            raise ValueError(
                f"{self.name}: active fraction {self.active_fraction} is outside 0..1"
            )

    @property
    def active_pages(self) -> float:
        """Pages actively used now: ``f`` times the current allocation."""
        return self.active_fraction * (self.allocated_bytes / PAGE_SIZE)


def idle_cost_factor(tax_rate: float) -> float:
    """``k = 1 / (1 - tax_rate)``: what an idle page costs relative to an active one."""
    if not 0.0 <= tax_rate < 1.0:
        raise ValueError(f"tax rate {tax_rate} is outside 0 <= tax < 1")
    return 1.0 / (1.0 - tax_rate)


@dataclass(frozen=True)
class _CostCurve:
    """``cost(P)`` of one VM (see the module docstring), in pages."""

    active: float  # A = f * P0: pages in active use now
    current: float  # P0: pages held now
    k: float  # cost of an idle page below P0
    mix: float  # c = f + k (1 - f): cost of a page added above P0

    @classmethod
    def of(cls, vm: VMDemand, k: float) -> _CostCurve:
        f = vm.active_fraction
        return cls(vm.active_pages, vm.allocated_bytes / PAGE_SIZE, k, f + k * (1.0 - f))

    def cost(self, pages: float) -> float:
        if pages <= self.active:
            return pages
        if pages <= self.current:
            return self.active + self.k * (pages - self.active)
        return self.active + self.k * (self.current - self.active) + self.mix * (
            pages - self.current
        )

    def pages_for(self, cost: float) -> float:
        """Inverse of :meth:`cost`."""
        if cost <= self.active:
            return cost
        at_current = self.cost(self.current)
        if cost <= at_current:
            return self.active + (cost - self.active) / self.k
        return self.current + (cost - at_current) / self.mix


def shares_per_page(
    shares: int, allocated_pages: float, active_fraction: float, tax_rate: float
) -> float:
    """The paper's adjusted ratio ``S / (P * (f + k * (1 - f)))``.

    A VM holding no pages pays nothing and so has an infinite ratio: it is never
    the one memory is revoked from.
    """
    k = idle_cost_factor(tax_rate)
    paid = allocated_pages * (active_fraction + k * (1.0 - active_fraction))
    return math.inf if paid <= 0 else shares / paid


def pick_victim(vms: Iterable[VMDemand], tax_rate: float = DEFAULT_TAX_RATE) -> VMDemand | None:
    """The VM to revoke memory from: lowest ratio at its current allocation.

    Only VMs above their ``min`` qualify (a min is guaranteed).  Ties go to the VM
    that holds more memory, then to the name, so the choice is deterministic.
    Returns ``None`` when no VM can give anything back.
    """
    candidates = [vm for vm in vms if vm.allocated_bytes > vm.min_bytes]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda vm: (
            shares_per_page(
                vm.shares, vm.allocated_bytes / PAGE_SIZE, vm.active_fraction, tax_rate
            ),
            -vm.allocated_bytes,
            vm.name,
        ),
    )


def compute_targets(
    vms: Sequence[VMDemand], available_bytes: int, tax_rate: float = DEFAULT_TAX_RATE
) -> dict[str, int]:
    """Target allocation (bytes, whole pages) per VM name, by min-funding revocation.

    Every target lies in ``[min, max]`` (rounded down to whole pages, but never
    below ``min``).  If every ``max`` fits, every VM gets its ``max``.  Otherwise the
    targets add up to at most ``available_bytes``, unless the ``min`` values alone
    exceed it: a min is a guarantee, so then every VM gets its ``min`` and the sum is
    over ``available_bytes`` (admission control exists to prevent this; the caller
    sees it by summing).
    """
    k = idle_cost_factor(tax_rate)
    names = [vm.name for vm in vms]
    if len(set(names)) != len(names):
        raise ValueError(f"VM names are not unique: {sorted(names)}")
    if not vms:
        return {}
    avail_pages = max(0, available_bytes) / PAGE_SIZE
    lo = [vm.min_bytes / PAGE_SIZE for vm in vms]
    hi = [vm.max_bytes / PAGE_SIZE for vm in vms]
    if sum(hi) <= avail_pages:
        return {vm.name: vm.max_bytes for vm in vms}
    if sum(lo) >= avail_pages:
        return {vm.name: vm.min_bytes for vm in vms}

    curves = [_CostCurve.of(vm, k) for vm in vms]

    def pages_at(level: float) -> list[float]:
        # ``level`` is cost per share (1 / lambda): each VM may hold the pages whose
        # cost is ``shares * level``, clamped to its [min, max].
        return [
            min(h, max(l, curve.pages_for(vm.shares * level)))
            for vm, l, h, curve in zip(vms, lo, hi, curves)
        ]

    # Each VM's pages_at() is linear in ``level`` between its breakpoints (where it
    # leaves min, where its cost curve bends at A and at P0, where it reaches max),
    # so the total is piecewise linear: find the segment holding ``avail_pages`` and
    # interpolate.  Exact, with no iteration count to tune.
    breakpoints = sorted(
        {
            curve.cost(p) / vm.shares
            for vm, l, h, curve in zip(vms, lo, hi, curves)
            for p in (l, min(max(curve.active, l), h), min(max(curve.current, l), h), h)
        }
    )
    totals = [sum(pages_at(b)) for b in breakpoints]
    # totals[0] is sum(min) and totals[-1] is sum(max), which bracket avail_pages.
    level = breakpoints[0]
    for b0, b1, t0, t1 in zip(breakpoints, breakpoints[1:], totals, totals[1:]):
        if t0 <= avail_pages <= t1:
            level = b0 if t1 == t0 else b0 + (avail_pages - t0) * (b1 - b0) / (t1 - t0)
            break

    targets: dict[str, int] = {}
    for vm, pages in zip(vms, pages_at(level)):
        target = math.floor(pages + 1e-9) * PAGE_SIZE
        targets[vm.name] = min(vm.max_bytes, max(vm.min_bytes, target))
    # Clamping to a min that is not page-aligned, or float rounding, could leave the
    # sum a little over; take that back page by page from the lowest ratio above min.
    excess = sum(targets.values()) - max(0, available_bytes)
    while excess > 0:
        above = [(vm, c) for vm, c in zip(vms, curves) if targets[vm.name] > vm.min_bytes]
        if not above:
            break
        victim, _ = min(
            above, key=lambda vc: vc[0].shares / vc[1].cost(targets[vc[0].name] / PAGE_SIZE)
        )
        give = min(excess, targets[victim.name] - victim.min_bytes, PAGE_SIZE)
        targets[victim.name] -= give
        excess -= give
    return targets
