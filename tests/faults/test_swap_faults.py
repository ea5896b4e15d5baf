"""Host swap taken from under `hv run`: removed (swapoff) while it samples, and full.

This module makes its own swap file, the host's only swap while it runs (it fails
loudly if the host has other swap: then swap cannot disappear or fill for hv), and
removes it afterwards.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hv.host import swap
from hv.units import MiB
from tests.conftest import wait_for
from tests.faults.inject import SwapFiller
from tests.faults.runs import assert_stopped_clean, start_hv, ticks_after
from tests.functional.hvrun import HvRun, swap_fixture

pytestmark = pytest.mark.guest

SWAP_BYTES = 128 * MiB
# min = max: admission reserves no swap, so hv starts whatever swap is left.
LIMITS = {"min": "256M", "max": "256M"}


@pytest.fixture
def own_swap() -> Iterator[Path]:
    """A swap file of SWAP_BYTES, the host's only swap; removed afterwards."""
    total, _ = swap.totals()
    assert total == 0, f"the host has {total // MiB} MiB of other swap: hv's cannot vanish or fill"
    made = swap_fixture(size_bytes=SWAP_BYTES)
    next(made)
    try:
        (area,) = swap.areas()
        yield Path(area.path)
    finally:
        next(made, None)  # `hv swap remove`: a file a test turned off is just deleted


def _periods(hv: HvRun, vm: str) -> int:
    return int(hv.last_tick(vm)["active"]["periods"])


def _assert_suspended(hv: HvRun, vms: list[str], since_ts: float, reason: str) -> dict[str, dict[str, Any]]:
    """Every VM's sampling suspended once (with ``reason``), nothing fed for three
    periods (2 s each); returns the suspensions by VM."""
    found = {n: hv.wait_event("sampling_suspended", 30, vm=n) for n in vms}
    for n, e in found.items():
        assert e["ts"] > since_ts and reason in e["reason"], e
    held = {n: ticks_after(hv, n, found[n]["ts"], count=1)[0]["active"]["periods"] for n in vms}
    last = max(e["ts"] for e in found.values())
    for n in vms:
        ticks_after(hv, n, last + 6, count=1)  # managed meanwhile
    assert sorted(e["vm"] for e in hv.events("sampling_suspended")) == sorted(vms)
    late = [e for e in hv.events("sample") if e["ts"] > found[e["vm"]]["ts"]]
    assert not late, late
    assert {n: _periods(hv, n) for n in vms} == held
    return found


def _assert_resumed(hv: HvRun, vms: list[str], since_ts: float) -> None:
    """Every VM's sampling resumed once and measured again (sane fractions)."""
    for n in vms:
        resumed = hv.wait_event("sampling_resumed", 30, vm=n)
        assert resumed["ts"] > since_ts
        got = wait_for(lambda: [e for e in hv.events("sample", vm=n)
                                if e["ts"] > resumed["ts"] and e["sampled"] > 0],
                       30, f"{n} sampled again")
        assert 0.0 <= got[-1]["fraction"] <= 1.0
    assert len(hv.events("sampling_resumed")) == len(vms)
    assert len(hv.events("sampling_suspended")) == len(vms)


def test_swap_removed_while_sampling(guests, own_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """`swapoff` of the host's (only) swap file while `hv run` samples, then `swapon`.

    Promise: the sampler notices swap disappeared: it stops sampling and says so once
    per VM (``sampling_suspended``, with a reason), feeds the estimators nothing
    meanwhile (no sample lines, the periods counted stay put: pages that cannot be
    paged out would read every VM as fully active), and says ``sampling_resumed`` when
    swap is back, then measures again.  The VMs are managed throughout.
    """
    g1 = guests.launch("sr1", mem="256M", workload="toucher", alloc_mib=48, ws=48)
    g2 = guests.launch("sr2", mem="256M")
    guests.wait_event(g1, "toucher_filled", timeout_s=60)
    vms = {"sr1": {"socket": g1["socket"], **LIMITS}, "sr2": {"socket": g2["socket"], **LIMITS}}
    hv = start_hv(tmp_path, {"managed": "1G", "sample_period_s": 2}, vms)
    try:
        for n in vms:
            hv.wait_event("sample", 30, vm=n)
        off_ts = time.time()
        subprocess.run(["swapoff", str(own_swap)], check=True)
        _assert_suspended(hv, list(vms), off_ts, "swap")
        on_ts = time.time()
        subprocess.run(["swapon", str(own_swap)], check=True)
        _assert_resumed(hv, list(vms), on_ts)
    finally:
        rc = hv.stop()
    assert_stopped_clean(hv, rc, g1, g2)


def test_swap_full(guests, own_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """The host's swap fills up (another process's pages) while `hv run` samples.

    Promise: as with no swap: sampling is suspended, said once per VM with the reason
    (swap full), nothing is fed to the estimators meanwhile, the VMs are managed
    throughout; once swap has room again sampling resumes and measures.
    """
    g1 = guests.launch("sf1", mem="256M", workload="toucher", alloc_mib=48, ws=48)
    guests.wait_event(g1, "toucher_filled", timeout_s=60)
    hv = start_hv(tmp_path, {"managed": "1G", "sample_period_s": 2},
                  {"sf1": {"socket": g1["socket"], **LIMITS}})
    try:
        hv.wait_event("sample", 30, vm="sf1")
        full_ts = time.time()
        filler = SwapFiller(SWAP_BYTES + 32 * MiB)
        try:
            _, free = swap.totals()
            assert free < 4 * MiB, f"swap not full: {free // 1024} KiB free"
            _assert_suspended(hv, ["sf1"], full_ts, "full")
        finally:
            filler.close()
        _assert_resumed(hv, ["sf1"], time.time())
    finally:
        rc = hv.stop()
    assert_stopped_clean(hv, rc, g1)
