"""Helpers of the fault suite: one `hv run` per case, and what to wait for in its log.

Not a test module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.functional.hvrun import HvRun, qmp_status, write_config

# Short periods so each case takes seconds; sharing off unless a case is about it.
HOST: dict[str, Any] = {"idle_collect_s": 0, "sample_pages": 100, "sample_period_s": 3,
                        "poll_interval_s": 1, "share_interval_s": 0}

# A sample period that does not come round during a case: the sampler's one page-flag
# scan at start is then the only other time hv opens a VM's /proc/PID/mem.
QUIET_SAMPLE_PERIOD_S = 600


def start_hv(tmp_path: Path, host: dict[str, Any], vms: dict[str, dict[str, Any]],
             *extra: str, log: Path | None = None) -> HvRun:
    """`hv run` over ``vms`` (name -> table) with ``host`` over the suite's defaults."""
    config = write_config(tmp_path / "hv.toml", {**HOST, **host}, vms)
    return HvRun(config, log or tmp_path / "events.jsonl", *extra)


def wait_started(hv: HvRun, since_ts: float, timeout_s: float = 30) -> float:
    """Wait for the ``start`` line of this run (logged after ``since_ts``); its time."""
    def found() -> float | None:
        hv.check_alive()
        got = [e["ts"] for e in hv.events("start") if e["ts"] > since_ts]
        return got[-1] if got else None
    return wait_for(found, timeout_s, "hv run to start")  # type: ignore[no-any-return]


def ticks_after(hv: HvRun, vm: str, ts: float, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    """Wait for ``count`` ticks of ``vm`` logged after ``ts``."""
    def found() -> list[dict[str, Any]] | None:
        hv.check_alive()
        got = [t for t in hv.ticks(vm) if t["ts"] > ts]
        return got if len(got) >= count else None
    return wait_for(found, timeout_s, f"{count} ticks of {vm} after {ts:.1f}")  # type: ignore[no-any-return]


def guard_paused(state_dir: Path) -> dict[str, str]:
    """The VMs the daemon's guard file says hv paused (none if there is no file)."""
    try:
        return dict(json.loads((state_dir / "daemon" / "guard.json").read_text())["paused"])
    except FileNotFoundError:
        return {}


def assert_stopped_clean(hv: HvRun, rc: int, *guests: dict[str, Any]) -> None:
    """hv exited 0 with no traceback, and every guest given runs (not left paused)."""
    assert rc == 0, hv.stderr()
    assert_no_traceback(hv)
    for g in guests:
        assert qmp_status(g["socket"]) == "running", f"{g['name']} is not running"


def assert_no_traceback(hv: HvRun) -> None:
    err = hv.stderr()
    assert "Traceback" not in err and "exception was never retrieved" not in err, err
