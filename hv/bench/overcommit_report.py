"""``hv bench overcommit``'s analysis, table and plot (pure: a finished run's record in,
numbers, text and a PNG out).

**Free memory held** (the issue's shape): in the ``hv`` series, MemAvailable is at or
above hv's low threshold (1 % of the host) at every sample of the schedule except the
first :data:`GRACE_S` seconds of each burst, counted from when the locker finished
locking.  The locker itself takes MemAvailable to 0.8 % in the low burst, and hv
needs a few ticks to see it, inflate balloons (a TCG guest gives a few hundred MiB/s)
and page out (64 MiB per VM per tick): 15 s is that with room for a slow guest (a
third to a half of a burst of the default 3-minute schedule).

**Shape** (exit 3 if missed), judged on the ``hv`` series only: free memory held as
above; no guest OOM-killed; every burst takes hv out of high, and hv brings the host
out of the burst's worst state within the burst; the VMs' resident memory is lower at
the end of the deepest burst than before the pressure; their targets rise again after
the release; no VM is left paused.  The baselines (``balloon``, ``none``) are
reported beside it, not judged: the same free-memory numbers, the touchers'
throughput per phase, OOM kills and VMs left paused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv.bench import report
from hv.units import MiB, table

__all__ = ["OvercommitResult", "analyse", "format_result", "save_plot", "GRACE_S",
           "phase_rate"]

GRACE_S = 15.0
FALL_MIB = 128  # the VMs gave up memory under pressure: far above tick-to-tick noise
RISE_MIB = 128  # and got it back after the release
RATE_WINDOW_S = 10.0  # the plot's throughput: passes over this many seconds
_RANK = {"high": 0, "soft": 1, "hard": 2, "low": 3}
STATE_COLORS = {"high": "#d8f0d8", "soft": "#fff2b3", "hard": "#ffd0a0", "low": "#ffb0b0"}
SERIES_COLORS = {"hv": "black", "balloon": "tab:blue", "none": "tab:red"}


@dataclass
class OvercommitResult:
    config: dict[str, Any]
    # per series: reclaim, phases (name, level, above-min, locked, start_s, end_s, ...),
    # samples (t_s, free_bytes, vms {name: [resident, swapped]}, passes {name: n}),
    # ticks/states/actions (hv's, empty without hv), oom_kills {name: n}
    series: dict[str, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    plot: Path = Path()
    data: Path = Path()

    @property
    def complete(self) -> bool:
        return not self.summary.get("misses")


# -- analysis ------------------------------------------------------------------------
def _state_at(states: list[tuple[float, str]], t_s: float, before: str = "high") -> str:
    state = before
    for t, s in states:
        if t > t_s:
            break
        state = s
    return state


def _spans(states: list[tuple[float, str]], end_s: float) -> list[tuple[float, float, str]]:
    """(from, to, state) over the schedule, from the state changes."""
    marks = [(0.0, _state_at(states, 0.0))]
    marks += [(t, s) for t, s in states if 0 < t < end_s]
    return [(t, nxt[0], s) for (t, s), nxt in zip(marks, marks[1:] + [(end_s, "")])]


def _last_before(rows: list[dict[str, Any]], t_s: float) -> dict[str, Any] | None:
    got = [r for r in rows if r["t_s"] <= t_s]
    return got[-1] if got else None


def _target_total(ticks: list[dict[str, Any]], t_s: float) -> int | None:
    last: dict[str, int] = {}
    for t in ticks:
        if t["t_s"] <= t_s and t.get("target_bytes") is not None:
            last[t["vm"]] = t["target_bytes"]
    return sum(last.values()) if last else None


def phase_rate(samples: list[dict[str, Any]], vm: str, a: float, b: float) -> float | None:
    """The toucher's passes per (host) second between ``a`` and ``b``: a paused or
    starved guest counts as the time it lost."""
    got = [(s["t_s"], s["passes"].get(vm)) for s in samples
           if a <= s["t_s"] <= b and s["passes"].get(vm) is not None]
    if len(got) < 2 or got[-1][0] <= got[0][0]:
        return None
    return round((got[-1][1] - got[0][1]) / (got[-1][0] - got[0][0]), 3)


def _mib(v: float | None) -> float | None:
    return None if v is None else round(v / MiB, 1)


def _held(series: dict[str, Any], low_bytes: float) -> dict[str, Any]:
    """Free memory outside each burst's first GRACE_S: lowest, and time under ``low_bytes``."""
    graces = [(p["start_s"], p["start_s"] + GRACE_S) for p in series["phases"]
              if p["level_pct"] is not None]
    samples = series["samples"]
    judged = [s for s in samples if not any(a <= s["t_s"] < b for a, b in graces)]
    ids = {id(s) for s in judged}
    below_s, first = 0.0, None
    for s, nxt in zip(samples, samples[1:]):
        if id(s) in ids and s["free_bytes"] < low_bytes:
            below_s += nxt["t_s"] - s["t_s"]
            first = s["t_s"] if first is None else first
    lowest = min(judged, key=lambda s: s["free_bytes"], default=None)
    return {"min_free_mib": None if lowest is None else _mib(lowest["free_bytes"]),
            "min_free_at_s": None if lowest is None else lowest["t_s"],
            "below_low_s": round(below_s, 1), "first_below_low_s": first}


def _phase_rows(series: dict[str, Any], active: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in series["phases"]:
        a, b = p["start_s"], p["end_s"]
        inside = [s for s in series["samples"] if a <= s["t_s"] <= b]
        end = _last_before(series["samples"], b)
        row: dict[str, Any] = {
            "phase": p["phase"], "start_s": a, "end_s": b,
            "above_min_mib": _mib(p.get("above_min_bytes")), "locked_mib": _mib(p["locked_bytes"]),
            "covered": p.get("covered"),
            "free_min_mib": _mib(min((s["free_bytes"] for s in inside), default=None)),
            "free_end_mib": None if end is None else _mib(end["free_bytes"]),
            "resident_mib": None if end is None else _mib(sum(v[0] for v in end["vms"].values())),
            "swap_mib": None if end is None else _mib(sum(v[1] for v in end["vms"].values())),
            "passes_per_s": {n: phase_rate(series["samples"], n, a, b) for n in active}}
        if series["ticks"]:
            states = series["states"]
            seen = [_state_at(states, a)] + [s for t, s in states if a < t <= b]
            row.update(worst=max(seen, key=lambda s: _RANK[s]), at_end=_state_at(states, b),
                       target_mib=_mib(_target_total(series["ticks"], b)))
        rows.append(row)
    return rows


def _hv_misses(s: dict[str, Any], series: dict[str, Any], low_mib: float) -> list[str]:
    misses = []
    if s["held"]["below_low_s"] > 0:
        misses.append(f"free memory under the low threshold ({low_mib:.0f} MiB) for "
                      f"{s['held']['below_low_s']:g} s outside the bursts' first {GRACE_S:g} s "
                      f"(lowest {s['held']['min_free_mib']} MiB at t={s['held']['min_free_at_s']} s)")
    if s["oom_kills"]:
        misses.append(f"guest OOM kills: {s['oom_kills']}")
    rows = s["phases"]
    bursts = [(r, p) for r, p in zip(rows, series["phases"]) if p["level_pct"] is not None]
    for r, _ in bursts:
        if "worst" not in r:
            continue
        if r["worst"] == "high":
            misses.append(f"phase {r['phase']}: the locker's pressure never took hv out of high")
        elif _RANK[r["at_end"]] >= _RANK[r["worst"]]:
            misses.append(f"phase {r['phase']}: still {r['at_end']} at its end (worst "
                          f"{r['worst']}): reclamation did not bring the host back")
    if bursts:
        before, deepest, last = rows[0], bursts[-1][0], rows[-1]
        if before["resident_mib"] is None or deepest["resident_mib"] is None or \
                before["resident_mib"] - deepest["resident_mib"] < FALL_MIB:
            misses.append(f"the VMs' resident memory did not fall by {FALL_MIB} MiB under "
                          f"pressure ({before['resident_mib']} -> {deepest['resident_mib']} MiB)")
        if deepest.get("target_mib") is None or last.get("target_mib") is None or \
                last["target_mib"] - deepest["target_mib"] < RISE_MIB:
            misses.append(f"the VMs' targets did not rise by {RISE_MIB} MiB after the release "
                          f"({deepest.get('target_mib')} -> {last.get('target_mib')} MiB)")
    if s["paused_at_end"]:
        misses.append(f"left paused at the end: {', '.join(s['paused_at_end'])}")
    return misses


def analyse(result: OvercommitResult) -> dict[str, Any]:
    """Per series and phase: free memory, the touchers' throughput, the VMs' memory,
    hv's states; per series: free memory held, OOM kills, VMs left paused, time in
    each state; and the shape's misses (the ``hv`` series)."""
    cfg = result.config
    total = cfg.get("mem_total_bytes", 0)
    low_bytes = total * cfg.get("thresholds_pct", {}).get("low_pct", 1.0) / 100
    active = cfg.get("active", [])
    out: dict[str, Any] = {"low_threshold_mib": _mib(low_bytes), "grace_s": GRACE_S,
                           "series": {}, "misses": []}
    for kind, series in result.series.items():
        s: dict[str, Any] = {"phases": _phase_rows(series, active),
                             "held": _held(series, low_bytes),
                             "oom_kills": sum(series.get("oom_kills", {}).values())}
        final: dict[str, dict[str, Any]] = {}
        for t in series["ticks"]:
            final[t["vm"]] = t
        s["paused_at_end"] = sorted(n for n, t in final.items() if t.get("paused_by_hv"))
        pressure = [r for r, p in zip(s["phases"], series["phases"]) if p["level_pct"] is not None]
        s["bursts_passes_per_s"] = {
            n: phase_rate(series["samples"], n, pressure[0]["start_s"], pressure[-1]["end_s"])
            if pressure else None for n in active}
        s["before_passes_per_s"] = s["phases"][0]["passes_per_s"] if s["phases"] else {}
        if series["ticks"]:
            end_s = series["phases"][-1]["end_s"] if series["phases"] else 0.0
            time_in: dict[str, float] = {}
            for a, b, state in _spans(series["states"], end_s):
                time_in[state] = round(time_in.get(state, 0.0) + b - a, 1)
            s["time_in_state_s"] = time_in
        out["series"][kind] = s
        if kind == "hv":
            out["misses"] += _hv_misses(s, series, low_bytes / MiB)
    return out


# -- output --------------------------------------------------------------------------
def _num(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def format_result(result: OvercommitResult) -> str:
    s = result.summary
    active = result.config.get("active", [])
    short = [n.rsplit("-", 1)[-1] for n in active]
    out = []
    for kind, ss in s["series"].items():
        hv = "worst" in (ss["phases"][0] if ss["phases"] else {})
        rows = [[r["phase"], f"{r['start_s']:.0f}-{r['end_s']:.0f}", _num(r["above_min_mib"]),
                 _num(r["locked_mib"]), {None: "", True: "yes", False: "NO"}[r["covered"]],
                 *([r["worst"], r["at_end"]] if hv else []), _num(r["free_min_mib"]),
                 _num(r["free_end_mib"]), _num(r["resident_mib"]), _num(r["swap_mib"]),
                 *[_num(r["passes_per_s"].get(n)) for n in active]] for r in ss["phases"]]
        head = ["PHASE", "SECONDS", "ABOVE-MIN-MiB", "LOCKED-MiB", "COVERED",
                *(["WORST", "AT-END"] if hv else []), "FREE-MIN-MiB", "FREE-END-MiB",
                "RESIDENT-MiB", "SWAPPED-MiB", *[f"{x.upper()}-PASSES/S" for x in short]]
        out += [f"series {kind} (" + {"balloon+swap": "hv run", "balloon": "hv run, reclaim = "
                "balloon", None: "no hv: host swap alone"}.get(
                    result.series[kind].get("reclaim"), "?") + ")", table(rows, head)]
        if "time_in_state_s" in ss:
            out.append("time in each state: " + ", ".join(
                f"{k} {v:g} s" for k, v in ss["time_in_state_s"].items()))
        acts = result.series[kind].get("actions") or {}
        if acts:
            out.append("actions: " + ", ".join(f"{n}: " + " ".join(f"{k} {v}" for k, v in a.items())
                                               for n, a in acts.items()))
    rows = [[kind, _num(ss["held"]["min_free_mib"]), _num(ss["held"]["below_low_s"]),
             *[_num(ss["before_passes_per_s"].get(n)) + " -> " + _num(ss["bursts_passes_per_s"].get(n))
               for n in active],
             ss["oom_kills"], ", ".join(ss["paused_at_end"]) or "-"]
            for kind, ss in s["series"].items()]
    out += [f"series side by side (free memory judged outside each burst's first "
            f"{s['grace_s']:g} s; low threshold {s['low_threshold_mib']} MiB):",
            table(rows, ["SERIES", "MIN-FREE-MiB", "S-UNDER-LOW",
                         *[f"{x.upper()}-PASSES/S-BEFORE->BURSTS" for x in short],
                         "GUEST-OOM-KILLS", "LEFT-PAUSED"])]
    if "hv" not in s["series"]:
        out.append("no hv series: nothing judged")
    elif not s["misses"]:
        out.append("shape holds: free memory held at or above the low threshold, no guest "
                   "OOM-killed; every burst left high and hv brought the host back; memory "
                   "came back after the release")
    else:
        out.append("MISSED: " + "; ".join(s["misses"]))
    return "\n".join(out)


def _rates(samples: list[dict[str, Any]], vm: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    j = 0
    pts = [(s["t_s"], s["passes"].get(vm)) for s in samples if s["passes"].get(vm) is not None]
    for i, (t, n) in enumerate(pts):
        while pts[j][0] < t - RATE_WINDOW_S:
            j += 1
        if i > j and t > pts[j][0]:
            xs.append(t)
            ys.append((n - pts[j][1]) / (t - pts[j][0]))
    return xs, ys


def save_plot(result: OvercommitResult) -> None:
    plt = report.pyplot()
    cfg = result.config
    names = list(cfg.get("vms", {})) or sorted(
        {n for ser in result.series.values() for s in ser["samples"] for n in s["vms"]})
    main = result.series.get("hv") or next(iter(result.series.values()))
    main_kind = next((k for k, v in result.series.items() if v is main), "")
    fig, axes = plt.subplots(2 + len(names), 1, figsize=(12, 5 + 2.2 * len(names)), sharex=True,
                             layout="constrained")
    end_s = main["phases"][-1]["end_s"] if main["phases"] else 0.0
    for since, until, state in _spans(main["states"], end_s) if main["ticks"] else []:
        for ax in axes:
            ax.axvspan(since, until, color=STATE_COLORS.get(state, "white"), lw=0)
    top, mid = axes[0], axes[1]
    for kind, ser in result.series.items():
        xs = [s["t_s"] for s in ser["samples"]]
        top.plot(xs, [s["free_bytes"] / MiB for s in ser["samples"]],
                 color=SERIES_COLORS.get(kind, "grey"), lw=1.2, label=f"{kind}: free memory")
        before = result.summary.get("series", {}).get(kind, {}).get("before_passes_per_s", {})
        for n, style in zip(cfg.get("active", []), ("--", "-")):
            rx, ry = _rates(ser["samples"], n)
            base = before.get(n) or 0.0
            if base > 0:  # each toucher against its own rate before the pressure
                mid.plot(rx, [100 * y / base for y in ry], style,
                         color=SERIES_COLORS.get(kind, "grey"), lw=1, label=f"{kind}: {n}")
    low = result.summary.get("low_threshold_mib")
    if low:
        top.axhline(low, color="tab:red", lw=0.8, ls=":", label="hv's low threshold")
    rest = cfg.get("rest_pct", 0) * cfg.get("mem_total_bytes", 0) / 100 / MiB
    if rest:  # the co-tenant's release at the end would squash the rest out of sight
        top.set_ylim(0, 1.5 * rest)
    for p in main["phases"]:
        for ax in axes:
            ax.axvline(p["start_s"], color="grey", lw=0.6)
        top.text(p["start_s"], 0.97, f" {p['phase']}", fontsize=8, va="top",
                 transform=top.get_xaxis_transform())
    top.legend(fontsize=7, loc="upper right", ncol=4)
    top.set(ylabel="MiB", ylim=(0, top.get_ylim()[1] if rest else None),
            title=f"Overcommit (cf. ESX Fig. 8): host free memory (MemAvailable) per series; "
            f"bands: {main_kind} series' hv state ({', '.join(STATE_COLORS)})")
    top.title.set_fontsize(9)
    mid.set(ylabel="% of before", ylim=(0, None), title="active VMs' throughput (toucher passes "
            f"per second over {RATE_WINDOW_S:g} s) as % of its rate before the pressure, per series")
    mid.title.set_fontsize(9)
    mid.legend(fontsize=7, loc="upper right", ncol=3)
    for ax, name in zip(axes[2:], names):
        ticks = [t for t in main["ticks"] if t["vm"] == name]
        if ticks:
            x = [t["t_s"] for t in ticks]
            for key, style, label in (("target_bytes", "--", "target"), ("balloon_bytes", ":", "balloon"),
                                      ("resident_bytes", "-", "resident"), ("swap_bytes", "-.", "swapped")):
                ax.plot(x, [(t[key] or 0) / MiB for t in ticks], style, label=label)
        else:
            x = [s["t_s"] for s in main["samples"]]
            for i, style, label in ((0, "-", "resident"), (1, "-.", "swapped")):
                ax.plot(x, [s["vms"].get(name, [0, 0])[i] / MiB for s in main["samples"]],
                        style, label=label)
        info = cfg.get("vms", {}).get(name, {})
        ax.set(ylabel="MiB", title=f"{main_kind} series, {name}: {info.get('workload', '')}, "
               f"{info.get('mib', '?')} MiB, {info.get('shares', '?')} shares", ylim=(0, None))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper right", ncol=4)
    axes[-1].set(xlabel="seconds since the first pressure phase began")
    fig.savefig(result.plot, dpi=80)
    plt.close(fig)
