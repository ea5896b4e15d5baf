"""Host swap taken from under `hv run`: removed (swapoff) while it samples, and full.

This module makes its own swap file, the host's only swap while it runs (it fails
loudly if the host has other swap: then swap cannot disappear or fill for hv), and
removes it afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.host import swap
from hv.units import MiB
from tests.conftest import hv_cli, wait_for
from tests.faults.inject import SwapFiller
from tests.faults.runs import assert_no_traceback, start_hv, ticks_after
from tests.functional.hvrun import HvRun, qmp_status

pytestmark = pytest.mark.guest

SWAP_BYTES = 128 * MiB
# min = max: admission reserves no swap, so hv starts whatever swap is left.
LIMITS = {"min": "256M", "max": "256M"}


@pytest.fixture
def own_swap() -> Iterator[Path]:
    """A swap file of SWAP_BYTES, the host's only swap; removed afterwards."""
    total, _ = swap.totals()
    assert total == 0, f"the host has {total // MiB} MiB of other swap: hv's cannot vanish or fill"
    d = Path(tempfile.mkdtemp(prefix="hv-fault-swap-", dir="/var/tmp"))
    env = {"HV_STATE_DIR": str(d / "state")}
    path = d / "swapfile"
    done = hv_cli("swap", "create", str(SWAP_BYTES), "--path", str(path), env=env)
    assert done.returncode == 0, done.stderr
    try:
        yield path
    finally:
        active = any(a.path == str(path) for a in swap.areas())
        if not active:  # a test turned it off; put it back so `hv swap remove` owns it
            subprocess.run(["swapon", str(path)], check=True)
        done = hv_cli("swap", "remove", "--path", str(path), env=env, timeout_s=300)
        assert done.returncode == 0, done.stderr
        shutil.rmtree(d, ignore_errors=True)


def _periods(hv: HvRun, vm: str) -> int:
    return int(hv.last_tick(vm)["active"]["periods"])


def test_swap_removed_while_sampling(guests, own_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """`swapoff` of the host's (only) swap file while `hv run` samples, then `swapon`.

    Promise: the sampler notices swap disappeared: it stops sampling and says so once
    (``sampling_suspended``, with a reason), feeds the estimators nothing meanwhile (no
    sample lines, the periods counted stay put: an unswappable page-out would read every
    VM as fully active), and says ``sampling_resumed`` when swap is back, then samples
    again.  The VMs are managed throughout.
    """
    g1 = guests.launch("sr1", mem="256M", workload="toucher", alloc_mib=48, ws=48)
    g2 = guests.launch("sr2", mem="256M")
    guests.wait_event(g1, "toucher_filled", timeout_s=60)
    vms = {"sr1": {"socket": g1["socket"], **LIMITS}, "sr2": {"socket": g2["socket"], **LIMITS}}
    hv = start_hv(tmp_path, {"managed": "1G", "sample_period_s": 2}, vms)
    try:
        for n in vms:
            hv.wait_event("sample", 30, vm=n)
        subprocess.run(["swapoff", str(own_swap)], check=True)
        off_ts = time.time()
        suspended = hv.wait_event("sampling_suspended", 30)
        assert suspended.get("reason"), suspended
        held = {n: _periods(hv, n) for n in vms}
        # Several sample periods later: still suspended, said once, nothing fed.
        for n in vms:
            ticks_after(hv, n, suspended["ts"] + 6, count=1)
        assert len(hv.events("sampling_suspended")) == 1, hv.events("sampling_suspended")
        late = [e for e in hv.events("sample") if e["ts"] > suspended["ts"] + 0.5]
        assert not late, late
        assert {n: _periods(hv, n) for n in vms} == held
        assert suspended["ts"] - off_ts < 10

        subprocess.run(["swapon", str(own_swap)], check=True)
        resumed = hv.wait_event("sampling_resumed", 30)
        for n in vms:
            got = wait_for(lambda: [e for e in hv.events("sample", vm=n)
                                    if e["ts"] > resumed["ts"] and e["sampled"] > 0],
                           30, f"{n} sampled again")
            assert 0.0 <= got[-1]["fraction"] <= 1.0
        assert len(hv.events("sampling_suspended")) == 1
    finally:
        rc = hv.stop()
    assert rc == 0, hv.stderr()
    assert_no_traceback(hv)
    assert qmp_status(g1["socket"]) == "running" and qmp_status(g2["socket"]) == "running"


def test_swap_full(guests, own_swap, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    """The host's swap fills up (another process's pages) while `hv run` samples and,
    in a forced hard state, pages a VM out.

    Promise: hv keeps managing; a period in which the sampler could invalidate nothing
    feeds no estimate (the periods counted stay put, every estimate stays in [0, 1]);
    page-out that cannot free anything is reported, not mistaken for progress; when
    swap has room again, sampling measures again.
    """
    g1 = guests.launch("sf1", mem="256M", workload="toucher", alloc_mib=48, ws=48)
    guests.wait_event(g1, "toucher_filled", timeout_s=60)
    force = tmp_path / "force"
    force.write_text("")
    hv = start_hv(tmp_path, {"managed": "1G", "sample_period_s": 2},
                  {"sf1": {"socket": g1["socket"], "min": "96M", "max": "256M"}},
                  "--force-state-file", str(force))
    try:
        hv.wait_event("sample", 30, vm="sf1")
        filler = SwapFiller(SWAP_BYTES + 32 * MiB)
        try:
            _, free = swap.totals()
            assert free < 4 * MiB, f"swap not full: {free // 1024} KiB free"
            full_ts = time.time()
            held = _periods(hv, "sf1")
            force.write_text("hard")
            ticks_after(hv, "sf1", full_ts + 8, count=1)
            fed = [e for e in hv.events("sample", vm="sf1") if e["ts"] > full_ts + 2.5
                   and e["sampled"] > 0]
            assert not fed or _periods(hv, "sf1") > held
            for e in hv.events("sample", vm="sf1"):
                assert e["fraction"] is None or 0.0 <= e["fraction"] <= 1.0, e
            outs = [e for e in hv.events("swap", vm="sf1") if e["ts"] > full_ts]
            assert all(e["invalidated"] <= 1024 for e in outs), outs
            force.write_text("")
        finally:
            filler.close()
        room_ts = time.time()
        wait_for(lambda: [e for e in hv.events("sample", vm="sf1")
                          if e["ts"] > room_ts + 2.5 and e["sampled"] > 0], 30, "sampling again")
    finally:
        rc = hv.stop()
    assert rc == 0, hv.stderr()
    assert_no_traceback(hv)
    assert qmp_status(g1["socket"]) == "running"
