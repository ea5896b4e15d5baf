"""``hv bench overcommit`` (the paper's Figure 8): five VMs with mixed workloads
overcommit the host under real pressure; hv's states, allocations and free memory.

Five guests (``oc-idle``, ``oc-web``, ``oc-db``, ``oc-cache``, ``oc-batch``) run the
guest image's workloads: a guest gone idle after freeing what it used (its memory
still resident in the host), a toucher whose working set changes, a hog that holds
what it wrote (a database's buffer pool), a file in the guest's tmpfs and a toucher
that never stops.  A real ``hv run`` manages them with its default ``[host]``
(but for a shorter sampling period); **no state is forced**.

**The pressure.**  The memory locker (:mod:`hv.host.pressure`) plays a co-tenant that
takes memory in bursts: at the start of a burst it locks host memory until
MemAvailable is the burst's level (soft 3 %, hard 1.5 %, low 0.8 % of the host), then
holds what it has until the burst ends, and lets it all go between bursts.  During a
burst the VMs, configured for more than the host leaves them, are overcommitted: hv
has to reclaim from them until the host is back out of the state the burst put it in.
A burst needs the VMs to give up what lies between its level and hv's free goal (the
high threshold and its hysteresis, ~1.6 GiB on 24 GiB), so the guests hold ~3 GiB of
which ~2 GiB are above their mins.

**Measured.**  hv's own record: every ``tick`` of its event log (per VM target,
balloon, resident, swapped, whether paused; the state and free memory) and its state
changes.  **Shape** (exit 3 if missed): every pressure phase takes hv out of the high
state and hv brings the host back out of the phase's worst state within the phase;
the VMs' total resident memory is lower at the end of the deepest phase than before
the pressure, and their targets rise again after the release; no VM is left paused.
"""

from __future__ import annotations

import argparse
import asyncio
import math
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
from hv.errors import UsageError
from hv.host.pressure import MemoryLocker
from hv.qemu import launch as launcher
from hv.units import MiB, format_size, parse_size, table

__all__ = ["OvercommitConfig", "OvercommitResult", "PHASES", "add_arguments",
           "config_from_args", "run", "format_result", "analyse"]

# (name, MemAvailable the locker takes the host to, % of MemTotal; None: release all,
# share of the run).  hv's thresholds: high above 6 %, soft below 4, hard below 2, low
# below 1 (README).
PHASES: tuple[tuple[str, float | None, float], ...] = (
    ("before", None, 0.08),
    ("soft", 3.0, 0.17),
    ("rest1", None, 0.10),
    ("hard", 1.5, 0.17),
    ("rest2", None, 0.10),
    ("low", 0.8, 0.15),
    ("released", None, 0.23),
)

# The five VMs: (suffix, size MiB, shares, workload, params, console event when in place).
VMS: tuple[tuple[str, int, int, str, tuple[tuple[str, str], ...], str], ...] = (
    ("idle", 1024, 1000, "hog", (("hog_mib", "600"), ("hog_hold_s", "1")), "hog_freed"),
    ("web", 1024, 1000, "toucher", (("alloc_mib", "600"), ("ws", "500:60,150:60")),
     "toucher_filled"),
    ("db", 1024, 2000, "hog", (("hog_mib", "600"),), "hog_touched"),
    ("cache", 768, 1000, "filecache", (("file_mib", "300"),), "filecache_done"),
    ("batch", 768, 1000, "toucher", (("alloc_mib", "400"), ("ws", "400"), ("rate", "0")),
     "toucher_filled"),
)

FILL_TIMEOUT_S = 240.0  # five TCG guests writing their workloads' memory on 2 cores
SAMPLE_TIMEOUT_S = 120.0  # hv run measured every VM once before the pressure
SWAP_MARGIN_BYTES = 1024 * MiB  # admission reserves max - min per VM; hv's swapping comes on top
PROGRESS_EVERY_S = 15.0
FALL_MIB = 128  # the VMs gave up memory under pressure: far above tick-to-tick noise
RISE_MIB = 128  # and got it back after the release


@dataclass(frozen=True)
class OvercommitConfig:
    minutes: float = 10.0
    min_bytes: int = 160 * MiB
    period_s: float = 10.0
    prefix: str = "oc"
    out_dir: Path = Path("bench-overcommit")

    def names(self) -> list[str]:
        return [f"{self.prefix}-{v[0]}" for v in VMS]

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "OvercommitConfig":
        if not (math.isfinite(a.minutes) and 2 <= a.minutes <= 120):
            raise UsageError(f"--minutes must be between 2 and 120, not {a.minutes:g}")
        low = parse_size(a.min)
        smallest = min(v[1] for v in VMS) * MiB
        if not 0 < low < smallest:
            raise UsageError(f"--min must be above 0 and below the smallest guest "
                             f"({format_size(smallest)})")
        if not (math.isfinite(a.period) and a.period > 0):
            raise UsageError("--period must be a positive number of seconds")
        shortest = min(f for _, _, f in PHASES) * a.minutes * 60
        if shortest < 2 * a.period:
            raise UsageError(f"--period {a.period:g} s is too long for phases of "
                             f"{shortest:.0f} s: give more --minutes")
        for suffix, *_ in VMS:
            launcher.check_name(f"{a.prefix}-{suffix}")
        return cls(a.minutes, low, a.period, a.prefix, Path(a.out))


def config_from_args(a: argparse.Namespace) -> OvercommitConfig:
    return OvercommitConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0,
                   help="length of the pressure schedule (default 10; boots come on top)")
    p.add_argument("--min", default="160M", help="every VM's guaranteed min (default 160M)")
    p.add_argument("--period", type=float, default=10.0, metavar="SECONDS",
                   help="hv run's sampling period (default 10; hv run's is 30)")
    p.add_argument("--prefix", default="oc", help="guests are PREFIX-idle, PREFIX-web, ...")
    p.add_argument("--out", default="bench-overcommit", help="directory for the PNG and JSON")


@dataclass
class OvercommitResult:
    config: dict[str, Any]
    phases: list[dict[str, Any]]     # name, start_s, end_s, level_pct, locked/available bytes
    ticks: list[dict[str, Any]]      # hv's tick events, trimmed (t_s since t0)
    states: list[tuple[float, str]]  # hv's state changes (s since t0, state)
    actions: dict[str, dict[str, int]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    plot: Path = Path()
    data: Path = Path()

    @property
    def complete(self) -> bool:
        return not self.summary.get("misses")


# -- the run -------------------------------------------------------------------------
def _plans(cfg: OvercommitConfig) -> list[GuestPlan]:
    return [GuestPlan(f"{cfg.prefix}-{suffix}", mib * MiB, workload, params)
            for suffix, mib, _, workload, params, _ in VMS]


def _vm_tables(cfg: OvercommitConfig, fleet: Fleet) -> dict[str, dict[str, Any]]:
    shares = {f"{cfg.prefix}-{v[0]}": v[2] for v in VMS}
    return {vm.name: {"socket": vm.socket, "min": cfg.min_bytes, "max": vm.ram_bytes,
                      "shares": shares[vm.name]} for vm in fleet.vms}


def _say(hv: Daemon, t0: float, phase: str, progress: Progress) -> None:
    ticks = hv.events("tick")
    if not ticks:
        return
    last: dict[str, dict[str, Any]] = {}
    for t in ticks:
        last[t["vm"]] = t
    state = ticks[-1]["state"]
    held = sum(t["resident_bytes"] for t in last.values()) // MiB
    target = sum(t["target_bytes"] or 0 for t in last.values()) // MiB
    paused = [n for n, t in last.items() if t.get("paused_by_hv")]
    progress(f"  t={time.time() - t0:4.0f} s  {phase:8}  state {state:4}  free "
             f"{ticks[-1]['free_bytes'] // MiB} MiB  VMs: target {target} MiB, resident {held} MiB"
             + (f", paused {', '.join(paused)}" if paused else ""))


async def _schedule(cfg: OvercommitConfig, hv: Daemon, locker: MemoryLocker, t0: float,
                    progress: Progress) -> list[dict[str, Any]]:
    """Run the phases; what the locker did in each."""
    total_s = cfg.minutes * 60
    out: list[dict[str, Any]] = []
    start = 0.0
    for name, level, share in PHASES:
        end = start + share * total_s
        if level is None:
            got = locker.release()
            what = "released"
        else:
            got = locker.lock_until_available(level)
            what = f"MemAvailable {level:g} %"
        row = {"phase": name, "start_s": round(time.time() - t0, 2), "level_pct": level,
               "locked_bytes": got.locked_bytes, "available_bytes": got.available_bytes}
        out.append(row)
        progress(f"phase {name}: {what}: locked {got.locked_bytes // MiB} MiB, available "
                 f"{got.available_bytes // MiB} MiB")
        next_say = 0.0
        while (now := time.time() - t0) < end:
            hv.check_alive()
            if now >= next_say:
                _say(hv, t0, name, progress)
                next_say = now + PROGRESS_EVERY_S
            await asyncio.sleep(1.0)
        row["end_s"] = round(time.time() - t0, 2)
        start = end
    return out


async def _measure(cfg: OvercommitConfig, fleet: Fleet, hv: Daemon, locker: MemoryLocker,
                   progress: Progress) -> OvercommitResult:
    names = cfg.names()
    hv.write_config({"sample_period_s": cfg.period_s}, _vm_tables(cfg, fleet))
    await hv.start_measured(names, SAMPLE_TIMEOUT_S)
    t0 = time.time()
    phases = await _schedule(cfg, hv, locker, t0, progress)
    keep = ("vm", "state", "target_bytes", "resident_bytes", "balloon_bytes", "swap_bytes",
            "free_bytes", "pool_bytes", "paused_by_hv")
    ticks = [{"t_s": round(e["ts"] - t0, 2), **{k: e.get(k) for k in keep}}
             for e in hv.events("tick") if e["ts"] >= t0 - 30]
    states = [(round(e["ts"] - t0, 2), e["state"]) for e in hv.events("state") if e["ts"] >= t0 - 30]
    actions = {n: {a: sum(1 for e in hv.events(a, vm=n) if e["ts"] >= t0)
                   for a in ("balloon", "swap", "pause", "resume")} for n in names}
    conf = report.jsonable(cfg)
    conf["vms"] = {f"{cfg.prefix}-{v[0]}": {"mib": v[1], "shares": v[2], "workload": v[3],
                                            "params": dict(v[4])} for v in VMS}
    return OvercommitResult(conf, phases, ticks, states, actions)


def _need_swap_bytes(cfg: OvercommitConfig) -> int:
    return sum(v[1] * MiB - cfg.min_bytes for v in VMS) + SWAP_MARGIN_BYTES


async def run(cfg: OvercommitConfig, progress: Progress = lambda s: None) -> OvercommitResult:
    refuse_if_daemon("running the overcommit benchmark (it starts its own `hv run`)")
    workdir = Path(tempfile.mkdtemp(prefix="hv-bench-overcommit-", dir="/var/tmp"))
    progress(f"five guests ({', '.join(f'{v[0]} {v[1]} MiB {v[3]}' for v in VMS)}), min "
             f"{cfg.min_bytes // MiB} MiB; phases "
             + ", ".join(f"{n} {share * cfg.minutes:.1f} min" for n, _, share in PHASES))
    try:
        with host_swap(_need_swap_bytes(cfg), workdir, progress):
            async with Fleet(_plans(cfg), progress, boot_timeout_s=FILL_TIMEOUT_S) as fleet:
                for suffix, *_, ready in VMS:
                    await wait_event(f"{cfg.prefix}-{suffix}", ready, FILL_TIMEOUT_S)
                progress("workloads in place")
                with MemoryLocker() as locker:  # released after hv run stopped
                    async with Daemon(workdir / "hv", progress) as hv:
                        result = await _measure(cfg, fleet, hv, locker, progress)
                progress("pressure off, hv run stopped")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.summary = analyse(result)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result.data = cfg.out_dir / "overcommit.json"
    result.plot = cfg.out_dir / "overcommit.png"
    report.write_json(result.data, {
        "config": result.config, "summary": result.summary, "phases": result.phases,
        "actions": result.actions, "states": result.states, "ticks": result.ticks})
    save_plot(result)
    return result


# -- analysis (pure) -----------------------------------------------------------------
_RANK = {"high": 0, "soft": 1, "hard": 2, "low": 3}


def _state_at(states: list[tuple[float, str]], t_s: float, before: str = "high") -> str:
    state = before
    for t, s in states:
        if t > t_s:
            break
        state = s
    return state


def _spans(result: OvercommitResult) -> list[tuple[float, float, str]]:
    """(from, to, state) over the schedule, from the state changes."""
    end_s = result.phases[-1]["end_s"] if result.phases else 0.0
    marks = [(0.0, _state_at(result.states, 0.0))]
    marks += [(t, s) for t, s in result.states if 0 < t < end_s]
    return [(t, nxt[0], s) for (t, s), nxt in zip(marks, marks[1:] + [(end_s, "")])]


def _totals_at(ticks: list[dict[str, Any]], t_s: float, key: str) -> int | None:
    """The VMs' total ``key`` from each VM's last tick at or before ``t_s``."""
    last: dict[str, int] = {}
    for t in ticks:
        if t["t_s"] <= t_s and t.get(key) is not None:
            last[t["vm"]] = t[key]
    return sum(last.values()) if last else None


def analyse(result: OvercommitResult) -> dict[str, Any]:
    """Per phase: the worst state, the state at its end, time in each state, the VMs'
    totals at its end; and the shape's misses."""
    rows = []
    misses = []
    for p in result.phases:
        a, b = p["start_s"], p["end_s"]
        seen = [_state_at(result.states, a)] + [s for t, s in result.states if a < t <= b]
        worst = max(seen, key=lambda s: _RANK[s])
        end_state = _state_at(result.states, b)
        row = {"phase": p["phase"], "start_s": a, "end_s": b, "worst": worst,
               "at_end": end_state,
               "resident_mib": _mib(_totals_at(result.ticks, b, "resident_bytes")),
               "target_mib": _mib(_totals_at(result.ticks, b, "target_bytes")),
               "swap_mib": _mib(_totals_at(result.ticks, b, "swap_bytes"))}
        rows.append(row)
        if p["level_pct"] is not None:
            if worst == "high":
                misses.append(f"phase {p['phase']}: the locker's pressure never took hv out of high")
            elif _RANK[end_state] >= _RANK[worst]:
                misses.append(f"phase {p['phase']}: still {end_state} at its end (worst {worst}): "
                              "reclamation did not bring the host back")
    before, deepest, last = rows[0], max(
        (r for r, p in zip(rows, result.phases) if p["level_pct"] is not None),
        key=lambda r: r["start_s"], default=None), rows[-1]
    if deepest is not None:
        if before["resident_mib"] is None or deepest["resident_mib"] is None or \
                before["resident_mib"] - deepest["resident_mib"] < FALL_MIB:
            misses.append(f"the VMs' resident memory did not fall by {FALL_MIB} MiB under pressure "
                          f"({before['resident_mib']} -> {deepest['resident_mib']} MiB)")
        if deepest["target_mib"] is None or last["target_mib"] is None or \
                last["target_mib"] - deepest["target_mib"] < RISE_MIB:
            misses.append(f"the VMs' targets did not rise by {RISE_MIB} MiB after the release "
                          f"({deepest['target_mib']} -> {last['target_mib']} MiB)")
    final: dict[str, dict[str, Any]] = {}
    for t in result.ticks:
        final[t["vm"]] = t
    paused = sorted(n for n, t in final.items() if t.get("paused_by_hv"))
    if paused:
        misses.append(f"left paused at the end: {', '.join(paused)}")
    time_in: dict[str, float] = {}
    for a, b, state in _spans(result):
        time_in[state] = round(time_in.get(state, 0.0) + b - a, 1)
    return {"phases": rows, "time_in_state_s": time_in, "misses": misses}


def _mib(v: int | None) -> float | None:
    return None if v is None else round(v / MiB, 1)


# -- output --------------------------------------------------------------------------
def format_result(result: OvercommitResult) -> str:
    s = result.summary
    rows = [[r["phase"], f"{r['start_s']:.0f}-{r['end_s']:.0f}", r["worst"], r["at_end"],
             r["target_mib"], r["resident_mib"], r["swap_mib"]] for r in s["phases"]]
    text = table(rows, ["PHASE", "SECONDS", "WORST-STATE", "STATE-AT-END", "VMS-TARGET-MiB",
                        "VMS-RESIDENT-MiB", "VMS-SWAPPED-MiB"])
    acts = ", ".join(f"{n}: " + " ".join(f"{k} {v}" for k, v in a.items())
                     for n, a in result.actions.items())
    time_in = ", ".join(f"{k} {v:g} s" for k, v in s["time_in_state_s"].items())
    verdict = ("shape holds: every pressure phase left high and hv brought the host back; "
               "memory came back after the release" if not s["misses"]
               else "MISSED: " + "; ".join(s["misses"]))
    return "\n".join([text, f"time in each state: {time_in}", f"actions: {acts}", verdict])


STATE_COLORS = {"high": "#d8f0d8", "soft": "#fff2b3", "hard": "#ffd0a0", "low": "#ffb0b0"}


def save_plot(result: OvercommitResult) -> None:
    plt = report.pyplot()
    names = list(result.config.get("vms", {})) or sorted({t["vm"] for t in result.ticks})
    fig, axes = plt.subplots(1 + len(names), 1, figsize=(12, 3 + 2.2 * len(names)), sharex=True)
    top = axes[0]
    for since, until, state in _spans(result):
        for ax in axes:
            ax.axvspan(since, until, color=STATE_COLORS.get(state, "white"), lw=0)
    host = {tick["t_s"]: tick["free_bytes"] for tick in result.ticks}
    ts = sorted(host)
    top.plot(ts, [host[x] / MiB for x in ts], color="black", label="host free memory (MemAvailable)")
    for p in result.phases:
        top.axvline(p["start_s"], color="grey", lw=0.8)
        top.text(p["start_s"], 0, f" {p['phase']}", fontsize=8, va="bottom")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLORS.values()]
    top.legend([top.get_lines()[0], *handles], ["free memory", *STATE_COLORS], fontsize=7,
               loc="upper right", ncol=5)
    top.set(ylabel="MiB", title="Overcommit (cf. ESX Fig. 8): hv's state (bands) and the "
            "host's free memory")
    for ax, name in zip(axes[1:], names):
        ticks = [t for t in result.ticks if t["vm"] == name]
        x = [t["t_s"] for t in ticks]
        for key, style, label in (("target_bytes", "--", "target"), ("balloon_bytes", ":", "balloon"),
                                  ("resident_bytes", "-", "resident"), ("swap_bytes", "-.", "swapped")):
            ax.plot(x, [(t[key] or 0) / MiB for t in ticks], style, label=label)
        info = result.config.get("vms", {}).get(name, {})
        ax.set(ylabel="MiB", title=f"{name}: {info.get('workload', '')}, {info.get('mib', '?')} MiB, "
               f"{info.get('shares', '?')} shares", ylim=(0, None))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    axes[-1].set(xlabel="seconds since the first pressure phase began")
    fig.tight_layout()
    fig.savefig(result.plot, dpi=90)
    plt.close(fig)
