"""The soak's figures and verdicts, from what the driver recorded (pure: no host access).

The driver (:mod:`tests.soak.driver`) records raw observations; this module turns them
into the report's figures and checks the promises of issue 10:

- **ticks on time**: the daemon publishes its status at the end of every tick, so the
  interval between two publications is one tick.  A tick is *late* when the interval
  exceeds twice the poll interval.  A late tick is *excused* only when the host itself
  took at least the lateness away from hv during that interval: the kernel's memory
  pressure stall ("full": every runnable task stalled on memory, ``/proc/pressure``)
  or the run-queue wait of hv's event-loop thread (``/proc/PID/task/PID/schedstat``).
- **no guest lost**: every guest the soak killed came back and was managed again, and
  no guest died that the soak did not kill.
- **no guest paused by mistake**: hv pauses only in the low state, releases its pauses
  within :data:`PAUSE_RELEASE_S` of leaving it, and leaves no guest paused when it stops.
- **no guest OOM-killed**: no guest console shows the kernel's OOM killer or a
  workload that died.
- **RSS and open fds flat**: after a warm-up, the last third of the samples is not
  above the first third by more than :data:`RSS_TOLERANCE_BYTES` / :data:`FD_TOLERANCE`.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024

# hv resumes what it paused in the first tick after the state leaves low (its act
# runs before the tick's line is written); 5 s is five 1 s ticks of slack for a
# loaded host, far below the minutes a forgotten pause would show.
PAUSE_RELEASE_S = 5.0

# Python's heap settles within the warm-up; 16 MiB is ~20 % of hv's ~80 MiB RSS and
# far below the ~100 MiB/h that a leak of one tick's objects would show.
RSS_TOLERANCE_BYTES = 16 * MiB

# Open fds: one QMP connection per VM, plus pidfds and /proc files while a tick runs
# and a reconnect in flight after a kill.  Those come and go, so the fewest open in the
# last third is compared with the fewest in the first: a leak raises the floor (one fd
# per tick or per kill shows as tens to hundreds), a sample taken mid-tick does not.
FD_TOLERANCE = 4

# The first part of a run is not judged for growth: imports, caches, the first
# sampling periods and the first time in every state fill hv's heap once.
WARMUP_FRACTION = 0.2

# Failures of a killed VM's jobs are expected from this long before its SIGKILL (a job
# already running) until this long after hv re-attached it.
KILL_GRACE_S = 5.0

OOM_MARKERS = re.compile(r"Out of memory|oom-kill|invoked oom-killer")
WORKLOAD_DIED = re.compile(r"event=workload_exit workload=(\S+) status=(?!0\b)(\d+)")

FAILURE_EVENTS = ("act_failed", "collect_failed", "sample_failed", "share_failed",
                  "sampler_stopped", "ksm_restore_failed", "reattach_refused", "reload_refused",
                  "ksm_unavailable", "force_state_ignored")


@dataclass(frozen=True)
class StallSample:
    """One look at the host by the driver's poller."""

    t: float  # wall clock, s
    mem_full_us: int  # /proc/pressure/memory "full" total
    hv_runq_ns: int  # hv's event-loop thread: time waiting on a run queue


@dataclass(frozen=True)
class ResourceSample:
    t: float
    rss_bytes: int  # anonymous memory, resident or swapped: where a leak shows
    fds: int
    cpu_s: float  # hv's user + system time
    log_bytes: int
    file_rss_bytes: int = 0  # mapped files and shared memory, resident


@dataclass(frozen=True)
class Kill:
    vm: str
    t_kill: float
    t_gone: float | None  # hv logged vm_gone
    t_relaunched: float | None
    t_reattached: float | None  # hv logged vm_reattached


def _at_or_before(samples: Sequence[StallSample], t: float) -> StallSample | None:
    best = None
    for s in samples:
        if s.t <= t:
            best = s
        else:
            break
    return best


def _at_or_after(samples: Sequence[StallSample], t: float) -> StallSample | None:
    for s in samples:
        if s.t >= t:
            return s
    return None


def late_ticks(tick_times: Sequence[float], poll_interval_s: float,
               stalls: Sequence[StallSample]) -> dict[str, Any]:
    """Intervals between ticks over 2x the poll interval, each with the host's stall."""
    times = sorted(tick_times)
    late: list[dict[str, Any]] = []
    for a, b in zip(times, times[1:]):
        gap = b - a
        if gap <= 2 * poll_interval_s:
            continue
        lateness = gap - 2 * poll_interval_s
        before, after = _at_or_before(stalls, a), _at_or_after(stalls, b)
        mem_s = runq_s = None
        if before is not None and after is not None:
            mem_s = (after.mem_full_us - before.mem_full_us) / 1e6
            runq_s = (after.hv_runq_ns - before.hv_runq_ns) / 1e9
        stalled = max(mem_s or 0.0, runq_s or 0.0)
        late.append({"at": a, "interval_s": round(gap, 3), "delay_s": round(gap - poll_interval_s, 3),
                     "host_mem_full_stall_s": None if mem_s is None else round(mem_s, 3),
                     "hv_runqueue_wait_s": None if runq_s is None else round(runq_s, 3),
                     "excused": stalled >= lateness})
    gaps = [b - a for a, b in zip(times, times[1:])]
    unexcused = [x for x in late if not x["excused"]]
    return {
        "ticks": len(times),
        "interval_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "interval_max_s": round(max(gaps), 3) if gaps else None,
        "late": len(late),
        "late_excused": len(late) - len(unexcused),
        "late_unexcused": len(unexcused),
        "worst_delay_s": max((float(x["delay_s"]) for x in late), default=0.0),
        "worst_unexcused_delay_s": max((float(x["delay_s"]) for x in unexcused), default=0.0),
        "late_list": late,
    }


def failures(events: Iterable[dict[str, Any]], kills: Sequence[Kill]) -> dict[str, Any]:
    """Failed actions and collections, split into those a kill explains and the rest."""
    def explained(e: dict[str, Any]) -> bool:
        for k in kills:
            end = k.t_reattached if k.t_reattached is not None else float("inf")
            # Events about one VM name it in "vm"; the sharing scan's name it in the error.
            about = e.get("vm") == k.vm or ("vm" not in e and f"{k.vm}:" in str(e.get("error")))
            if about and k.t_kill - KILL_GRACE_S <= e["ts"] <= end + KILL_GRACE_S:
                return True
        return False

    counts: dict[str, int] = {}
    unexplained = []
    for e in events:
        if e.get("event") not in FAILURE_EVENTS:
            continue
        counts[e["event"]] = counts.get(e["event"], 0) + 1
        if not explained(e):
            unexplained.append(e)
    return {"by_event": counts, "total": sum(counts.values()),
            "unexplained": len(unexplained), "unexplained_list": unexplained[:20]}


def pauses(events: Sequence[dict[str, Any]], still_paused: Sequence[str]) -> dict[str, Any]:
    """hv's pauses: in which state, how long each lasted beyond the low state."""
    state = "high"
    paused_since: dict[str, float] = {}
    out_of_low_since: float | None = None
    mistakes: list[dict[str, Any]] = []
    longest_s = 0.0
    n_pause = n_resume = 0
    for e in events:
        kind = e.get("event")
        if kind == "state":
            state = e["state"]
            out_of_low_since = None if state == "low" else e["ts"]
        elif kind == "pause":
            n_pause += 1
            paused_since[e["vm"]] = e["ts"]
            if state != "low":
                mistakes.append({"vm": e["vm"], "at": e["ts"], "why": f"paused in state {state}"})
        elif kind in ("resume", "resumed_by_other", "vm_gone"):
            n_resume += kind == "resume"
            since = paused_since.pop(e["vm"], None)
            if since is not None:
                longest_s = max(longest_s, e["ts"] - since)
        elif kind == "tick" and e.get("paused_by_hv") and out_of_low_since is not None:
            if e["ts"] - out_of_low_since > PAUSE_RELEASE_S and not any(
                    m["vm"] == e["vm"] and m["why"].startswith("still") for m in mistakes):
                mistakes.append({"vm": e["vm"], "at": e["ts"],
                                 "why": f"still paused {e['ts'] - out_of_low_since:.1f} s "
                                        f"after the state left low"})
    for vm in still_paused:
        mistakes.append({"vm": vm, "at": None, "why": "paused after hv stopped"})
    return {"pauses": n_pause, "resumes": n_resume, "longest_pause_s": round(longest_s, 1),
            "mistakes": mistakes}


def console_problems(consoles: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Per guest, the OOM killer's traces and workloads that died, from its console logs."""
    out: dict[str, list[str]] = {}
    for vm, texts in consoles.items():
        found = []
        for text in texts:
            found += [m.group(0) for m in OOM_MARKERS.finditer(text)]
            found += [f"workload {w} exited with status {s}" for w, s in WORKLOAD_DIED.findall(text)]
        if found:
            out[vm] = found
    return out


def growth(samples: Sequence[ResourceSample], t_warm: float | None = None) -> dict[str, Any]:
    """RSS and fds: first third against last third, after the warm-up (``t_warm``, or
    :data:`WARMUP_FRACTION` of the run, whichever is later)."""
    if len(samples) < 6:
        return {"judged": False, "why": f"only {len(samples)} samples"}
    t0, t1 = samples[0].t, samples[-1].t
    start = max(t0 + WARMUP_FRACTION * (t1 - t0), t_warm or t0)
    judged = [s for s in samples if s.t >= start]
    if len(judged) < 6:
        return {"judged": False, "why": f"only {len(judged)} samples after the warm-up"}
    third = max(1, len(judged) // 3)
    first, last = judged[:third], judged[-third:]
    rss_growth = statistics.median(s.rss_bytes for s in last) - statistics.median(s.rss_bytes for s in first)
    fd_growth = min(s.fds for s in last) - min(s.fds for s in first)
    hours = (t1 - t0) / 3600 or 1.0
    cpu = (samples[-1].cpu_s - samples[0].cpu_s) / (t1 - t0) * 100 if t1 > t0 else 0.0
    thirds = []
    for part in (samples[: len(samples) // 3], samples[len(samples) // 3: 2 * len(samples) // 3],
                 samples[2 * len(samples) // 3:]):
        if len(part) >= 2 and part[-1].t > part[0].t:
            thirds.append(round((part[-1].cpu_s - part[0].cpu_s) / (part[-1].t - part[0].t) * 100, 2))
    return {
        "judged": True, "warm_up_s": round(start - t0, 1),
        "rss_start_mib": round(judged[0].rss_bytes / MiB, 1),
        "rss_end_mib": round(samples[-1].rss_bytes / MiB, 1),
        "rss_max_mib": round(max(s.rss_bytes for s in samples) / MiB, 1),
        "rss_growth_mib": round(rss_growth / MiB, 2),
        "rss_flat": rss_growth <= RSS_TOLERANCE_BYTES,
        "file_rss_start_mib": round(judged[0].file_rss_bytes / MiB, 1),
        "file_rss_end_mib": round(samples[-1].file_rss_bytes / MiB, 1),
        "fds_min": min(s.fds for s in samples), "fds_max": max(s.fds for s in samples),
        "fds_end": samples[-1].fds, "fd_growth": fd_growth,
        "fds_flat": fd_growth <= FD_TOLERANCE,
        "cpu_pct_of_core": round(cpu, 2), "cpu_pct_by_third": thirds,
        "log_bytes_end": samples[-1].log_bytes,
        "log_mib_per_hour": round((samples[-1].log_bytes - samples[0].log_bytes) / MiB / hours, 1),
    }


def state_time(events: Sequence[dict[str, Any]], t_start: float, t_end: float) -> dict[str, float]:
    """Seconds spent in each state."""
    out = {"high": 0.0, "soft": 0.0, "hard": 0.0, "low": 0.0}
    state, since = "high", t_start
    for e in events:
        if e.get("event") == "state":
            out[state] += max(0.0, e["ts"] - since)
            state, since = e["state"], e["ts"]
    out[state] += max(0.0, t_end - since)
    return {k: round(v, 1) for k, v in out.items()}


def action_counts(events: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = {k: 0 for k in ("balloon", "swap", "pause", "resume", "sample", "vm_gone",
                             "vm_reattached", "reload", "ksm_raised", "ksm_restored")}
    for e in events:
        if e.get("event") in counts:
            counts[e["event"]] += 1
    return counts


def promises(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each promise of the soak, kept or not, with what decided it."""
    r = report
    lost = r["guests"]["lost"]
    growth_ = r["hv"]["resources"]
    out = {
        "no_guest_lost": {"ok": not lost, "detail": lost},
        "no_guest_paused_by_mistake": {"ok": not r["pauses"]["mistakes"],
                                       "detail": r["pauses"]["mistakes"]},
        "no_guest_oom_killed": {"ok": not r["guests"]["console_problems"],
                                "detail": r["guests"]["console_problems"]},
        "ticks_on_time_unless_host_stalled": {
            "ok": r["ticks"]["late_unexcused"] == 0,
            "detail": f"{r['ticks']['late_unexcused']} late ticks the host's stall does not explain, "
                      f"worst {r['ticks']['worst_unexcused_delay_s']} s"},
        "rss_flat": {"ok": bool(growth_.get("rss_flat")),
                     "detail": f"growth {growth_.get('rss_growth_mib')} MiB "
                               f"(tolerance {RSS_TOLERANCE_BYTES // MiB} MiB)"},
        "fds_flat": {"ok": bool(growth_.get("fds_flat")),
                     "detail": f"growth {growth_.get('fd_growth')} (tolerance {FD_TOLERANCE})"},
        "hv_stopped_cleanly": {"ok": r["hv"]["exit_status"] == 0, "detail": r["hv"]["exit_status"]},
        "cleaned_up": {"ok": r["cleanup"]["ok"], "detail": r["cleanup"]},
    }
    return out
