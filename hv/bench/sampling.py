"""``hv bench sampling`` (the paper's Figure 6): working-set estimates against the truth.

One guest runs the toucher (``guest_balloon/toucher.c``): it writes its whole
allocation once, then touches the first W MiB of it every second, W following a
schedule that goes up, down and up again (default 50, 250, 100, 200 MiB, one
``--phase`` each).  hv's sampler (:class:`hv.sampler.Sampler`, on VM time) and
estimator (:class:`hv.policy.WorkingSetEstimator`, the defaults ``hv run`` uses) measure
it period after period, as ``hv run`` would; every poll within a period gives the
in-period estimate.

**Truth.**  The sampler draws from the *sampleable* pages (present, neither zero page
nor KSM), so the true active fraction of a period is ``W MiB / sampleable``, W being
the working set the toucher announced on its console (``event=toucher_ws``, seen within
half a second) — plus what the guest kernel touches itself, a few percent.

**Per phase** it reports the tracking error at steady state (the second half of the
phase: mean and worst ``|max - truth|``, in points of the sampleable memory) and the lag:
how long after the change the maximum first came within :data:`TRACK_POINTS` of the
truth, and, for a growth, how long until it had covered half the step (the fast
average's gain).  **Shapes** checked (the issue's): at steady state the maximum is
within :data:`TRACK_POINTS`; a growth is followed within one period (half the step
covered).  A miss is reported, not tuned away: after a *shrink* the maximum follows
the slow average by design (ten periods' time constant), as in the paper.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv.bench import report
from hv.bench.args import int_list
from hv.bench.fleet import Fleet, GuestPlan, Progress, console_events, refuse_if_daemon, wait_event
from hv.errors import UsageError
from hv.policy import VMClock, WorkingSetEstimator
from hv.qemu.vm import VM
from hv.sampler import Sampler, check_can_sample, follow_vm_time
from hv.units import MiB, PAGE_SIZE, parse_size, table

__all__ = ["SamplingConfig", "SamplingResult", "add_arguments", "config_from_args", "run",
           "format_result", "analyse", "TRACK_POINTS"]

TRACK_POINTS = 15.0  # the bound: percentage points of the sampleable memory
GUEST_RESERVE_MIB = 128  # the guest's kernel, init and page cache beside the toucher
FILL_TIMEOUT_S = 180.0  # TCG writes the toucher's allocation at ~10-50 MiB/s
CONSOLE_POLL_S = 0.5  # how often the console is read for the toucher's phase changes
VM_CLOCK_INTERVAL_S = 1.0  # VM time observed every second: short periods stay short


@dataclass(frozen=True)
class SamplingConfig:
    mem_bytes: int = 512 * MiB
    phases_mib: tuple[int, ...] = (50, 250, 100, 200)
    phase_s: float = 60.0
    period_s: float = 10.0
    sample_pages: int = 100
    name: str = "wss1"
    out_dir: Path = Path("bench-sampling")

    @property
    def alloc_mib(self) -> int:
        return max(self.phases_mib)

    @property
    def duration_s(self) -> float:
        return self.phase_s * len(self.phases_mib)

    @property
    def schedule(self) -> str:
        """The toucher's ``ws`` parameter: every phase timed but the last (endless)."""
        timed = [f"{w}:{self.phase_s:g}" for w in self.phases_mib[:-1]]
        return ",".join([*timed, str(self.phases_mib[-1])])

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "SamplingConfig":
        phases = int_list("--phases", a.phases)
        if len(phases) < 2:
            raise UsageError("--phases needs at least two working sets")
        mem = parse_size(a.mem)
        if (max(phases) + GUEST_RESERVE_MIB) * MiB > mem:
            raise UsageError(f"--phases: a {max(phases)} MiB working set needs a guest of at "
                             f"least {max(phases) + GUEST_RESERVE_MIB} MiB (-m)")
        for flag, v in (("--period", a.period), ("--phase", a.phase)):
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"{flag} must be a positive number of seconds")
        if a.phase < 2 * a.period:
            raise UsageError("--phase must last at least two periods")
        if a.sample_pages < 1:
            raise UsageError("--sample-pages must be at least 1")
        return cls(mem, phases, a.phase, a.period, a.sample_pages, a.name, Path(a.out))


def config_from_args(a: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phases", default="50,250,100,200", metavar="MIB,...",
                   help="the toucher's working sets in turn (default 50,250,100,200)")
    p.add_argument("--phase", type=float, default=60.0, metavar="SECONDS",
                   help="how long each working set lasts (default 60)")
    p.add_argument("--period", type=float, default=10.0, metavar="SECONDS",
                   help="sampling period, VM time (default 10; hv run's is 30)")
    p.add_argument("--sample-pages", type=int, default=100,
                   help="pages sampled per period (default 100, the paper's)")
    p.add_argument("-m", "--mem", default="512M", help="guest memory (default 512M)")
    p.add_argument("--name", default="wss1", help="name of the guest it boots")
    p.add_argument("--out", default="bench-sampling", help="directory for the PNG and JSON")


@dataclass
class SamplingResult:
    config: dict[str, Any]
    changes: list[tuple[float, int]]       # (s since the toucher's fill, working set MiB)
    periods: list[dict[str, Any]]          # one per sampling period
    partials: list[dict[str, Any]]         # every in-period poll
    phases: list[dict[str, Any]] = field(default_factory=list)
    plot: Path = Path()
    data: Path = Path()

    @property
    def shapes_hold(self) -> bool:
        return all(p["shapes_hold"] for p in self.phases)

    @property
    def complete(self) -> bool:
        """What ``hv bench`` exits 0 on: every shape held."""
        return self.shapes_hold


# -- the run -------------------------------------------------------------------------
async def _follow_console(name: str, t0: float, changes: list[tuple[float, int]]) -> None:
    """Append (time, MiB) at each ``event=toucher_ws`` line, when first seen."""
    seen = 0
    while True:
        events = console_events(name, "toucher_ws")
        for e in events[seen:]:
            changes.append((time.monotonic() - t0, int(e["ws_mib"])))
        seen = len(events)
        await asyncio.sleep(CONSOLE_POLL_S)


def _frac(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


async def _measure(cfg: SamplingConfig, info_socket: str, progress: Progress) -> SamplingResult:
    await wait_event(cfg.name, "toucher_filled", FILL_TIMEOUT_S)
    t0 = time.monotonic()
    changes: list[tuple[float, int]] = [(0.0, cfg.phases_mib[0])]
    periods: list[dict[str, Any]] = []
    partials: list[dict[str, Any]] = []
    est = WorkingSetEstimator()
    async with VM(cfg.name, info_socket) as vm:
        clock = VMClock()

        async def running() -> bool:
            return await vm.status() == "running"

        tasks = [asyncio.create_task(follow_vm_time(clock, vm.info.pid, running,
                                                    VM_CLOCK_INTERVAL_S, cfg.name)),
                 asyncio.create_task(_follow_console(cfg.name, t0, changes))]
        sampler = Sampler(vm.info.pid, [(r.hva, r.size) for r in vm.info.ram], cfg.sample_pages)

        def on_partial(touched: int, sampled: int) -> None:
            active = est.observe_partial(touched, sampled)
            partials.append({"t_s": round(time.monotonic() - t0, 2), "touched": touched,
                             "sampled": sampled, "in_period": _frac(est.in_period),
                             "max": _frac(active)})

        try:
            while (start := time.monotonic() - t0) < cfg.duration_s:
                res = await sampler.period(cfg.period_s, vm_clock=lambda: clock.seconds,
                                           on_partial=on_partial)
                if res.discarded is None:
                    est.update(res.touched, res.sampled)
                else:
                    est.clear_partial()
                end = time.monotonic() - t0
                periods.append({
                    "start_s": round(start, 2), "end_s": round(end, 2), "touched": res.touched,
                    "sampled": res.sampled, "dropped": res.dropped, "sampleable": res.sampleable,
                    "present": res.present, "vm_s": round(res.vm_s or 0.0, 2),
                    "discarded": res.discarded, "sample": _frac(res.fraction),
                    "fast": _frac(est.fast), "slow": _frac(est.slow), "max": _frac(est.active_fraction)})
                progress(f"  t={end:5.0f} s  ws {_ws_at(changes, end)} MiB  sample "
                         f"{res.touched}/{res.sampled}  fast {est.fast or 0:.2f}  slow "
                         f"{est.slow or 0:.2f}  max {est.active_fraction:.2f}")
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return SamplingResult(report.jsonable(cfg), changes, periods, partials)


async def run(cfg: SamplingConfig, progress: Progress = lambda s: None) -> SamplingResult:
    refuse_if_daemon("running the sampling benchmark (it samples the guest itself)")
    check_can_sample()
    plan = GuestPlan(cfg.name, cfg.mem_bytes, "toucher",
                     (("alloc_mib", str(cfg.alloc_mib)), ("ws", cfg.schedule)))
    progress(f"booting {cfg.name} ({cfg.mem_bytes // MiB} MiB), toucher ws={cfg.schedule}; "
             f"{cfg.duration_s:.0f} s of {cfg.period_s:g} s periods, {cfg.sample_pages} pages each")
    async with Fleet([plan], progress) as fleet:
        result = await _measure(cfg, fleet.vms[0].socket, progress)
    result.phases = analyse(result, cfg.period_s)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result.data = cfg.out_dir / "sampling.json"
    result.plot = cfg.out_dir / "sampling.png"
    report.write_json(result.data, {
        "config": result.config, "track_points": TRACK_POINTS, "shapes_hold": result.shapes_hold,
        "phases": result.phases, "changes": result.changes, "periods": result.periods,
        "partials": result.partials})
    save_plot(result)
    return result


# -- analysis (pure) -----------------------------------------------------------------
def _ws_at(changes: list[tuple[float, int]], t_s: float) -> int:
    ws = changes[0][1]
    for at, mib in changes:
        if at <= t_s:
            ws = mib
    return ws


def _median_sampleable(periods: list[dict[str, Any]]) -> int:
    """The sampleable pages of a typical period (they drift as the sample swaps pages out)."""
    return sorted(p["sampleable"] for p in periods)[len(periods) // 2] if periods else 0


def _truth(ws_mib: int, sampleable: int) -> float:
    return min(1.0, ws_mib * MiB / (max(sampleable, 1) * PAGE_SIZE))


def analyse(result: SamplingResult, period_s: float) -> list[dict[str, Any]]:
    """Tracking error and lag per phase, and whether the issue's shapes hold."""
    good = [p for p in result.periods if p["discarded"] is None and p["sampleable"]]
    sampleable = _median_sampleable(good)
    points = ([(p["end_s"], p["max"], p["sampleable"]) for p in good]
              + [(q["t_s"], q["max"], sampleable) for q in result.partials])
    points.sort()
    ends = [t for t, _ in result.changes[1:]] + [math.inf]
    out = []
    for i, (start, ws) in enumerate(result.changes):
        end = ends[i]
        prev_ws = result.changes[i - 1][1] if i else None
        in_phase = [(t, m, s) for t, m, s in points if start <= t < end]
        truth = _truth(ws, sampleable)
        # Steady state: the periods that began in the second half of the phase.
        last = end if math.isfinite(end) else max((p["end_s"] for p in good), default=start)
        steady = [p for p in good if p["start_s"] >= start + (last - start) / 2 and p["end_s"] <= end]
        errs = [100 * abs(p["max"] - _truth(ws, p["sampleable"])) for p in steady]
        fast_errs = [100 * abs(p["fast"] - _truth(ws, p["sampleable"])) for p in steady]
        lag = next((t - start for t, m, s in in_phase if abs(m - _truth(ws, s)) * 100 <= TRACK_POINTS), None)
        phase: dict[str, Any] = {
            "phase": i + 1, "ws_mib": ws, "start_s": round(start, 2),
            "end_s": round(end, 2) if math.isfinite(end) else None,
            "truth_pct": round(100 * truth, 1), "steady_periods": len(steady),
            "steady_mean_err_pts": round(sum(errs) / len(errs), 1) if errs else None,
            "steady_worst_err_pts": round(max(errs), 1) if errs else None,
            "steady_fast_mean_err_pts": round(sum(fast_errs) / len(fast_errs), 1) if fast_errs else None,
            "lag_to_within_s": round(lag, 1) if lag is not None else None,
            "direction": "first" if prev_ws is None else "up" if ws > prev_ws else "down"}
        holds = bool(errs) and max(errs) <= TRACK_POINTS
        misses = [] if holds else [f"steady-state error above {TRACK_POINTS:g} points"
                                   if errs else "no steady-state period"]
        if prev_ws is not None and ws > prev_ws:
            before = _truth(prev_ws, sampleable)
            half = before + (truth - before) / 2
            rise = next((t - start for t, m, _ in in_phase if m >= half), None)
            phase["lag_half_step_s"] = round(rise, 1) if rise is not None else None
            if rise is None or rise > period_s:
                misses.append("growth not followed within one period (half the step)")
        phase["misses"] = misses
        phase["shapes_hold"] = not misses
        out.append(phase)
    return out


# -- output --------------------------------------------------------------------------
def format_result(result: SamplingResult) -> str:
    def opt(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v}{unit}"

    rows = [[p["phase"], p["ws_mib"], p["direction"], f"{p['truth_pct']}%", p["steady_periods"],
             opt(p["steady_mean_err_pts"]), opt(p["steady_worst_err_pts"]),
             opt(p["steady_fast_mean_err_pts"]), opt(p["lag_to_within_s"], " s"),
             opt(p.get("lag_half_step_s"), " s"), "yes" if p["shapes_hold"] else "MISSED"]
            for p in result.phases]
    text = table(rows, ["PHASE", "WS-MiB", "DIR", "TRUTH", "STEADY-N", "MAX-ERR-PTS",
                        "MAX-WORST-PTS", "FAST-ERR-PTS", "LAG-TO-15PTS", "LAG-HALF-STEP",
                        "SHAPES"])
    notes = [f"phase {p['phase']} ({p['ws_mib']} MiB, {p['direction']}): {'; '.join(p['misses'])}"
             for p in result.phases if p["misses"]]
    return "\n".join([text, *notes])


def save_plot(result: SamplingResult) -> None:
    plt = report.pyplot()
    good = [p for p in result.periods if p["discarded"] is None]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    # the true working set, changing when the toucher said so, in % of the (median)
    # sampleable memory
    sampleable = _median_sampleable(good)
    ts = [t for t, _ in result.changes] + [max((p["end_s"] for p in good), default=0.0)]
    truth = [100 * _truth(mib, sampleable) for _, mib in result.changes]
    ax.step(ts, truth + truth[-1:], where="post", color="black", lw=2, label="true working set")
    ends = [p["end_s"] for p in good]
    ax.plot(ends, [100 * p["fast"] for p in good], "--", color="tab:orange", label="fast average")
    ax.plot(ends, [100 * p["slow"] for p in good], ":", color="tab:green", lw=2, label="slow average")
    ip = [q for q in result.partials if q["in_period"] is not None]
    ax.plot([q["t_s"] for q in ip], [100 * q["in_period"] for q in ip], ".", ms=3,
            color="tab:purple", alpha=0.6, label="in-period estimate (each poll)")
    mx = sorted([(p["end_s"], p["max"]) for p in good] + [(q["t_s"], q["max"]) for q in result.partials])
    ax.plot([t for t, _ in mx], [100 * m for _, m in mx], color="tab:blue", lw=1.2,
            label="max (hv's active fraction)")
    ax.plot(ends, [100 * p["sample"] for p in good], "o", mfc="none", color="tab:red",
            label="sampled: touched / sampled")
    for t, _ in result.changes[1:]:
        ax.axvline(t, color="grey", lw=0.5)
    cfg = result.config
    ax.set(xlabel="seconds since the toucher's fill", ylabel="% of sampleable guest memory",
           ylim=(0, 105),
           title=(f"Working-set sampling (cf. ESX Fig. 6): {cfg['sample_pages']} pages per "
                  f"{cfg['period_s']:g} s period, toucher {cfg['phases_mib']} MiB"))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
