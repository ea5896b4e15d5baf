"""Shares, the idle memory tax and min-funding revocation (hv.policy.shares)."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.policy.shares import (
    VMDemand,
    compute_targets,
    idle_cost_factor,
    pick_victim,
    shares_per_page,
)
from hv.units import PAGE_SIZE

P = PAGE_SIZE


def vm(name: str, shares: int = 1000, min_pages: int = 0, max_pages: int = 1000,
       alloc_pages: int | None = None, f: float = 1.0) -> VMDemand:
    return VMDemand(
        name=name, shares=shares, min_bytes=min_pages * P, max_bytes=max_pages * P,
        allocated_bytes=(max_pages if alloc_pages is None else alloc_pages) * P,
        active_fraction=f,
    )


def cost(v: VMDemand, pages: float, tax_rate: float) -> float:
    """The cost curve hv.policy.shares documents, written out independently.

    Below the current allocation idle pages go first (active pages stay), above it
    new pages are priced at the VM's current active/idle mix.
    """
    k = idle_cost_factor(tax_rate)
    f = v.active_fraction
    p0 = v.allocated_bytes / P
    a = f * p0
    if pages <= a:
        return pages
    if pages <= p0:
        return a + k * (pages - a)
    return p0 * (f + k * (1 - f)) + (f + k * (1 - f)) * (pages - p0)


def iterative_revocation(vms: list[VMDemand], available_bytes: int, tax_rate: float,
                         step_pages: int = 1) -> dict[str, int]:
    """Reference: start every VM at max, take a step from the lowest ratio until it fits."""
    pages = {v.name: v.max_bytes // P for v in vms}

    def ratio(v: VMDemand) -> float:
        c = cost(v, pages[v.name], tax_rate)
        return float("inf") if c <= 0 else v.shares / c

    heap = [(ratio(v), v.name) for v in vms if pages[v.name] > v.min_bytes // P]
    heapq.heapify(heap)
    by_name = {v.name: v for v in vms}
    total = sum(pages.values())
    avail = available_bytes // P
    while total > avail and heap:
        _, name = heapq.heappop(heap)
        v = by_name[name]
        take = min(step_pages, pages[name] - v.min_bytes // P, total - avail)
        pages[name] -= take
        total -= take
        if pages[name] > v.min_bytes // P:
            heapq.heappush(heap, (ratio(v), name))
    return {name: p * P for name, p in pages.items()}


# --- the paper's idle-tax case -------------------------------------------------


def test_no_tax_splits_evenly_between_idle_and_active() -> None:
    vms = [vm("idle", f=0.0), vm("busy", f=1.0)]
    t = compute_targets(vms, 1000 * P, tax_rate=0.0)
    assert t == {"idle": 500 * P, "busy": 500 * P}


def test_default_tax_gives_most_memory_to_the_active_vm() -> None:
    # k = 1 / (1 - 0.75) = 4: equal ratios need 4 idle pages' cost == 1 active
    # page's, so the active VM gets 4/5 of the memory: 800 pages against 200.
    vms = [vm("idle", f=0.0), vm("busy", f=1.0)]
    t = compute_targets(vms, 1000 * P, tax_rate=0.75)
    assert t["busy"] == pytest.approx(800 * P, abs=P)
    assert t["idle"] == pytest.approx(200 * P, abs=P)
    assert sum(t.values()) <= 1000 * P


def test_half_tax_gives_two_thirds() -> None:
    vms = [vm("idle", f=0.0), vm("busy", f=1.0)]
    t = compute_targets(vms, 999 * P, tax_rate=0.5)
    assert t["busy"] == pytest.approx(666 * P, abs=P)
    assert t["idle"] == pytest.approx(333 * P, abs=P)


def test_partly_active_vm_keeps_its_active_pages() -> None:
    # Both hold 500 pages; "half" uses 250 of them, "busy" all 500 and is short.
    # Squeezing "half" takes idle pages (cost 4 each), growing "busy" adds pages
    # at its active mix (cost 1 each).  Equal ratios:
    #   250 + 4 * (x - 250) = 500 + (500 - x)  ->  x = 350.
    vms = [vm("half", alloc_pages=500, f=0.5), vm("busy", alloc_pages=500, f=1.0)]
    t = compute_targets(vms, 1000 * P, tax_rate=0.75)
    assert t["half"] == pytest.approx(350 * P, abs=P)
    assert t["busy"] == pytest.approx(650 * P, abs=P)


def test_tax_rate_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        idle_cost_factor(1.0)
    with pytest.raises(ValueError):
        idle_cost_factor(-0.1)


# --- ratios and the victim -------------------------------------------------------


def test_shares_per_page_is_the_papers_formula() -> None:
    # S / (P * (f + k (1 - f))) with S=1000, P=100, f=0.5, k=4: 1000 / 250.
    assert shares_per_page(1000, 100, 0.5, 0.75) == pytest.approx(4.0)
    assert shares_per_page(1000, 100, 1.0, 0.75) == pytest.approx(10.0)
    assert shares_per_page(1000, 0, 0.5, 0.75) == float("inf")


def test_pick_victim_takes_the_lowest_ratio() -> None:
    a = vm("a", shares=1000, alloc_pages=500, f=1.0)   # 1000 / 500  = 2.0
    b = vm("b", shares=2000, alloc_pages=500, f=0.0)   # 2000 / 2000 = 1.0
    c = vm("c", shares=500, alloc_pages=100, f=0.5)    # 500 / 250   = 2.0
    assert pick_victim([a, b, c], tax_rate=0.75) == b
    # Without a tax, b pays only for 500 pages and has the highest ratio.
    assert pick_victim([a, b, c], tax_rate=0.0) in (a, c)
    assert pick_victim([a, b, c], tax_rate=0.0) == a  # tie broken by larger allocation


def test_pick_victim_skips_vms_at_their_min() -> None:
    low = vm("low", shares=1, min_pages=100, alloc_pages=100, f=0.0)
    other = vm("other", shares=1000, alloc_pages=100, f=1.0)
    assert pick_victim([low, other]) == other
    assert pick_victim([low]) is None
    assert pick_victim([]) is None


# --- targets -----------------------------------------------------------------------


def test_everything_fits_gives_every_vm_its_max() -> None:
    vms = [vm("a", max_pages=100), vm("b", max_pages=300)]
    assert compute_targets(vms, 10_000 * P) == {"a": 100 * P, "b": 300 * P}


def test_mins_are_kept_even_when_they_do_not_fit() -> None:
    vms = [vm("a", min_pages=600), vm("b", min_pages=600)]
    assert compute_targets(vms, 1000 * P) == {"a": 600 * P, "b": 600 * P}


def test_min_and_max_bound_the_targets() -> None:
    vms = [vm("idle", f=0.0, min_pages=300), vm("busy", f=1.0, max_pages=600)]
    t = compute_targets(vms, 1000 * P, tax_rate=0.75)
    assert t["idle"] >= 300 * P   # 200 unclamped, lifted to its min
    assert t["busy"] <= 600 * P
    assert sum(t.values()) <= 1000 * P


def test_more_shares_means_more_memory() -> None:
    vms = [vm("gold", shares=3000), vm("bronze", shares=1000)]
    t = compute_targets(vms, 1000 * P)
    assert t["gold"] == pytest.approx(750 * P, abs=P)
    assert t["bronze"] == pytest.approx(250 * P, abs=P)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError):
        compute_targets([vm("a"), vm("a")], 100 * P)


def test_empty_input() -> None:
    assert compute_targets([], 100 * P) == {}


def test_unaligned_min_is_kept_exactly() -> None:
    a = VMDemand("a", 1000, min_bytes=1000 * P + 123, max_bytes=2000 * P,
                 allocated_bytes=2000 * P, active_fraction=0.0)
    b = vm("b", max_pages=2000, f=1.0)
    t = compute_targets([a, b], 1500 * P)
    assert t["a"] == 1000 * P + 123
    assert sum(t.values()) <= 1500 * P


def test_bad_demands_are_refused() -> None:
    with pytest.raises(ValueError):
        vm("a", shares=0)
    with pytest.raises(ValueError):
        vm("a", min_pages=10, max_pages=5)
    with pytest.raises(ValueError):
        vm("a", f=1.5)


@pytest.mark.parametrize("tax", [0.0, 0.5, 0.75, 0.9])
def test_matches_iterative_revocation_on_a_mixed_host(tax: float) -> None:
    vms = [
        vm("db", shares=2000, min_pages=200, max_pages=2000, alloc_pages=1500, f=0.9),
        vm("web", shares=1000, min_pages=100, max_pages=1000, alloc_pages=1000, f=0.3),
        vm("batch", shares=500, min_pages=0, max_pages=3000, alloc_pages=2500, f=0.6),
        vm("idle", shares=1000, min_pages=50, max_pages=1000, alloc_pages=800, f=0.02),
    ]
    avail = 3500 * P
    fast = compute_targets(vms, avail, tax)
    slow = iterative_revocation(vms, avail, tax)
    for v in vms:
        assert abs(fast[v.name] - slow[v.name]) <= 2 * P, (v.name, fast, slow)


def test_the_iterated_victim_is_the_lowest_ratio_at_targets() -> None:
    # At the targets, no VM above its min should pay less per page than another VM
    # could absorb: the lowest-ratio VM above min sits at (about) the common level.
    vms = [vm("a", shares=1000, f=0.2), vm("b", shares=1000, f=0.8),
           vm("c", shares=4000, f=0.5)]
    t = compute_targets(vms, 1500 * P, tax_rate=0.75)
    levels = [v.shares / cost(v, t[v.name] / P, 0.75) for v in vms]
    assert max(levels) / min(levels) == pytest.approx(1.0, abs=0.02)


# --- properties ----------------------------------------------------------------------

demand = st.builds(
    lambda shares, lo, span, alloc_frac, f: (shares, lo, lo + span, alloc_frac, f),
    st.integers(1, 5000),
    st.integers(0, 300),
    st.integers(0, 400),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)


def build(specs: list[tuple[int, int, int, float, float]]) -> list[VMDemand]:
    return [
        vm(f"vm{i}", shares=s, min_pages=lo, max_pages=hi,
           alloc_pages=round(lo + af * (hi - lo)), f=f)
        for i, (s, lo, hi, af, f) in enumerate(specs)
    ]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(demand, min_size=1, max_size=5), st.integers(0, 3000),
       st.sampled_from([0.0, 0.25, 0.75, 0.95]))
def test_targets_are_bounded_and_fit(specs: list[tuple[int, int, int, float, float]],
                                     avail_pages: int, tax: float) -> None:
    vms = build(specs)
    t = compute_targets(vms, avail_pages * P, tax)
    for v in vms:
        assert v.min_bytes <= t[v.name] <= v.max_bytes
        assert t[v.name] % P == 0
    if sum(v.min_bytes for v in vms) <= avail_pages * P:
        assert sum(t.values()) <= avail_pages * P
        # ...and nothing is wasted: at most one page per VM is left unallocated.
        if sum(v.max_bytes for v in vms) >= avail_pages * P:
            assert sum(t.values()) >= (avail_pages - len(vms)) * P


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(demand, min_size=1, max_size=5), st.integers(0, 3000),
       st.sampled_from([0.0, 0.25, 0.75, 0.95]))
def test_closed_form_equals_iterative_revocation(
        specs: list[tuple[int, int, int, float, float]], avail_pages: int, tax: float) -> None:
    vms = build(specs)
    if sum(v.min_bytes for v in vms) > avail_pages * P:
        return
    fast = compute_targets(vms, avail_pages * P, tax)
    slow = iterative_revocation(vms, avail_pages * P, tax)
    for v in vms:
        assert abs(fast[v.name] - slow[v.name]) <= 2 * P, (v.name, fast, slow)
