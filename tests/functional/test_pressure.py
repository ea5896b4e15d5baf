"""`hv run` under NATURAL host pressure, with the default ``[host]`` section.

No ``managed`` pool and no forced state: a helper process (:mod:`tests.functional.pressure`)
mlocks host memory until MemAvailable is below a threshold, and hv must notice it by
itself and reclaim from its guests (issue 7: with the default pool, targets were
computed over the whole host and stayed at max, so nothing happened).

Thresholds are hv's documented defaults, as % of MemTotal (README, "The allocation
loop"): high 6, soft 4, hard 2, low 1, hysteresis 0.5.  Only the sampling period and
size and the poll interval are shortened, so a test takes minutes, not hours.

- soft: two idle guests (they allocated and freed memory, so their host memory is
  resident but unused) and one active guest.  Pressure to 3 %: the idle guests'
  balloons inflate, free memory comes back above soft + hysteresis because the guests'
  host memory shrank by at least the shortfall (other processes on a shared machine
  can free memory too), the active guest keeps its working set, nobody is OOM-killed.
- hard: pressure to 1.5 %, kept there while hv reclaims (a growing host process):
  after ballooning, a VM still above its target is swapped by hv.
- low: pressure to 0.8 %, kept there: a busy guest whose balloon cannot reach its
  target is paused; once the pressure is released it is resumed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hv.host import reclaim, swap
from hv.units import MiB, PAGE_SIZE
from tests.conftest import wait_for
from tests.functional.hvrun import HvRun, qmp_status, swap_fixture, write_config
from tests.functional.pressure import MemoryLocker, available_pct, meminfo

pytestmark = pytest.mark.guest

# hv's default thresholds (README): the tests run with the default [host] section,
# so these are the numbers under test, not tunables.
HIGH_PCT, SOFT_PCT, HARD_PCT, LOW_PCT = 6.0, 4.0, 2.0, 1.0
HYSTERESIS_PCT = 0.5

# Pressure levels, each half-way into its state so noise cannot flip it.
SOFT_LEVEL_PCT = 3.0
HARD_LEVEL_PCT = 1.5
LOW_LEVEL_PCT = 0.8

# Only sampling and polling are shortened (5 s periods: a fresh estimate every few ticks).
HOST = {"poll_interval_s": 1, "sample_period_s": 5, "sample_pages": 200}

# Every guest's guaranteed minimum.
MIN = "160M"

# Admission needs max - min of every VM in free swap (up to 3 x 608 MiB here), and hard
# and low page guests out on top: 3 GiB covers both.
PRESSURE_SWAP_BYTES = 3072 * MiB

# The soft test's budget for free memory to come back: ~370 MiB (1.5 % of 24 GiB) must
# move out of idle balloons at 1 s ticks on a loaded 2-core TCG host.
SOFT_RECOVERY_S = 60

# A guest's own use beyond its workload: kernel, init and busybox (~25 MiB idle, see
# hv.qemu.vm) plus part of hv's 32 MiB headroom; the active guest's balloon must stay
# at least this far above its working set.
GUEST_BASE_BYTES = 48 * MiB

# What a guest's console says when its kernel's OOM killer ran.
OOM_MARKERS = re.compile(r"Out of memory|oom-kill|invoked oom-killer")


@pytest.fixture(scope="module")
def pressure_swap() -> Iterator[None]:
    """Free host swap for admission and hv's swapping; removes what it created."""
    _, free = swap.totals()
    yield from swap_fixture(size_bytes=max(PRESSURE_SWAP_BYTES - free, PAGE_SIZE),
                            enough_bytes=PRESSURE_SWAP_BYTES)


@pytest.fixture
def locker() -> Iterator[MemoryLocker]:
    """The pressure process; whatever it locked is released at teardown, always."""
    lk = MemoryLocker()
    try:
        lk.start()
        yield lk
    finally:
        lk.close()


# -- helpers -----------------------------------------------------------------------

def total_bytes() -> int:
    return meminfo()["MemTotal"]


def describe(hv: HvRun, names: list[str]) -> str:
    """The last tick of every VM, for assertion messages."""
    out = [f"MemAvailable {available_pct():.2f} %"]
    for n in names:
        got = hv.ticks(n)
        if not got:
            out.append(f"{n}: no tick")
            continue
        t = got[-1]
        pool = f" pool {t['pool_bytes'] / MiB:.0f}M" if t.get("pool_bytes") is not None else ""
        out.append(f"{n}: state {t['state']} free {t['free_bytes'] / MiB:.0f}M{pool} target "
                   f"{(t['target_bytes'] or 0) / MiB:.0f}M balloon {t['balloon_bytes'] / MiB:.0f}M "
                   f"resident {t['resident_bytes'] / MiB:.0f}M swap {t['swap_bytes'] / MiB:.0f}M "
                   f"active {t['active']['of_allocation']:.2f} paused {t['paused_by_hv']}")
    counts = {e: len(hv.events(e)) for e in ("balloon", "swap", "pause", "resume")}
    return "; ".join(out) + f"; events {counts}"


def start_hv(tmp_path: Path, vms: list[dict[str, Any]]) -> HvRun:
    """`hv run` with the default [host] (sampling shortened), every VM with min 160M."""
    config = write_config(tmp_path / "hv.toml", HOST,
                          {g["name"]: {"socket": g["socket"], "min": MIN} for g in vms})
    hv = HvRun(config, tmp_path / "events.jsonl")
    try:
        # Before any pressure: every VM measured once (so estimates are real) and the
        # host in high, so what follows is hv's answer to the pressure we make.
        # Each guest's need known too (a few reports after attach, read every tick until
        # then): without it hv cannot balloon, and would page out first.
        for g in vms:
            hv.wait_event("sample", 60, vm=g["name"])
            wait_for(lambda: any(t["need_bytes"] is not None for t in hv.ticks(g["name"])), 60,
                     f"hv to know what {g['name']} needs")
        tick = hv.wait_event("tick", 10)
        assert tick["state"] == "high", f"host already under pressure: {describe(hv, [])}"
    except BaseException:
        hv.stop()
        raise
    return hv


def launch_idle(guests: Any, name: str, mem: str, hog_mib: int) -> dict[str, Any]:
    """An idle guest that allocated and freed ``hog_mib``: resident on the host, unused."""
    g = guests.launch(name, mem=mem, workload="hog", hog_mib=hog_mib, hog_hold_s=1, fill="unique")
    guests.wait_event(g, "hog_freed", timeout_s=120)
    return g


def launch_busy(guests: Any, name: str, mem: str, ws_mib: int) -> dict[str, Any]:
    """A guest that touches ``ws_mib`` every second: its working set."""
    g = guests.launch(name, mem=mem, workload="toucher", alloc_mib=ws_mib, ws=ws_mib, rate=1)
    guests.wait_event(g, "toucher_filled", timeout_s=120)
    return g


def console_text(g: dict[str, Any]) -> str:
    return Path(g["console"]).read_text(errors="replace")


def assert_guests_healthy(vms: list[dict[str, Any]]) -> None:
    """No guest kernel OOM-killed anything, no workload died, every QEMU answers and runs."""
    for g in vms:
        text = console_text(g)
        assert not OOM_MARKERS.search(text), f"{g['name']}: OOM killer ran in the guest"
        died = re.findall(r"event=workload_exit workload=\S+ status=(?!0\b)\d+", text)
        assert not died, f"{g['name']}: a workload died: {died}"  # the hog exits 0 when done
        assert qmp_status(g["socket"]) == "running", f"{g['name']} is not running"


def toucher_passes(g: dict[str, Any]) -> int:
    found = re.findall(r"event=toucher t_s=\S+ ws_mib=\d+ alloc_mib=\d+ passes=(\d+)", console_text(g))
    return int(found[-1]) if found else 0


def chase(locker: MemoryLocker, pct: float, hv: HvRun, done: Any, timeout_s: float, what: str) -> Any:
    """Hold MemAvailable at ``pct`` while hv reclaims (a host process that keeps growing
    into what hv frees) until ``done()``; then stop growing."""
    def step() -> Any:
        hv.check_alive()
        got = done()
        if not got:
            locker.set_level(pct)
        return got
    return wait_for(step, timeout_s, what, interval_s=1.0)


# -- tests ---------------------------------------------------------------------------

def test_soft_balloons_idle_guests(guests, pressure_swap, locker, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    act_ws_mib = 200
    idle = [launch_idle(guests, "idle1", "768M", 600), launch_idle(guests, "idle2", "768M", 600)]
    act = launch_busy(guests, "act", "512M", act_ws_mib)
    vms = [*idle, act]
    names = [g["name"] for g in vms]
    hv = start_hv(tmp_path, vms)
    try:
        before = {n: hv.last_tick(n)["balloon_bytes"] for n in names}
        resident_before = {n: hv.last_tick(n)["resident_bytes"] for n in names}
        level = locker.lock_until_available(SOFT_LEVEL_PCT)
        print(f"pressure: {level}")
        locked_ts = hv.events("tick")[-1]["ts"]

        # hv notices by itself: the state goes soft (or worse) from the host's free memory.
        hv.wait_event("state", 30, state="soft")
        # Free memory returns above soft + hysteresis while the pressure is held.
        goal = (SOFT_PCT + HYSTERESIS_PCT) / 100 * total_bytes()

        # ... and it is hv that brought it back: the guests' host memory fell by at least
        # the shortfall (on a shared machine, another process ending could free memory too).
        shortfall = goal - level.available_bytes

        def recovered() -> bool:
            hv.check_alive()
            t = hv.events("tick")
            reclaimed = sum(resident_before.values()) - sum(hv.last_tick(n)["resident_bytes"]
                                                            for n in names)
            return (meminfo()["MemAvailable"] >= goal and bool(t) and t[-1]["free_bytes"] >= goal
                    and reclaimed >= shortfall)
        try:
            wait_for(recovered, SOFT_RECOVERY_S, "free memory back above soft + hysteresis")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {describe(hv, names)}") from None
        print(f"recovered: {describe(hv, names)}")

        # The idle guests' balloons inflated: hv asked, and the balloons moved.
        for g in idle:
            n = g["name"]
            asked = [e for e in hv.events("balloon", vm=n) if e["goal_bytes"] < e["actual_bytes"]]
            assert asked, f"{n}: no balloon inflation: {describe(hv, names)}"
            assert hv.last_tick(n)["balloon_bytes"] <= before[n] - 128 * MiB, describe(hv, names)
        # The active guest kept its working set: its balloon never went below the
        # working set plus what the guest itself needs, none of its pages were swapped,
        # and its toucher kept going.
        floor = act_ws_mib * MiB + GUEST_BASE_BYTES
        after = [t for t in hv.ticks("act") if t["ts"] >= locked_ts]
        assert after and min(t["balloon_bytes"] for t in after) >= floor, describe(hv, names)
        assert not hv.events("swap", vm="act"), describe(hv, names)
        assert not hv.events("pause"), describe(hv, names)
        passes = toucher_passes(act)
        wait_for(lambda: toucher_passes(act) >= passes + 3, 30, "act's toucher to keep touching")
    finally:
        locker.release()
        stopped = hv.stop()
    assert stopped == 0, hv.stderr()
    assert_guests_healthy(vms)


def press_until(locker: MemoryLocker, level_pct: float, hv: HvRun, event: str,
                names: list[str], what: str) -> dict[str, Any]:
    """Lock host memory down to ``level_pct`` and keep it there until hv logs ``event``;
    the first such event (the VMs' last ticks in the message if it never comes)."""
    level = locker.lock_until_available(level_pct)
    print(f"pressure: {level}")
    try:
        return chase(locker, level_pct, hv, lambda: hv.events(event), 180, what)[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {describe(hv, names)}") from None


def test_hard_swaps_vm_above_target(guests, pressure_swap, locker, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    idle = launch_idle(guests, "idle3", "768M", 600)
    busy = launch_busy(guests, "busy3", "768M", 500)
    vms = [idle, busy]
    names = [g["name"] for g in vms]
    hv = start_hv(tmp_path, vms)
    try:
        # The pressure grows into whatever hv frees until hv swaps: ballooning alone
        # cannot cover it, because the busy guest's balloon stops at what it uses.
        swapped = press_until(locker, HARD_LEVEL_PCT, hv, "swap", names,
                              "hv to swap a VM in the hard state")
        print(f"swapped: {swapped}; {describe(hv, names)}")
        assert hv.events("state", state="hard"), describe(hv, names)
        # Swapped because it is above its target, and only after hv ballooned.
        assert swapped["resident_bytes"] > swapped["target_bytes"]
        inflations = [e for e in hv.events("balloon") if e["goal_bytes"] < e["actual_bytes"]]
        assert inflations and inflations[0]["ts"] <= swapped["ts"], describe(hv, names)
        n = swapped["vm"]
        swap_before = [t for t in hv.ticks(n) if t["ts"] <= swapped["ts"]][-1]["swap_bytes"]
        wait_for(lambda: hv.last_tick(n)["swap_bytes"] >= swap_before + 16 * MiB, 60,
                 f"{n}'s host swap to grow by 16 MiB")
        # What was paged out left host memory: freed from the swap cache, not kept there.
        if reclaim.nodes():
            swaps = hv.events("swap")
            out = sum(e["invalidated"] for e in swaps) * PAGE_SIZE
            freed = sum(e["freed_bytes"] for e in swaps)
            print("swap events (MiB paged out, freed):",
                  [(e["invalidated"] * PAGE_SIZE // MiB, e["freed_bytes"] // MiB) for e in swaps])
            assert freed >= 0.5 * out, f"{freed / MiB:.0f} MiB freed of {out / MiB:.0f} MiB paged out"

        locker.release()
        # Pressure gone: hv leaves hard.
        wait_for(lambda: hv.last_tick(n)["state"] in ("soft", "high"), 60, "hv to leave hard")
    finally:
        locker.release()
        stopped = hv.stop()
    assert stopped == 0, hv.stderr()
    assert_guests_healthy(vms)
    passes = toucher_passes(busy)
    wait_for(lambda: toucher_passes(busy) >= passes + 2, 60, "busy3's toucher to keep touching")


def test_low_pauses_then_resumes(guests, pressure_swap, locker, state_dir, tmp_path):  # type: ignore[no-untyped-def]
    idle = launch_idle(guests, "idle4", "512M", 300)
    busy = launch_busy(guests, "busy4", "768M", 500)
    vms = [idle, busy]
    names = [g["name"] for g in vms]
    hv = start_hv(tmp_path, vms)
    try:
        paused = press_until(locker, LOW_LEVEL_PCT, hv, "pause", names,
                             "hv to pause a VM in the low state")
        print(f"paused: {paused}; {describe(hv, names)}")
        assert hv.events("state", state="low"), describe(hv, names)
        assert paused["resident_bytes"] > paused["target_bytes"]

        locker.release()
        n = paused["vm"]
        hv.wait_event("resume", 60, vm=n)

        def all_running() -> bool:
            hv.check_alive()
            return all(not hv.last_tick(m)["paused_by_hv"] and hv.last_tick(m)["run_state"] == "running"
                       for m in names)
        wait_for(all_running, 60, "every VM running and unpaused")
        assert len(hv.events("resume")) >= len(hv.events("pause"))
    finally:
        locker.release()
        stopped = hv.stop()
    assert stopped == 0, hv.stderr()
    assert_guests_healthy(vms)
