"""Admission control (hv.policy.admission)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.errors import AdmissionError
from hv.policy.admission import (
    OVERHEAD_BASE_BYTES,
    AdmissionControl,
    Reservation,
    check_admission,
    overhead_bytes,
    reservation_for,
)
from hv.units import GiB, MiB


def test_overhead_is_a_constant_plus_a_sixty_fourth_of_max() -> None:
    assert overhead_bytes(0) == OVERHEAD_BASE_BYTES
    assert overhead_bytes(512 * MiB) == 40 * MiB + 8 * MiB
    assert overhead_bytes(4 * GiB) == 40 * MiB + 64 * MiB


def test_reservation_is_min_plus_overhead_and_max_minus_min() -> None:
    r = reservation_for("web", 128 * MiB, 512 * MiB)
    assert r == Reservation("web", 128 * MiB + 48 * MiB, 384 * MiB)


def test_admits_while_it_fits() -> None:
    ac = AdmissionControl(managed_bytes=1 * GiB, swap_bytes=1 * GiB)
    ac.admit("a", 256 * MiB, 512 * MiB)   # memory 256 + 48, swap 256
    ac.admit("b", 256 * MiB, 512 * MiB)
    assert ac.unreserved_memory_bytes == 1 * GiB - 2 * (256 + 48) * MiB
    assert ac.unreserved_swap_bytes == 1 * GiB - 2 * 256 * MiB
    assert [r.name for r in ac.admitted] == ["a", "b"]


def test_refusal_says_how_much_memory_is_missing() -> None:
    ac = AdmissionControl(managed_bytes=1 * GiB, swap_bytes=10 * GiB)
    ac.admit("a", 512 * MiB, 512 * MiB)          # reserves 512 + 48 = 560 MiB
    # Unreserved: 1024 - 560 = 464 MiB.  "b" needs 700 + 40 + 11 = 751 MiB.
    with pytest.raises(AdmissionError) as info:
        ac.admit("b", 700 * MiB, 704 * MiB)
    message = str(info.value)
    assert "needs 287.0M more memory" in message
    assert "swap" not in message
    assert "\n" not in message
    assert message.startswith("b: ")
    # Nothing was reserved for the refused VM.
    assert [r.name for r in ac.admitted] == ["a"]


def test_refusal_says_how_much_swap_is_missing() -> None:
    ac = AdmissionControl(managed_bytes=16 * GiB, swap_bytes=2 * GiB)
    ac.admit("a", 256 * MiB, 1 * GiB)             # reserves 768 MiB of swap
    with pytest.raises(AdmissionError) as info:
        ac.admit("b", 512 * MiB, 2560 * MiB)      # needs 2 GiB of swap, 1.25 GiB left
    message = str(info.value)
    assert "needs 768.0M more swap" in message
    assert "memory" not in message


def test_refusal_lists_both_shortages() -> None:
    with pytest.raises(AdmissionError) as info:
        check_admission("big", 2 * GiB, 3 * GiB + 200 * MiB, managed_bytes=1 * GiB,
                        swap_bytes=0, admitted=[])
    message = str(info.value)
    # Memory: 2048 + 40 + 50 = 2138 MiB wanted, 1024 MiB there.
    assert "needs 1.09G more memory" in message
    assert "needs 1.20G more swap" in message


def test_exact_fit_is_admitted() -> None:
    r = reservation_for("x", 100 * MiB, 300 * MiB)
    ac = AdmissionControl(managed_bytes=r.memory_bytes, swap_bytes=r.swap_bytes)
    ac.admit("x", 100 * MiB, 300 * MiB)
    assert ac.unreserved_memory_bytes == 0 and ac.unreserved_swap_bytes == 0


def test_min_equal_to_max_needs_no_swap() -> None:
    ac = AdmissionControl(managed_bytes=1 * GiB, swap_bytes=0)
    assert ac.admit("pinned", 256 * MiB, 256 * MiB).swap_bytes == 0


def test_release_frees_the_reservation() -> None:
    ac = AdmissionControl(managed_bytes=1 * GiB, swap_bytes=1 * GiB)
    ac.admit("a", 800 * MiB, 800 * MiB)
    with pytest.raises(AdmissionError):
        ac.admit("b", 800 * MiB, 800 * MiB)
    ac.release("a")
    ac.admit("b", 800 * MiB, 800 * MiB)
    with pytest.raises(AdmissionError):
        ac.release("a")


def test_same_name_twice_is_refused() -> None:
    ac = AdmissionControl(managed_bytes=4 * GiB, swap_bytes=4 * GiB)
    ac.admit("a", 100 * MiB, 200 * MiB)
    with pytest.raises(AdmissionError, match="already admitted"):
        ac.admit("a", 100 * MiB, 200 * MiB)


def test_bad_bounds_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        reservation_for("x", 2 * MiB, 1 * MiB)
    with pytest.raises(ValueError):
        AdmissionControl(managed_bytes=0, swap_bytes=0)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 2048), st.integers(0, 2048)), max_size=12))
def test_reservations_never_exceed_memory_or_swap(bounds: list[tuple[int, int]]) -> None:
    ac = AdmissionControl(managed_bytes=4 * GiB, swap_bytes=3 * GiB)
    for i, (a, b) in enumerate(bounds):
        lo, hi = min(a, b) * MiB, max(a, b) * MiB
        fits = (lo + overhead_bytes(hi) <= ac.unreserved_memory_bytes
                and hi - lo <= ac.unreserved_swap_bytes)
        if fits:
            ac.admit(f"vm{i}", lo, hi)  # a VM that fits is never refused
        else:
            with pytest.raises(AdmissionError):
                ac.admit(f"vm{i}", lo, hi)
        assert ac.unreserved_memory_bytes >= 0
        assert ac.unreserved_swap_bytes >= 0
