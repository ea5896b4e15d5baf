"""``hv bench overcommit`` (the paper's Figure 8): five VMs with mixed workloads
overcommit the host under real pressure; hv's states, allocations and free memory,
beside the same run with hv reclaiming by balloon only and with no hv at all.

Five guests (``oc-idle``, ``oc-web``, ``oc-db``, ``oc-cache``, ``oc-batch``) run the
guest image's workloads: a guest gone idle after freeing what it used (its memory
still resident in the host), a toucher whose working set changes, a hog that holds
what it wrote (a database's buffer pool), a file in the guest's tmpfs and a toucher
that never stops.  **Three series**, each on freshly booted guests with the same
workloads and the same pressure schedule (``--series`` picks some):

- ``hv``: a real ``hv run`` with its default ``[host]`` (but for a shorter sampling
  period); **no state is forced**;
- ``balloon``: the same with ``reclaim = "balloon"`` (no hypervisor swap; pausing in
  low stays on);
- ``none``: no ``hv run``; the host kernel swaps the QEMU processes by itself.

**The pressure.**  The memory locker (:mod:`hv.host.pressure`) plays a co-tenant that
holds a base (MemAvailable :data:`REST_PCT` % of the host, taken before the schedule
and before hv starts), takes more in bursts (soft, hard, low), goes back to its base
between them and releases everything in the last phase.  Each burst
is sized at its start from what the VMs hold above their mins then (``above``, their
resident guest RAM less ``min``, summed; read from ``smaps`` as hv reads it), by
:func:`burst_level_bytes`: MemAvailable is taken to the burst's nominal level (3, 1.5,
0.8 % of the host), but no lower than what leaves hv's free goal (high threshold plus
hysteresis) within :data:`COVER` of ``above``, and never above the state's entry
threshold less :data:`ENTRY_MARGIN_PCT`, so that the burst still reaches its state.
When both cannot hold, the state wins and the phase records ``covered: false``.

**Measured.**  Every :data:`SAMPLE_S`: MemAvailable, each VM's resident and swapped
RAM, and the touchers' cumulative passes (their consoles' ``event=toucher`` lines).
With hv, its event log's ``tick`` and ``state`` events and its actions.  Per series:
guest OOM kills (the consoles) and VMs left paused.  The analysis and its **shape**
are in :mod:`hv.bench.overcommit_report`.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hv.bench import report
from hv.bench.daemon import Daemon
from hv.bench.fleet import Fleet, GuestPlan, Progress, console_events, refuse_if_daemon, wait_event
from hv.bench.hostswap import host_swap
from hv.bench.overcommit_report import (OvercommitResult, analyse, format_result, save_plot)
from hv.errors import HostError, UsageError
from hv.host import proc
from hv.host.pressure import MemoryLocker, meminfo
from hv.policy.states import DEFAULT_THRESHOLDS, MemState, StateTracker
from hv.qemu import launch as launcher
from hv.qemu.vm import VMInfo
from hv.units import MiB, format_size, parse_size

__all__ = ["OvercommitConfig", "OvercommitResult", "PHASES", "SERIES", "COVER", "REST_PCT",
           "add_arguments", "config_from_args", "run", "format_result", "analyse",
           "save_plot", "burst_level_bytes", "oom_kills"]

# (name, nominal MemAvailable of the burst, % of MemTotal, and the state it must reach;
# None: back to the rest level, or (the last) release all; share of the schedule).
# hv's thresholds: high above 6 %, soft below 4, hard below 2, low below 1 (README).
PHASES: tuple[tuple[str, float | None, MemState | None, float], ...] = (
    ("before", None, None, 0.08),
    ("soft", 3.0, MemState.SOFT, 0.17),
    ("rest1", None, None, 0.10),
    ("hard", 1.5, MemState.HARD, 0.17),
    ("rest2", None, None, 0.10),
    ("low", 0.8, MemState.LOW, 0.15),
    ("released", None, None, 0.23),
)
# Between bursts the co-tenant keeps a base locked, leaving MemAvailable at this level
# (% of the host, ~2.9 GiB on 24 GiB): well above hv's free goal (6.5 %), by more than
# the VMs grow back in a rest (the web toucher's 500 MiB working set, ~2 %).  Each burst
# then locks ~2 GiB on top, in seconds, instead of ~20 GiB from nothing (~30 s here,
# which would eat the bursts of a 4-minute schedule).  The last phase releases all.
REST_PCT = 12.0

# The series: name -> hv run's reclaim mode (None: no hv run).
SERIES: dict[str, str | None] = {"hv": "balloon+swap", "balloon": "balloon", "none": None}

# The five VMs: (suffix, size MiB, shares, workload, params with sizes in MiB as
# "{MiB}" placeholders scaled by --scale, console event when in place).
VMS: tuple[tuple[str, int, int, str, tuple[tuple[str, str], ...], str], ...] = (
    ("idle", 1024, 1000, "hog", (("hog_mib", "{600}"), ("hog_hold_s", "1")), "hog_freed"),
    ("web", 1024, 1000, "toucher", (("alloc_mib", "{600}"), ("ws", "{500}:60,{150}:60")),
     "toucher_filled"),
    ("db", 1024, 2000, "hog", (("hog_mib", "{600}"),), "hog_touched"),
    ("cache", 768, 1000, "filecache", (("file_mib", "{300}"),), "filecache_done"),
    ("batch", 768, 1000, "toucher", (("alloc_mib", "{400}"), ("ws", "{400}"), ("rate", "0")),
     "toucher_filled"),
)
ACTIVE = ("web", "batch")  # the VMs whose throughput is the cost of reclamation

# A burst leaves hv's free goal at most this share of what the VMs hold above their
# mins: not all of it can be had.  The touchers' working sets fault straight back what
# hypervisor swap takes (docs/bench-tax.md), a balloon stops at the guest's need (its
# use + boot reserve + 32 MiB), and the deficit grows during the burst as the web
# toucher's working set grows back; a quarter kept for those is what the committed
# run's guests could not give (docs/bench-overcommit.md).
COVER = 0.75
# A burst's level stays this far (% of the host, ~50 MiB on 24 GiB) below the entry
# threshold of its state, so that it enters the state despite MemAvailable's jitter.
ENTRY_MARGIN_PCT = 0.2

FILL_TIMEOUT_S = 240.0  # five TCG guests writing their workloads' memory on 2 cores
SAMPLE_TIMEOUT_S = 120.0  # hv run measured every VM once before the pressure
SWAP_MARGIN_BYTES = 1024 * MiB  # admission reserves max - min per VM; hv's swapping comes on top
PROGRESS_EVERY_S = 15.0
SAMPLE_S = 2.0  # free memory, the VMs' RAM and the touchers' passes
OOM_RE = re.compile(r"Out of memory|oom-kill|invoked oom-killer")


@dataclass(frozen=True)
class OvercommitConfig:
    minutes: float = 3.0
    min_bytes: int = 160 * MiB
    period_s: float = 10.0
    series: tuple[str, ...] = tuple(SERIES)
    scale: float = 1.0
    prefix: str = "oc"
    out_dir: Path = Path("bench-overcommit")

    def names(self) -> list[str]:
        return [f"{self.prefix}-{v[0]}" for v in VMS]

    def mib(self, full: int) -> int:
        """A size of the full configuration (MiB) at ``--scale``."""
        return max(1, round(full * self.scale))

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "OvercommitConfig":
        if not (math.isfinite(a.minutes) and 1 <= a.minutes <= 120):
            raise UsageError(f"--minutes must be between 1 and 120, not {a.minutes:g}")
        if not (math.isfinite(a.scale) and 0.25 <= a.scale <= 1):
            raise UsageError(f"--scale must be between 0.25 and 1, not {a.scale:g}")
        series = tuple(s.strip() for s in a.series.split(","))
        if not series or any(s not in SERIES for s in series) or len(set(series)) < len(series):
            raise UsageError(f"--series takes some of {','.join(SERIES)} (each once), "
                             f"not {a.series!r}")
        low = parse_size(a.min)
        smallest = round(min(v[1] for v in VMS) * a.scale) * MiB
        if not 0 < low < smallest:
            raise UsageError(f"--min must be above 0 and below the smallest guest "
                             f"({format_size(smallest)})")
        if not (math.isfinite(a.period) and a.period > 0):
            raise UsageError("--period must be a positive number of seconds")
        shortest = min(p[3] for p in PHASES if p[1] is not None) * a.minutes * 60
        if shortest < 2 * a.period:
            raise UsageError(f"--period {a.period:g} s is too long for bursts of "
                             f"{shortest:.0f} s: give more --minutes")
        for suffix, *_ in VMS:
            launcher.check_name(f"{a.prefix}-{suffix}")
        return cls(a.minutes, low, a.period, series, a.scale, a.prefix, Path(a.out))


def config_from_args(a: argparse.Namespace) -> OvercommitConfig:
    return OvercommitConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=3.0,
                   help="length of each series' pressure schedule (default 3; boots, fills "
                   "and the co-tenant's base come on top, ~2.5 min per series)")
    p.add_argument("--series", default=",".join(SERIES),
                   help="which series, in order: hv (hv run), balloon (hv run with "
                   "reclaim = \"balloon\"), none (no hv: host swap alone) (default all three)")
    p.add_argument("--min", default="160M", help="every VM's guaranteed min (default 160M)")
    p.add_argument("--period", type=float, default=10.0, metavar="SECONDS",
                   help="hv run's sampling period (default 10; hv run's is 30)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="every guest and workload at this share of its size (0.25-1, default 1)")
    p.add_argument("--prefix", default="oc", help="guests are PREFIX-idle, PREFIX-web, ...")
    p.add_argument("--out", default="bench-overcommit", help="directory for the PNG and JSON")


# -- the pressure (pure) ---------------------------------------------------------------
def burst_level_bytes(nominal_bytes: float, entry_bytes: float, goal_bytes: float,
                      above_min_bytes: int, total_bytes: int) -> tuple[int, bool]:
    """MemAvailable a burst takes the host to, and whether hv's way back is covered.

    Aim for the nominal level, raised until the deficit to the free goal is at most
    :data:`COVER` of what the VMs hold above their mins; but stay
    :data:`ENTRY_MARGIN_PCT` below the entry threshold of the burst's state.  Covered:
    ``goal - level <= COVER * above_min``.
    """
    aim = max(nominal_bytes, goal_bytes - COVER * above_min_bytes)
    level = min(aim, entry_bytes - ENTRY_MARGIN_PCT / 100 * total_bytes)
    return int(level), goal_bytes - level <= COVER * above_min_bytes


def oom_kills(console: str) -> int:
    """Guest OOM kills in a console log: one kill prints an ``invoked oom-killer``
    line, an ``oom-kill:`` line and an ``Out of memory: Killed`` line; count the most
    numerous of them (a kernel may print only some)."""
    lines = [m.group(0) for m in OOM_RE.finditer(console)]
    return max((lines.count(k) for k in set(lines)), default=0)


# -- the run -------------------------------------------------------------------------
def _params(cfg: OvercommitConfig, params: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, re.sub(r"\{(\d+)\}", lambda m: str(cfg.mib(int(m.group(1)))), v))
                 for k, v in params)


def _plans(cfg: OvercommitConfig) -> list[GuestPlan]:
    return [GuestPlan(f"{cfg.prefix}-{suffix}", cfg.mib(mib) * MiB, workload, _params(cfg, params))
            for suffix, mib, _, workload, params, _ in VMS]


def _vm_tables(cfg: OvercommitConfig, fleet: Fleet) -> dict[str, dict[str, Any]]:
    shares = {f"{cfg.prefix}-{v[0]}": v[2] for v in VMS}
    return {vm.name: {"socket": vm.socket, "min": cfg.min_bytes, "max": vm.ram_bytes,
                      "shares": shares[vm.name]} for vm in fleet.vms}


def _usage(vm: VMInfo) -> tuple[int, int]:
    """Resident and swapped bytes of the VM's RAM, from smaps (as hv reads it)."""
    got = [proc.range_usage(vm.pid, r.hva, r.size, vm.name) for r in vm.ram]
    return sum(u.rss_bytes for u in got), sum(u.swap_bytes for u in got)


def _passes(name: str) -> int | None:
    found = console_events(name, "toucher")
    return int(found[-1]["passes"]) if found and "passes" in found[-1] else None


class _Recorder:
    """What a series measures every SAMPLE_S, and the progress lines."""

    def __init__(self, cfg: OvercommitConfig, fleet: Fleet, hv: Daemon | None, t0: float,
                 progress: Progress) -> None:
        self.cfg, self.fleet, self.hv, self.t0, self.progress = cfg, fleet, hv, t0, progress
        self.samples: list[dict[str, Any]] = []
        self.active = [f"{cfg.prefix}-{a}" for a in ACTIVE]

    def sample(self) -> dict[str, Any]:
        vms = {vm.name: list(_usage(vm)) for vm in self.fleet.vms}
        row = {"t_s": round(time.time() - self.t0, 2), "free_bytes": meminfo()["MemAvailable"],
               "vms": vms, "passes": {n: _passes(n) for n in self.active}}
        self.samples.append(row)
        return row

    def above_min(self) -> int:
        return sum(max(0, r - self.cfg.min_bytes) for r, _ in self.sample()["vms"].values())

    def say(self, phase: str) -> None:
        s = self.samples[-1] if self.samples else self.sample()
        state = ""
        if self.hv is not None and (ticks := self.hv.events("tick")):
            state = f"state {ticks[-1]['state']:4}  "
        held = sum(r for r, _ in s["vms"].values()) // MiB
        swapped = sum(w for _, w in s["vms"].values()) // MiB
        rates = []
        for n in self.active:
            old = [p for p in self.samples if p["t_s"] >= s["t_s"] - PROGRESS_EVERY_S]
            a, b = old[0]["passes"].get(n), s["passes"].get(n)
            if a is not None and b is not None and s["t_s"] > old[0]["t_s"]:
                rates.append(f"{n.removeprefix(self.cfg.prefix + '-')} "
                             f"{(b - a) / (s['t_s'] - old[0]['t_s']):.2f}")
        self.progress(f"  t={s['t_s']:4.0f} s  {phase:8}  {state}free {s['free_bytes'] // MiB} MiB"
                      f"  VMs resident {held} MiB, swapped {swapped} MiB  passes/s: "
                      + (", ".join(rates) or "-"))


async def _schedule(cfg: OvercommitConfig, rec: _Recorder, locker: MemoryLocker,
                    alive: Any) -> list[dict[str, Any]]:
    """Run the phases; what the locker did in each, and why.  Each phase lasts its share
    of the schedule from when the locker is done (locking ~20 GiB takes 5-20 s)."""
    total_s = cfg.minutes * 60
    mem_total = meminfo()["MemTotal"]
    tracker = StateTracker(mem_total)
    goal = tracker.free_goal_bytes()
    out: list[dict[str, Any]] = []
    for name, level_pct, state, share in PHASES:
        row: dict[str, Any] = {"phase": name, "level_pct": level_pct,
                               "state": None if state is None else str(state)}
        if level_pct is None and name == PHASES[-1][0]:
            got = locker.release()
            what = "released"
        elif level_pct is None:
            got = locker.set_level(REST_PCT)
            what = f"MemAvailable back to {REST_PCT:g} %"
        else:
            assert state is not None
            above = rec.above_min()
            level, covered = burst_level_bytes(
                mem_total * level_pct / 100, tracker.threshold_bytes(state), goal, above, mem_total)
            got = locker.lock_until_available(100 * level / mem_total)
            row.update(above_min_bytes=above, goal_bytes=int(goal), level_bytes=level,
                       covered=covered, deficit_bytes=int(goal) - got.available_bytes)
            what = (f"VMs hold {above // MiB} MiB above their mins; MemAvailable to "
                    f"{level // MiB} MiB ({100 * level / mem_total:.2f} %, nominal {level_pct:g} %), "
                    f"{'covered' if covered else 'NOT covered'}")
        row.update(start_s=round(time.time() - rec.t0, 2), locked_bytes=got.locked_bytes,
                   available_bytes=got.available_bytes)
        out.append(row)
        end = row["start_s"] + share * total_s  # the phase's length after the locking
        rec.progress(f"phase {name}: {what}: locked {got.locked_bytes // MiB} MiB, available "
                     f"{got.available_bytes // MiB} MiB")
        next_sample = next_say = 0.0
        while (now := time.time() - rec.t0) < end:
            alive()
            if now >= next_sample:
                rec.sample()
                next_sample = now + SAMPLE_S
            if now >= next_say:
                rec.say(name)
                next_say = now + PROGRESS_EVERY_S
            await asyncio.sleep(0.5)
        row["end_s"] = round(time.time() - rec.t0, 2)
    rec.sample()
    return out


def _hv_record(hv: Daemon, names: list[str], t0: float) -> dict[str, Any]:
    keep = ("vm", "state", "target_bytes", "resident_bytes", "balloon_bytes", "swap_bytes",
            "free_bytes", "pool_bytes", "paused_by_hv")
    ticks = [{"t_s": round(e["ts"] - t0, 2), **{k: e.get(k) for k in keep}}
             for e in hv.events("tick") if e["ts"] >= t0 - 30]
    states = [(round(e["ts"] - t0, 2), e["state"]) for e in hv.events("state") if e["ts"] >= t0 - 30]
    actions = {n: {a: sum(1 for e in hv.events(a, vm=n) if e["ts"] >= t0)
                   for a in ("balloon", "swap", "pause", "resume")} for n in names}
    return {"ticks": ticks, "states": states, "actions": actions}


@contextlib.asynccontextmanager
async def _maybe_daemon(workdir: Path, reclaim: str | None,
                        progress: Progress) -> AsyncIterator[Daemon | None]:
    if reclaim is None:
        yield None
        return
    async with Daemon(workdir, progress) as hv:
        yield hv


def _check_at_rest() -> None:
    """Without hv run: the host must be in hv's high state before any pressure."""
    m = meminfo()
    if m["MemAvailable"] < m["MemTotal"] * DEFAULT_THRESHOLDS.high_pct / 100:
        raise HostError("the host is under pressure before the locker: other work on it "
                        "needs memory")


async def _series(cfg: OvercommitConfig, kind: str, workdir: Path,
                  progress: Progress) -> dict[str, Any]:
    """One series on freshly booted guests."""
    reclaim = SERIES[kind]
    names = cfg.names()
    began = time.time()
    progress(f"== series {kind}: " + ("no hv run (host swap alone)" if reclaim is None
                                      else f"hv run, reclaim = {reclaim!r}"))
    async with Fleet(_plans(cfg), progress, boot_timeout_s=FILL_TIMEOUT_S) as fleet:
        for suffix, *_, ready in VMS:
            await wait_event(f"{cfg.prefix}-{suffix}", ready, FILL_TIMEOUT_S)
        progress("workloads in place")
        with MemoryLocker() as locker:  # released after hv run stopped
            base = locker.set_level(REST_PCT)
            progress(f"the co-tenant's base: {base}")
            async with _maybe_daemon(workdir / f"hv-{kind}", reclaim, progress) as hv:
                if hv is not None:
                    hv.write_config({"sample_period_s": cfg.period_s, "reclaim": reclaim},
                                    _vm_tables(cfg, fleet))
                    await hv.start_measured(names, SAMPLE_TIMEOUT_S)
                else:
                    _check_at_rest()
                t0 = time.time()
                rec = _Recorder(cfg, fleet, hv, t0, progress)
                phases = await _schedule(cfg, rec, locker,
                                         hv.check_alive if hv is not None else lambda: None)
                out: dict[str, Any] = {"reclaim": reclaim, "phases": phases,
                                       "samples": rec.samples, "ticks": [], "states": [],
                                       "actions": {}}
                if hv is not None:
                    out.update(_hv_record(hv, names, t0))
        out["oom_kills"] = {n: oom_kills(launcher.console_log(n).read_text(errors="replace"))
                            for n in names if launcher.console_log(n).exists()}
    out["wall_s"] = round(time.time() - began, 1)
    progress(f"series {kind} done in {out['wall_s'] / 60:.1f} min: guests stopped")
    return out


def _need_swap_bytes(cfg: OvercommitConfig) -> int:
    return sum(cfg.mib(v[1]) * MiB - cfg.min_bytes for v in VMS) + SWAP_MARGIN_BYTES


async def run(cfg: OvercommitConfig, progress: Progress = lambda s: None) -> OvercommitResult:
    refuse_if_daemon("running the overcommit benchmark (it starts its own `hv run`)")
    workdir = Path(tempfile.mkdtemp(prefix="hv-bench-overcommit-", dir="/var/tmp"))
    progress(f"series {', '.join(cfg.series)}; five guests ("
             + ", ".join(f"{v[0]} {cfg.mib(v[1])} MiB {v[3]}" for v in VMS)
             + f"), min {cfg.min_bytes // MiB} MiB; phases "
             + ", ".join(f"{p[0]} {p[3] * cfg.minutes:.1f} min" for p in PHASES))
    series: dict[str, Any] = {}
    try:
        with host_swap(_need_swap_bytes(cfg), workdir, progress):
            for kind in cfg.series:
                series[kind] = await _series(cfg, kind, workdir, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    conf = report.jsonable(cfg)
    conf["vms"] = {f"{cfg.prefix}-{v[0]}": {"mib": cfg.mib(v[1]), "shares": v[2], "workload": v[3],
                                            "params": dict(_params(cfg, v[4]))} for v in VMS}
    conf["active"] = [f"{cfg.prefix}-{a}" for a in ACTIVE]
    conf.update(cover=COVER, entry_margin_pct=ENTRY_MARGIN_PCT, rest_pct=REST_PCT,
                mem_total_bytes=meminfo()["MemTotal"], thresholds_pct=report.jsonable(DEFAULT_THRESHOLDS))
    result = OvercommitResult(conf, series)
    result.summary = analyse(result)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result.data = cfg.out_dir / "overcommit.json"
    result.plot = cfg.out_dir / "overcommit.png"
    report.write_json(result.data, {"config": result.config, "summary": result.summary,
                                    "series": result.series})
    save_plot(result)
    return result
