"""``hv bench tax`` (the paper's Figure 7): the idle memory tax moves memory to the active VM.

Two guests of the same size and equal shares, managed by a real ``hv run`` (its
default ``[host]`` but for a shorter sampling period):

- *idle* allocated and freed ``--idle-mib`` (the hog, ``guest_balloon/hog.c``): its
  host memory is resident but unused, as an idle guest's page cache would be;
- *active* runs the toucher (``guest_balloon/toucher.c``) over ``--ws`` MiB back to
  back (``rate=0``): its passes per second are its throughput.

**Real host pressure.**  The memory locker (:mod:`hv.host.pressure`) then locks host
memory until MemAvailable is what makes hv's pool (``held + free - goal``, the goal
being the high threshold plus the hysteresis) the asked ``--pool``: a co-tenant
holding a fixed amount.  It stays locked, so what hv takes from one VM is there for
the other.  The tax rate is 0 for the first half (revocation splits the pool by
shares: half each) and ``--tax`` (default 0.75) for the second, written to the config
file and reloaded with SIGHUP, without restarting the daemon.  With the tax, the
idle VM's pages cost ``1 / (1 - tax)`` times an active page: the idle VM's target
falls, the active VM's rises, and the active VM's throughput should recover.

**Measured.**  hv's own record: every ``tick`` of its event log (per VM target,
resident, balloon, swap, active fraction; the state and pool), and the toucher's
cumulative passes from its console.  **Settled** values are the means over the second
half of each half.  **Shape** (the issue's, "the active VM gains memory after the
switch"): after the switch the active VM's allocation (hv's target for it, what ESX
calls its allocation) is at least :data:`MOVE_MIB` larger, the idle VM's resident
memory at least :data:`MOVE_MIB` smaller (memory really left it), and the active VM's
resident memory did not fall; if not, ``hv bench`` exits 3 and says which.  The
active VM's resident gain and its throughput change are reported beside it: hv's
hypervisor swap takes at most 64 MiB a tick from a VM above target, and a toucher
faults its pages straight back, so at tax 0 the active VM holds more than its
target and pays for it in throughput (docs/bench-tax.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv.bench import report
from hv.bench.daemon import Daemon
from hv.bench.fleet import Fleet, GuestPlan, Progress, refuse_if_daemon, wait_event
from hv.bench.hostswap import host_swap
from hv.errors import HostError, UsageError
from hv.host.pressure import MemoryLocker, meminfo
from hv.host.sysfs import Sysfs
from hv.policy.states import DEFAULT_THRESHOLDS, MemState, StateTracker
from hv.qemu import launch as launcher
from hv.units import MiB, format_size, parse_size, table

__all__ = ["TaxConfig", "TaxResult", "add_arguments", "config_from_args", "run",
           "format_result", "analyse", "lock_level_bytes", "rates", "MOVE_MIB"]

MOVE_MIB = 64  # memory moved: more than noise (a few MiB) and hv's 32 MiB headroom
KEEP_SLACK_MIB = 16  # the active VM's resident memory "did not fall": QEMU's own pages move this much
GUEST_RESERVE_MIB = 128  # the guest's kernel, init and page cache beside its workload
FILL_TIMEOUT_S = 240.0  # TCG writes the workloads' memory at ~10-50 MiB/s, two at once
SAMPLE_TIMEOUT_S = 120.0  # hv run measured both VMs once (a period, plus attaching)
SWAP_MARGIN_BYTES = 1024 * MiB  # admission reserves max - min per VM; hv's swapping comes on top
LOWEST_LEVEL_PCT = 1.3  # the lock never aims below this: hv's low state (1 %) pauses VMs
CONSOLE_POLL_S = 0.5
PROGRESS_EVERY_S = 15.0
# The locker follows hv's pool: other work on a shared host (and the host kernel's own
# caches) moves MemAvailable by hundreds of MiB over minutes; re-levelled when the
# pool hv logs is off by more than this (hv's own moves between the VMs leave it as is).
POOL_TOLERANCE_BYTES = 32 * MiB
RELEVEL_EVERY_S = 5.0
RATE_WINDOW_S = 10.0  # throughput: passes over this many seconds of the guest's clock
DROP_CACHES = "/proc/sys/vm/drop_caches"  # 1: the clean page cache (refilled as needed)

_TOUCHER_RE = re.compile(r"event=toucher t_s=(\S+) ws_mib=\d+ alloc_mib=\d+ passes=(\d+)")


@dataclass(frozen=True)
class TaxConfig:
    mem_bytes: int = 1664 * MiB
    min_bytes: int = 256 * MiB
    ws_mib: int = 1400
    idle_mib: int = 1200
    pool_mib: int = 1900
    half_s: float = 180.0
    tax_rate: float = 0.75
    period_s: float = 10.0
    prefix: str = "tax"
    out_dir: Path = Path("bench-tax")

    @property
    def idle_name(self) -> str:
        return f"{self.prefix}-idle"

    @property
    def active_name(self) -> str:
        return f"{self.prefix}-active"

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "TaxConfig":
        mem, low = parse_size(a.mem), parse_size(a.min)
        for flag, mib in (("--ws", a.ws), ("--idle-mib", a.idle_mib)):
            if mib < 1:
                raise UsageError(f"{flag} must be at least 1 MiB")
            if (mib + GUEST_RESERVE_MIB) * MiB > mem:
                raise UsageError(f"{flag}: {mib} MiB needs guests of at least "
                                 f"{mib + GUEST_RESERVE_MIB} MiB (-m)")
        if not 0 < low < mem:
            raise UsageError(f"--min must be above 0 and below the guest size {format_size(mem)}")
        if not 2 * low < a.pool * MiB < 2 * mem:
            raise UsageError(f"--pool must lie between the two VMs' mins ({2 * low // MiB} MiB) "
                             f"and their sizes ({2 * mem // MiB} MiB)")
        if not (math.isfinite(a.tax) and 0 < a.tax < 1):
            raise UsageError("--tax must be above 0 and below 1 (0 is the first half's)")
        for flag, v in (("--half", a.half), ("--period", a.period)):
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"{flag} must be a positive number of seconds")
        if a.half < 3 * a.period:
            raise UsageError("--half must last at least three sampling periods")
        launcher.check_name(f"{a.prefix}-active")
        return cls(mem, low, a.ws, a.idle_mib, a.pool, a.half, a.tax, a.period, a.prefix,
                   Path(a.out))


def config_from_args(a: argparse.Namespace) -> TaxConfig:
    return TaxConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ws", type=int, default=1400, metavar="MIB",
                   help="the active VM's working set, touched back to back (default 1400)")
    p.add_argument("--idle-mib", type=int, default=1200, metavar="MIB",
                   help="what the idle VM allocated and freed before going idle (default 1200)")
    p.add_argument("--pool", type=int, default=1900, metavar="MIB",
                   help="hv's pool for the two VMs under the locker's pressure (default 1900)")
    p.add_argument("--half", type=float, default=180.0, metavar="SECONDS",
                   help="how long each tax rate lasts (default 180)")
    p.add_argument("--tax", type=float, default=0.75,
                   help="the second half's tax rate; the first half's is 0 (default 0.75)")
    p.add_argument("--period", type=float, default=10.0, metavar="SECONDS",
                   help="hv run's sampling period (default 10; hv run's is 30)")
    p.add_argument("-m", "--mem", default="1664M", help="size (max) of each guest (default 1664M)")
    p.add_argument("--min", default="256M", help="each guest's guaranteed min (default 256M)")
    p.add_argument("--prefix", default="tax", help="guests are PREFIX-idle and PREFIX-active")
    p.add_argument("--out", default="bench-tax", help="directory for the PNG and JSON")


@dataclass
class TaxResult:
    config: dict[str, Any]
    t0: float                        # Unix time the pressure was applied (x = 0)
    switch_s: float                  # when the tax changed (the reload event), s since t0
    end_s: float
    lock: dict[str, Any]             # what the locker locked and why
    ticks: list[dict[str, Any]]      # hv's tick events, trimmed
    states: list[tuple[float, str]]  # hv's state changes (s since t0, state)
    passes: list[tuple[float, float, int]]  # (s since t0 seen, guest t_s, cumulative passes)
    actions: dict[str, dict[str, int]] = field(default_factory=dict)  # per VM, and the daemon's
    swaps: list[dict[str, Any]] = field(default_factory=list)  # hv's page-outs: pages asked, invalidated
    summary: dict[str, Any] = field(default_factory=dict)
    plot: Path = Path()
    data: Path = Path()

    @property
    def moved(self) -> bool:
        return bool(self.summary.get("moved"))

    @property
    def complete(self) -> bool:
        """What ``hv bench`` exits 0 on: memory moved to the active VM."""
        return self.moved


# -- the run -------------------------------------------------------------------------
def lock_level_bytes(pool_bytes: int, held_bytes: int, goal_bytes: float) -> int:
    """MemAvailable that makes hv's pool ``pool_bytes`` while the VMs hold ``held_bytes``.

    hv's pool is ``held + free - goal`` (:func:`hv.policy.reclaim.pool_bytes`), free
    being MemAvailable when hv manages the whole host; solved for free.
    """
    return int(pool_bytes + goal_bytes - held_bytes)


def _hv_host(cfg: TaxConfig, tax: float) -> dict[str, Any]:
    return {"tax_rate": tax, "sample_period_s": cfg.period_s}


async def _follow_console(name: str, t0: list[float], out: list[tuple[float, float, int]]) -> None:
    """The toucher's ``passes`` lines as they appear: (s since t0 seen, guest t_s, passes)."""
    log, offset = launcher.console_log(name), 0
    while True:
        with contextlib.suppress(FileNotFoundError):
            with open(log, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            offset += end
            now = time.time() - t0[0]
            for m in _TOUCHER_RE.finditer(data[:end].decode(errors="replace")):
                out.append((round(now, 2), float(m.group(1)), int(m.group(2))))
        await asyncio.sleep(CONSOLE_POLL_S)


def _held(hv: Daemon, names: list[str]) -> int:
    return sum(hv.events("tick", vm=n)[-1]["resident_bytes"] for n in names)


def _say_status(hv: Daemon, cfg: TaxConfig, t0: float, passes: list[tuple[float, float, int]],
                progress: Progress, tax: float) -> None:
    parts = []
    for n in (cfg.idle_name, cfg.active_name):
        ticks = hv.events("tick", vm=n)
        if ticks:
            t = ticks[-1]
            parts.append(f"{n.removeprefix(cfg.prefix + '-')} target "
                         f"{(t['target_bytes'] or 0) / MiB:.0f} resident {t['resident_bytes'] / MiB:.0f}")
    r = rates(passes)
    state = hv.events("tick")[-1]["state"] if hv.events("tick") else "?"
    rate = f"{r[-1][1]:.2f} passes/s" if r else "no passes yet"
    progress(f"  t={time.time() - t0:4.0f} s  tax {tax:g}  {state:4}  "
             f"{'  '.join(parts)} MiB  active {rate}")


def relevel_pct(pool_bytes: int, free_bytes: int, want_bytes: int, total_bytes: int) -> float | None:
    """The locker's new level (% of MemTotal) when hv's pool is off by more than the
    tolerance, else None: MemAvailable moves by what the pool is off."""
    off = pool_bytes - want_bytes
    if abs(off) <= POOL_TOLERANCE_BYTES:
        return None
    return max(LOWEST_LEVEL_PCT, 100.0 * (free_bytes - off) / total_bytes)


async def _phase(hv: Daemon, cfg: TaxConfig, locker: MemoryLocker, t0: float, until_s: float,
                 tax: float, passes: list[tuple[float, float, int]],
                 relevels: list[dict[str, Any]], progress: Progress) -> None:
    next_say = next_level = 0.0
    total = meminfo()["MemTotal"]
    while (now := time.time() - t0) < until_s:
        hv.check_alive()
        if now >= next_say:
            _say_status(hv, cfg, t0, passes, progress, tax)
            next_say = now + PROGRESS_EVERY_S
        ticks = hv.events("tick") if now >= next_level else []
        if ticks and ticks[-1]["ts"] > t0 + relevels[-1]["t_s"]:
            t = ticks[-1]
            pct = relevel_pct(t["pool_bytes"], t["free_bytes"], cfg.pool_mib * MiB, total)
            if pct is not None:
                got = locker.set_level(pct)
                relevels.append({"t_s": round(time.time() - t0, 2), "pool_bytes": t["pool_bytes"],
                                 "level_pct": round(pct, 3), "locked_bytes": got.locked_bytes})
            next_level = now + RELEVEL_EVERY_S
        await asyncio.sleep(1.0)


async def _measure(cfg: TaxConfig, fleet: Fleet, hv: Daemon, locker: MemoryLocker,
                   progress: Progress) -> TaxResult:
    names = [cfg.idle_name, cfg.active_name]
    vms = {vm.name: {"socket": vm.socket, "min": cfg.min_bytes, "max": cfg.mem_bytes,
                     "shares": 1000} for vm in fleet.vms}
    hv.write_config(_hv_host(cfg, 0.0), vms)
    await hv.start_measured(names, SAMPLE_TIMEOUT_S)

    total = meminfo()["MemTotal"]
    goal = StateTracker(total).free_goal_bytes()
    held = _held(hv, names)
    level = lock_level_bytes(cfg.pool_mib * MiB, held, goal)
    level_pct = 100.0 * level / total
    soft_pct = DEFAULT_THRESHOLDS.pct(MemState.SOFT)
    if not LOWEST_LEVEL_PCT <= level_pct < soft_pct:
        raise HostError(f"--pool {cfg.pool_mib} MiB with the guests holding {held // MiB} MiB "
                        f"needs MemAvailable at {level_pct:.2f} % of the host, outside "
                        f"{LOWEST_LEVEL_PCT:g}-{soft_pct:g} % (no pressure, or hv's low state): "
                        f"change --pool, --ws or --idle-mib")
    progress(f"locking host memory until MemAvailable is {level // MiB} MiB ({level_pct:.2f} %): "
             f"the guests hold {held // MiB} MiB, hv's goal is {goal / MiB:.0f} MiB free")
    # MemAvailable counts part of the page cache: with a large one (a CI machine that
    # just built its images), locking down to the level takes MemFree to the kernel's
    # watermarks, and the kernel's own reclaim then swaps the idle guest's cold pages
    # before hv acts (seen once in CI: 940 MiB of it swapped by the kernel, hv never in
    # soft).  Dropped first, the level is free memory the kernel leaves alone.
    Sysfs().write(DROP_CACHES, 1)
    got = locker.set_level(level_pct)
    t0 = [time.time()]
    lock: dict[str, Any] = {"held_bytes": held, "goal_bytes": int(goal), "level_bytes": level,
            "level_pct": round(level_pct, 3), "locked_bytes": got.locked_bytes,
            "available_bytes": got.available_bytes, "total_bytes": total}
    progress(f"pressure on: {got}; tax 0 for {cfg.half_s:.0f} s")

    passes: list[tuple[float, float, int]] = []
    relevels: list[dict[str, Any]] = [{"t_s": 0.0, "pool_bytes": None, "level_pct": lock["level_pct"],
                                       "locked_bytes": got.locked_bytes}]
    lock["relevels"] = relevels
    follow = asyncio.create_task(_follow_console(cfg.active_name, t0, passes))
    try:
        await _phase(hv, cfg, locker, t0[0], cfg.half_s, 0.0, passes, relevels, progress)
        hv.write_config(_hv_host(cfg, cfg.tax_rate), vms)
        reloaded = await hv.reload()
        switch_s = reloaded["ts"] - t0[0]
        progress(f"tax rate {cfg.tax_rate:g} (config reloaded, hv run not restarted)")
        await _phase(hv, cfg, locker, t0[0], switch_s + cfg.half_s, cfg.tax_rate, passes,
                     relevels, progress)
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
    end_s = time.time() - t0[0]
    keep = ("vm", "state", "target_bytes", "resident_bytes", "balloon_bytes", "swap_bytes",
            "pool_bytes", "free_bytes")
    ticks = [{"t_s": round(e["ts"] - t0[0], 2), **{k: e.get(k) for k in keep},
              "active": e["active"]["of_allocation"]}
             for e in hv.events("tick") if e["ts"] >= t0[0] - 30]
    states = [(round(e["ts"] - t0[0], 2), e["state"]) for e in hv.events("state")
              if e["ts"] >= t0[0] - 30]
    actions = {n: {a: sum(1 for e in hv.events(a, vm=n) if e["ts"] >= t0[0])
                   for a in ("balloon", "swap", "pause")} for n in names}
    swaps = [{"t_s": round(e["ts"] - t0[0], 2), "vm": e["vm"], "pages": e["pages"],
              "invalidated": e["invalidated"]} for e in hv.events("swap") if e["ts"] >= t0[0]]
    # One daemon throughout: the tax changed by reload, not by a restart.
    actions["daemon"] = {"starts": len(hv.events("start")), "reloads": len(hv.events("reload"))}
    return TaxResult(report.jsonable(cfg), t0[0], round(switch_s, 2), round(end_s, 2), lock,
                     ticks, states, passes, actions, swaps)


def _need_swap_bytes(cfg: TaxConfig) -> int:
    return 2 * (cfg.mem_bytes - cfg.min_bytes) + SWAP_MARGIN_BYTES


async def run(cfg: TaxConfig, progress: Progress = lambda s: None) -> TaxResult:
    refuse_if_daemon("running the tax benchmark (it starts its own `hv run`)")
    plans = [GuestPlan(cfg.idle_name, cfg.mem_bytes, "hog",
                       (("hog_mib", str(cfg.idle_mib)), ("hog_hold_s", "1"), ("fill", "unique"))),
             GuestPlan(cfg.active_name, cfg.mem_bytes, "toucher",
                       (("alloc_mib", str(cfg.ws_mib)), ("ws", str(cfg.ws_mib)), ("rate", "0")))]
    workdir = Path(tempfile.mkdtemp(prefix="hv-bench-tax-", dir="/var/tmp"))
    progress(f"two {cfg.mem_bytes // MiB} MiB guests (min {cfg.min_bytes // MiB} MiB, equal "
             f"shares): {cfg.idle_name} idle after {cfg.idle_mib} MiB, {cfg.active_name} touching "
             f"{cfg.ws_mib} MiB; pool {cfg.pool_mib} MiB; tax 0 then {cfg.tax_rate:g}, "
             f"{cfg.half_s:.0f} s each")
    try:
        with host_swap(_need_swap_bytes(cfg), workdir, progress):
            async with Fleet(plans, progress, boot_timeout_s=FILL_TIMEOUT_S) as fleet:
                await wait_event(cfg.idle_name, "hog_freed", FILL_TIMEOUT_S)
                await wait_event(cfg.active_name, "toucher_filled", FILL_TIMEOUT_S)
                progress("workloads in place: the idle guest freed its memory, the toucher filled")
                with MemoryLocker() as locker:  # released after hv run stopped
                    async with Daemon(workdir / "hv", progress) as hv:
                        result = await _measure(cfg, fleet, hv, locker, progress)
                progress("pressure off")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.summary = analyse(result, cfg.active_name, cfg.idle_name)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result.data = cfg.out_dir / "tax.json"
    result.plot = cfg.out_dir / "tax.png"
    report.write_json(result.data, {
        "config": result.config, "move_mib": MOVE_MIB, "summary": result.summary,
        "lock": result.lock, "switch_s": result.switch_s, "end_s": result.end_s,
        "actions": result.actions, "swaps": result.swaps, "states": result.states,
        "ticks": result.ticks,
        "passes": result.passes})
    save_plot(result)
    return result


# -- analysis (pure) -----------------------------------------------------------------
def rates(passes: list[tuple[float, float, int]],
          window_s: float = RATE_WINDOW_S) -> list[tuple[float, float]]:
    """Throughput: (s since t0, passes/s over the last ``window_s`` of the guest's clock).

    The toucher's cumulative count and its own clock give the rate; the time a line
    was seen places it (a slow guest's clock lags, never the count)."""
    out = []
    j = 0
    for i, (seen, t_s, n) in enumerate(passes):
        while passes[j][1] < t_s - window_s:
            j += 1
        if i > j and t_s > passes[j][1]:
            out.append((seen, (n - passes[j][2]) / (t_s - passes[j][1])))
    return out


def _settled(points: list[tuple[float, float]], start_s: float, end_s: float) -> float | None:
    """Mean over the second half of ``[start_s, end_s)``."""
    mid = (start_s + end_s) / 2
    vals = [v for t, v in points if mid <= t < end_s]
    return sum(vals) / len(vals) if vals else None


def _throughput(passes: list[tuple[float, float, int]], start_s: float, end_s: float) -> float | None:
    """Passes per second (guest clock) over the second half of ``[start_s, end_s)``."""
    mid = (start_s + end_s) / 2
    got = [p for p in passes if mid <= p[0] < end_s]
    if len(got) < 2 or got[-1][1] <= got[0][1]:
        return None
    return (got[-1][2] - got[0][2]) / (got[-1][1] - got[0][1])


def _mib(v: float | None) -> float | None:
    return None if v is None else round(v / MiB, 1)


def analyse(result: TaxResult, active: str, idle: str) -> dict[str, Any]:
    """Settled allocations and throughput per half, and whether memory moved."""
    halves = {"before": (0.0, result.switch_s), "after": (result.switch_s, result.end_s)}
    out: dict[str, Any] = {}
    for half, (a, b) in halves.items():
        row: dict[str, Any] = {"start_s": round(a, 2), "end_s": round(b, 2)}
        for role, name in (("idle", idle), ("active", active)):
            ticks = [t for t in result.ticks if t["vm"] == name]
            for key in ("target", "resident", "balloon", "swap"):
                pts = [(t["t_s"], float(t[f"{key}_bytes"])) for t in ticks
                       if t.get(f"{key}_bytes") is not None]
                row[f"{role}_{key}_mib"] = _mib(_settled(pts, a, b))
            row[f"{role}_active_fraction"] = _settled(
                [(t["t_s"], t["active"]) for t in ticks if t.get("active") is not None], a, b)
            if row[f"{role}_active_fraction"] is not None:
                row[f"{role}_active_fraction"] = round(row[f"{role}_active_fraction"], 3)
        tp = _throughput(result.passes, a, b)
        row["passes_per_s"] = None if tp is None else round(tp, 3)
        out[half] = row
    before, after = out["before"], out["after"]

    def gain(key: str) -> float | None:
        if before[key] is None or after[key] is None:
            return None
        return round(after[key] - before[key], 1)

    out["active_resident_gain_mib"] = gain("active_resident_mib")
    out["active_target_gain_mib"] = gain("active_target_mib")
    out["idle_resident_gain_mib"] = gain("idle_resident_mib")
    tp0, tp1 = before["passes_per_s"], after["passes_per_s"]
    out["throughput_ratio"] = round(tp1 / tp0, 2) if tp0 and tp1 is not None else None
    misses = []
    target, idle_res = out["active_target_gain_mib"], out["idle_resident_gain_mib"]
    held = out["active_resident_gain_mib"]
    if target is None or idle_res is None or held is None:
        misses.append("no tick of a VM in a settled window")
    else:
        if target < MOVE_MIB:
            misses.append(f"the active VM's allocation (hv's target) changed by {target:+} MiB "
                          f"after the switch, not +{MOVE_MIB} or more")
        if idle_res > -MOVE_MIB:
            misses.append(f"the idle VM's resident memory changed by {idle_res:+} MiB, "
                          f"not -{MOVE_MIB} or less: nothing was taken from it")
        if held < -KEEP_SLACK_MIB:
            misses.append(f"the active VM's resident memory fell by {-held} MiB: it did not "
                          "get what the idle VM gave")
    out["moved"] = not misses
    out["misses"] = misses
    return out


# -- output --------------------------------------------------------------------------
def format_result(result: TaxResult) -> str:
    s = result.summary
    rows = []
    for half in ("before", "after"):
        r = s[half]
        rows.append([f"{half} ({'tax 0' if half == 'before' else 'tax ' + str(result.config['tax_rate'])})",
                     r["idle_target_mib"], r["idle_resident_mib"], r["active_target_mib"],
                     r["active_resident_mib"], r["active_swap_mib"], r["active_active_fraction"],
                     r["passes_per_s"]])
    text = table(rows, ["SETTLED", "IDLE-TARGET", "IDLE-RESIDENT", "ACTIVE-TARGET",
                        "ACTIVE-RESIDENT", "ACTIVE-SWAPPED", "ACTIVE-F", "PASSES/S"])
    verdict = (f"memory moved to the active VM: its target {s['active_target_gain_mib']:+} MiB, "
               f"resident {s['active_resident_gain_mib']:+} MiB; the idle VM's resident "
               f"{s['idle_resident_gain_mib']:+} MiB; active throughput x{s['throughput_ratio']}"
               if s["moved"] else "MISSED: " + "; ".join(s["misses"]))
    return "\n".join([text, "(MiB; means over the second half of each half)", verdict])


def save_plot(result: TaxResult) -> None:
    plt = report.pyplot()
    cfg = result.config
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    names = [(f"{cfg['prefix']}-idle", "idle VM", "tab:blue"),
             (f"{cfg['prefix']}-active", "active VM", "tab:red")]
    for name, label, color in names:
        ticks = [t for t in result.ticks if t["vm"] == name]
        ts = [t["t_s"] for t in ticks]
        top.plot(ts, [(t["target_bytes"] or 0) / MiB for t in ticks], "--", color=color, lw=1.2,
                 label=f"{label}: target (hv's allocation)")
        top.plot(ts, [t["resident_bytes"] / MiB for t in ticks], "-", color=color, lw=2,
                 label=f"{label}: resident (host memory held)")
        top.plot(ts, [t["balloon_bytes"] / MiB for t in ticks], ":", color=color, lw=1,
                 label=f"{label}: balloon (guest's memory)")
    # hv's state (from its state events): shaded while it reclaims
    changes = sorted(result.states) + [(result.end_s, "")]
    for (start, state), (end, _) in zip(changes, changes[1:]):
        if state not in ("", "high"):
            for ax in (top, bottom):
                ax.axvspan(max(start, 0.0), end, color="tab:orange", alpha=0.08, lw=0)
    top.text(0, 0.01, "  shaded: hv in a reclaiming state (soft or worse)", fontsize=7,
             transform=top.get_xaxis_transform())
    for ax in (top, bottom):
        ax.axvline(result.switch_s, color="black", lw=1)
        ax.axvline(0, color="grey", lw=0.5)
    top.text(result.switch_s, top.get_ylim()[1], f"  tax 0 → {cfg['tax_rate']:g}", va="top")
    top.set(ylabel="MiB", title=(f"Idle memory tax (cf. ESX Fig. 7): two {cfg['mem_bytes'] // MiB} MiB "
                                 f"VMs, equal shares, pool {cfg['pool_mib']} MiB under host pressure"))
    top.legend(fontsize=7, loc="center right", ncol=2)
    r = rates(result.passes)
    bottom.plot([t for t, _ in r], [v for _, v in r], color="tab:red")
    bottom.set(xlabel="seconds since the host pressure began", ylim=(0, None),
               ylabel=f"active VM: toucher\npasses/s ({cfg['ws_mib']} MiB each)")
    fig.tight_layout()
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
