"""hv.ops without a daemon: the collector, the history, hv top's frame, the server.

The same parts against a real ``hv run`` and real guests: tests/functional/test_ops.py.
"""

from __future__ import annotations

import copy
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hv.errors import HostError, UsageError
from hv.ops import DEFAULT_PORT, History, OpsServer, SnapshotCollector, parse_listen
from hv.ops.top import Sort, frame
from hv.units import MiB, PAGE_SIZE


def _vm(resident_mib: int, shares: int, merging: int | None) -> dict[str, Any]:
    return {"socket": "/x", "pid": 1, "configured_bytes": 256 * MiB, "max_bytes": 256 * MiB,
            "min_bytes": 128 * MiB, "shares": shares, "target_bytes": 200 * MiB,
            "paused_by_hv": False, "active_fraction": 0.5,
            "active": {"slow": 0.4, "fast": 0.6, "current": 0.5, "used": 0.5},
            "balloon_bytes": 256 * MiB, "host_resident_bytes": resident_mib * MiB,
            "host_swap_bytes": 0, "run_state": "running", "guest": None, "failing": None,
            "actions": {"balloon": 2, "swap": 1, "pause": 0}, "paged_out_pages": 10,
            "sharing": None if merging is None else {"potential_pages": 100.0,
                                                     "realized_pages": 50.0,
                                                     "merging_pages": merging},
            "ram": []}


SNAPSHOT: dict[str, Any] = {
    "pid": 1, "started": 1, "time": 1_000_000.0, "version": "0.1.0", "state": "soft",
    "free_bytes": 10 * MiB, "pool_bytes": 400 * MiB, "tick": 7, "tick_seconds": 0.01,
    "tick_seconds_total": 0.07, "admission_refusals": 1,
    "ksm": {"mode": "converge", "pressure": False, "pages_to_scan": 100,
            "sleep_millisecs": 20, "counters": {"pages_sharing": 3, "full_scans": 2},
            "ksmd_cpu_seconds": 1.5, "ksmd_cpu_fraction": 0.02, "scan_cpu_seconds": 0.3,
            "potential_pages": 200, "realized_pages": 100, "backlog_pages": 100, "vms": {}},
    "vms": {"a": _vm(150, 1000, 30), "b": _vm(220, 2000, None), "c": _vm(0, 500, None)},
}
SNAPSHOT["vms"]["c"]["host_resident_bytes"] = None  # not read yet


def _scrape(snapshot: dict[str, Any] | None) -> dict[str, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in families.values() for s in f.samples if s.name == name}


def test_listen_addresses() -> None:
    assert parse_listen("") == ("127.0.0.1", DEFAULT_PORT)
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("9000") == ("127.0.0.1", 9000)
    assert parse_listen("localhost") == ("localhost", DEFAULT_PORT)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("a:b", "1.2.3.4:0", "1.2.3.4:70000", "::1:80", "[::1]x"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert DEFAULT_PORT not in (9100, 9177) and not 9100 <= DEFAULT_PORT <= 9999


def test_collector_series_names_and_labels() -> None:
    fams = _scrape(SNAPSHOT)
    assert all(name.startswith("hv_") for name in fams)
    assert _samples(fams, "hv_state") == {(("state", s),): float(s == "soft")
                                          for s in ("high", "soft", "hard", "low")}
    assert _samples(fams, "hv_ksm_governor_mode") == {(("mode", "converge"),): 1.0,
                                                      (("mode", "idle"),): 0.0}
    assert _samples(fams, "hv_ksm_sharing_bytes") == {(): 3 * PAGE_SIZE}
    assert _samples(fams, "hv_ksm_full_scans_total") == {(): 2}
    assert _samples(fams, "hv_admission_refusals_total") == {(): 1}
    assert _samples(fams, "hv_tick_duration_seconds_count") == {(): 7}
    assert _samples(fams, "hv_build_info") == {(("version", "0.1.0"),): 1.0}
    assert _samples(fams, "hv_vm_resident_bytes") == {(("vm", "a"),): 150 * MiB,
                                                      (("vm", "b"),): 220 * MiB}
    assert _samples(fams, "hv_vm_shared_bytes") == {(("vm", "a"),): 30 * PAGE_SIZE}
    assert _samples(fams, "hv_vm_balloon_actions_total")[(("vm", "c"),)] == 2
    assert _samples(fams, "hv_vm_active_ratio")[(("estimate", "slow"), ("vm", "a"))] == 0.4
    for f in fams.values():
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name


def test_collector_forgets_what_the_snapshot_no_longer_has() -> None:
    gone = copy.deepcopy(SNAPSHOT)
    del gone["vms"]["a"]
    gone["ksm"] = None
    fams = _scrape(gone)
    vms = {dict(k).get("vm") for f in fams.values() for s in f.samples
           for k in [tuple(s.labels.items())]}
    assert "a" not in vms and {"b", "c"} <= vms
    assert not any(name.startswith("hv_ksm") for name in fams)
    assert set(_scrape(None)) == {"hv_build_info"}  # before the first tick: build info only


def test_history_is_thinned_and_bounded() -> None:
    h = History(PAGE_SIZE, step_s=2.0, span_s=10.0)
    for i in range(40):
        h.add({**SNAPSHOT, "time": 1000.0 + i})  # a snapshot a second for 40 s
    points = h.as_dict()["points"]
    assert len(points) == 5 and points[-1]["t"] == 1038.0 and points[0]["t"] == 1030.0
    a = dict(zip(h.as_dict()["vm_fields"], points[-1]["vms"]["a"]))
    assert a["resident"] == 150 * MiB and a["active"] == int(0.5 * 150 * MiB)
    assert a["potential"] == 100 * PAGE_SIZE and points[-1]["state"] == "soft"


def test_top_frame_sorts_by_the_chosen_column() -> None:
    def names(text: str) -> list[str]:
        body = text.splitlines()[3:]
        return [line.split()[0] for line in body[1:] if line and not line.startswith("sorted")]

    by_resident = frame(SNAPSHOT, Sort("resident"))
    assert names(by_resident) == ["b", "a", "c"]  # largest first, not read yet last
    assert "RESIDENT*" in by_resident and "sorted by resident (descending)" in by_resident
    assert names(frame(SNAPSHOT, Sort("vm"))) == ["a", "b", "c"]
    assert names(frame(SNAPSHOT, Sort("shares"))) == ["b", "a", "c"]
    assert names(frame(SNAPSHOT, Sort("shares", reverse=True))) == ["c", "a", "b"]
    assert Sort("vm").step(1).key == "target" and Sort("vm").step(-1).key == "shared"
    head = by_resident.splitlines()[1]
    assert "state SOFT" in head and "KSM converge" in head and "ksmd CPU 2.0%" in head
    assert "no hv run" in frame(None, Sort())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_routes_and_a_busy_port() -> None:
    server = OpsServer("127.0.0.1", _free_port())
    server.start()
    try:
        def get(path: str) -> tuple[int, str, bytes]:
            with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=5) as r:
                return r.status, r.headers["Content-Type"], r.read()

        assert b'src="/static/dashboard.js"' in get("/")[2]
        assert get("/static/dashboard.js")[1].startswith("text/javascript")
        assert json.loads(get("/api/status")[2]) == {"snapshot": None, "page_size": PAGE_SIZE}
        server.update({**SNAPSHOT, "vms": {"a": {**SNAPSHOT["vms"]["a"], "ram": [{"hva": 1}]}}})
        assert "ram" not in json.loads(get("/api/status")[2])["snapshot"]["vms"]["a"]
        assert b'"vms"' in get("/api/history")[2]
        assert b"hv_vm_target_bytes" in get("/metrics")[2]
        with pytest.raises(urllib.error.HTTPError) as err:
            get("/static/../setup.py")
        assert err.value.code == 404
        busy = OpsServer("127.0.0.1", server.port)
        with pytest.raises(HostError, match="cannot listen"):
            busy.start()
    finally:
        server.stop()


def test_run_with_a_bad_metrics_address_is_one_line(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from hv.cli import main
    monkeypatch.setenv("HV_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "hv.toml"
    assert main(["run", "--config", str(config), "--metrics", "host:port"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metrics 'host:port'" in err[0]
    assert not (tmp_path / "state").exists()  # refused before the daemon made anything
