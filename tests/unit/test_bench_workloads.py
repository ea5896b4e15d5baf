"""hv bench workloads' set-up and table (pure): bad input, the rows built from hv's sharing
index, the load's operation count, what makes a run incomplete, and the report."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from hv.bench import workloads
from hv.bench.workloads import (Row, WorkloadsConfig, WorkloadsResult, load_ops, missing,
                                reconcile_gap, row_of, total_row, vm_profit_gap)
from hv.errors import UsageError
from hv.policy.config import DEFAULT_SHARE_INTERVAL_S
from hv.sharing.index import SharingIndex, VmSharing
from hv.units import MiB, PAGE_SIZE
from tests.conftest import hv_cli

TOTAL = 512 * MiB // PAGE_SIZE  # 131072 pages


@pytest.fixture
def image(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    d.mkdir()
    for f in workloads.IMAGE_FILES:
        (d / f).write_bytes(b"")
    return d


def parse(*argv: str) -> WorkloadsConfig:
    p = argparse.ArgumentParser()
    workloads.add_arguments(p)
    return workloads.config_from_args(p.parse_args(list(argv)))


def test_defaults_one_guest_per_service_at_hv_runs_interval(image: Path) -> None:
    cfg = parse("--image-dir", str(image))
    assert cfg.services == ("nginx", "postgresql", "redis", "python")
    assert cfg.share_interval_s == DEFAULT_SHARE_INTERVAL_S
    plans = workloads.plans(cfg)
    assert [p.name for p in plans] == ["wl-nginx", "wl-postgresql", "wl-redis", "wl-python"]
    assert dict(plans[1].params)["service"] == "postgresql"
    assert plans[0].disk == image / "debian.ext4"
    assert parse("--image-dir", str(image), "--services", "redis,nginx").services == ("redis", "nginx")


@pytest.mark.parametrize("argv", [
    ["--services", "nginx,mysql"], ["--services", "nginx,nginx"], ["--services", ""],
    ["--load", "nan"], ["--load", "0"], ["--setup-timeout", "-5"], ["--share-interval", "inf"],
    ["--report-s", "0"], ["--pg-scale", "0"], ["-m", "100"], ["-m", "lots"],
])
def test_bad_input_is_one_usage_error(argv: list[str], image: Path) -> None:
    with pytest.raises(UsageError):
        parse("--image-dir", str(image), *argv)


def test_a_missing_image_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="build_services.sh --kernel-root .* --out-dir"):
        parse("--image-dir", str(tmp_path / "none"))


def test_the_cli_refuses_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    for args in (["--image-dir", str(tmp_path)], ["--services", "mysql"], ["--load", "-1"]):
        r = hv_cli("bench", "workloads", *args, env={"HV_RUN_DIR": str(tmp_path / "run")})
        assert r.returncode == 2 and r.stderr.startswith("hv: error:"), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists(), "nothing was launched"


def vm(name: str, *, present: int, ksm_pages: int, ksm_zero: int, realized: float,
       stable_dups: int = 0, inter: int = 0, zero: int = 0) -> VmSharing:
    return VmSharing(vm=name, scanned=TOTAL, present=present, zero=zero, zero_page=ksm_zero,
                     zero_mapped=0, stable_dups=stable_dups, inter_vm_dups=inter, hints=0,
                     volatile=0, ksm_pages=ksm_pages, ksm_merging_pages=ksm_pages,
                     ksm_zero_pages=ksm_zero, ksm_rmap_items=1000,
                     potential_savings_pages=realized, merged_savings_pages=realized,
                     realized_savings_pages=realized, ksm_profit_pages=realized)


def test_a_row_counts_ksm_frames_and_zero_pages_as_shared() -> None:
    r = row_of("nginx", vm("wl-nginx", present=60_000, ksm_pages=6_000, ksm_zero=2_000,
                           realized=5_000.5, stable_dups=5_000, inter=1_500, zero=2_100), TOTAL)
    assert (r.shared_pages, r.zero_pages, r.reclaimed_pages) == (8_000, 2_000, 5_000.5)
    assert r.zero_share == pytest.approx(0.25)
    assert (r.intra_vm_dup_pages, r.inter_vm_dup_pages, r.sharable_pages) == (3_500, 1_500, 7_100)
    empty = row_of("python", vm("wl-python", present=10, ksm_pages=0, ksm_zero=0, realized=0), TOTAL)
    assert empty.zero_share is None


def test_the_total_row_takes_the_index_realized_as_reclaimed() -> None:
    a = row_of("nginx", vm("a", present=100, ksm_pages=40, ksm_zero=10, realized=30), TOTAL)
    b = row_of("redis", vm("b", present=200, ksm_pages=20, ksm_zero=0, realized=15), TOTAL)
    a.ops, a.ops_per_s, b.ops, b.ops_per_s = 100, 10.0, 50, None
    index = SharingIndex((), 0, 0, 60, 50, 44)
    t = total_row([a, b], index)
    assert (t.total_pages, t.present_pages, t.shared_pages, t.zero_pages) == (2 * TOTAL, 300, 70, 10)
    assert t.reclaimed_pages == 44.0 and (t.ops, t.ops_per_s) == (150, 10.0)


def test_load_ops_count_the_window_and_skip_bad_lines() -> None:
    events = [{"t_s": "10", "ops": "100"}, {"t_s": "20", "ops": "300"}, {"t_s": "x", "ops": "1"},
              {"t_s": "30", "ops": "500"}, {"ops": "7"}, {"t_s": "40", "ops": "900"}]
    assert load_ops(events) == (800, pytest.approx(800 / 30))
    # From t=25: the window starts at the last report before it (t=20, 300 ops).
    assert load_ops(events, since_s=25) == (600, pytest.approx(600 / 20))
    assert load_ops([{"t_s": "10", "ops": "5"}]) == (5, None)
    assert load_ops([]) == (0, None)


def test_incomplete_when_a_service_failed_the_accounts_disagree_or_ksm_was_touched() -> None:
    ok = Row("nginx", "wl-nginx", TOTAL, 1, 1, 0, 1.0, 1.0, 1, 0, 0, ops=10)
    idle = Row("redis", "wl-redis", TOTAL, 1, 1, 0, 1.0, 1.0, 1, 0, 0, ops=0)
    broken = Row("postgresql", "wl-postgresql", TOTAL, 1, 1, 0, 1.0, 1.0, 1, 0, 0, ops=0,
                 note="service failed at step pgbench_init")
    assert missing([ok], 0.01, []) == []
    assert missing([ok, idle, broken], None, []) == [
        "redis: no load ran", "postgresql: service failed at step pgbench_init"]
    assert "general_profit by 3.0%" in missing([ok], 0.03, [])[0]
    assert "another process changed KSM" in missing([ok], None, ["t=5s run 1 -> 0"])[0]
    # Another process's merges are in general_profit but in no guest: not held against hv.
    assert missing([ok], 0.03, [], others=[4242]) == []
    assert "ksm_process_profit by 5.0%" in missing([ok], None, [], vm_gap=0.05)[0]
    a = Row("a", "a", TOTAL, 1, 1, 0, 1.0, 990.0, 1, 0, 0, kernel_profit_pages=1000.0)
    b = Row("b", "b", TOTAL, 1, 1, 0, 1.0, 1010.0, 1, 0, 0, kernel_profit_pages=1000.0)
    assert vm_profit_gap([a, b]) == pytest.approx(0.01)
    assert vm_profit_gap([ok]) is None  # no kernel figure
    index = SharingIndex((), 0, 0, 0, 0, 980)
    assert reconcile_gap(index, 1000.0) == pytest.approx(0.02)
    assert reconcile_gap(index, 0.0) is None


def test_the_report_sets_the_table_beside_the_papers(tmp_path: Path) -> None:
    rows = [row_of(s, vm(f"wl-{s}", present=65_536, ksm_pages=13_107, ksm_zero=6_553,
                         realized=13_107), TOTAL) for s in ("nginx", "python")]
    for r in rows:
        r.ops, r.ops_per_s = 1000, 4.2
    index = SharingIndex((), 0, 0, 30_000, 27_000, 26_214)
    samples = [{"t_s": float(t), "general_profit": 100.0 * t,
                "vms": {"nginx": {"realized": 50.0 * t}, "python": {"realized": 50.0 * t}}}
               for t in range(0, 100, 10)]
    res = WorkloadsResult({}, rows, total_row(rows, index), 26_000.0,
                          reconcile_gap(index, 26_000.0), None, [], samples,
                          ["redis: no load ran"],
                          tmp_path / "w.png", tmp_path / "w.json")
    text = workloads.format_result(res)
    # 512 MiB each; 19660 of 131072 pages shared is 15.0%, 13107 reclaimed 10.0%.
    assert "15.0%" in text and "10.0%" in text and "33%" in text  # zero share of shared
    assert "A: 10 Windows NT VMs" in text and "32.9%" in text  # the paper: 673 of 2048 MB
    assert "(0.82% apart)" in text and "MISSED: redis: no load ran" in text
    assert not res.complete
    workloads.save_plot(res)
    assert (tmp_path / "w.png").stat().st_size > 10_000


# -- the loop on stand-ins: which services came up, when the load window ends, cleanup ----
class FakeFleet:
    """Stands in for Fleet: records that the guests were stopped."""

    stopped = False

    def __init__(self, plans: list, progress: object) -> None:
        from hv.qemu.vm import VMInfo

        self.vms = [VMInfo(p.name, "", 1, "tcg", TOTAL * PAGE_SIZE, (), None, False)
                    for p in plans]

    async def __aenter__(self) -> "FakeFleet":
        return self

    async def __aexit__(self, *exc: object) -> None:
        FakeFleet.stopped = True


class FakeScanner:
    profit_file: Path  # KSM's general_profit, kept in step with the fake's merges

    def __init__(self, targets: list, replace_foreign: bool = False) -> None:
        self.names = [t.name for t in targets]
        self.scans, self.scan_cpu_s, self.closed = 0, 0.0, False

    def scan_all(self) -> SharingIndex:
        self.scans += 1
        rows = tuple(vm(n, present=50_000, ksm_pages=1_000 * self.scans, ksm_zero=100,
                        realized=500.0 * self.scans) for n in self.names)
        total = int(sum(r.realized_savings_pages for r in rows))
        self.profit_file.write_text(f"{total * PAGE_SIZE}\n")
        return SharingIndex(rows, 0, 0, total, total, total)

    def close(self) -> None:
        self.closed = True


class FakeVM:
    """The final reading's QMP handle: records what was done to each guest."""

    calls: list[tuple[str, str]] = []

    def __init__(self, name: str, socket: str) -> None:
        self.name = name

    async def attach(self) -> None:
        self.calls.append((self.name, "attach"))

    async def pause(self) -> None:
        self.calls.append((self.name, "pause"))

    async def resume(self) -> None:
        self.calls.append((self.name, "resume"))

    async def detach(self) -> None:
        self.calls.append((self.name, "detach"))


def test_the_run_waits_for_every_service_then_loads_and_puts_ksm_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hv.host.ksm import Ksm
    from hv.host.sysfs import Sysfs

    root = tmp_path / "ksm"
    root.mkdir()
    for name, value in {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20",
                        "use_zero_pages": "0", "pages_sharing": "0", "pages_scanned": "0",
                        "full_scans": "0", "general_profit": str(1_000_000)}.items():
        (root / name).write_text(value + "\n")
    sysfs = Sysfs()

    class WalkingKsm(Ksm):
        """ksmd's stand-in: a full scan goes by at each look while KSM runs."""

        def stats(self):  # type: ignore[no-untyped-def]
            if (root / "run").read_text().strip() == "1":
                done = int((root / "full_scans").read_text()) + 1
                (root / "full_scans").write_text(f"{done}\n")
            return super().stats()

    monkeypatch.setattr(workloads, "Ksm", lambda: WalkingKsm(sysfs, root=str(root),
                                                             saved_file=tmp_path / "saved.json"))
    monkeypatch.setattr(workloads, "Fleet", FakeFleet)
    monkeypatch.setattr(workloads, "Scanner", FakeScanner)
    monkeypatch.setattr(FakeScanner, "profit_file", root / "general_profit", raising=False)
    monkeypatch.setattr(workloads.Target, "from_info", staticmethod(lambda info: info))
    monkeypatch.setattr(workloads, "unmerge", lambda ksm: None)
    monkeypatch.setattr(workloads, "refuse_if_daemon", lambda what: None)
    monkeypatch.setattr(workloads, "other_ksm_users", lambda mine: [])
    monkeypatch.setattr(workloads, "VM", FakeVM)
    FakeVM.calls = []
    # nginx comes up; postgresql fails; the load lines say 10 ops a second.
    console = {("wl-nginx", "service_ready"): [{"setup_s": "3"}],
               ("wl-postgresql", "error"): [{"what": "service", "step": "pgbench_init"}],
               ("wl-nginx", "service_load"): [{"t_s": str(t), "ops": str(10 * t)}
                                              for t in range(0, 40, 10)]}
    monkeypatch.setattr(workloads, "console_events",
                        lambda name, event: console.get((name, event), []))
    cfg = WorkloadsConfig(services=("nginx", "postgresql"), load_s=0.05, share_interval_s=0.01,
                          out_dir=tmp_path / "out", image_dir=tmp_path)
    lines: list[str] = []
    res = asyncio.run(workloads.run(cfg, lines.append))
    assert FakeFleet.stopped
    # The final reading: every guest paused, then resumed and let go.
    for name in ("wl-nginx", "wl-postgresql"):
        assert [c for n, c in FakeVM.calls if n == name] == ["attach", "pause", "resume", "detach"]
    assert (root / "run").read_text().strip() == "0" and not (tmp_path / "saved.json").exists()
    # Before the frozen reading ksmd made a full pass at the freeze rate, then stopped.
    writes = [(Path(path).name, value) for path, value in sysfs.writes]
    fast = writes.index(("pages_to_scan", str(workloads.FREEZE_PASS_PAGES_TO_SCAN)))
    assert ("run", "0") in writes[fast:]
    assert [r.workload for r in res.rows] == ["nginx", "postgresql"]
    nginx, pg = res.rows
    # The load window is the guest's last load_s: from the report before t=29.95 (t=20).
    assert (nginx.ops, nginx.ops_per_s, nginx.note) == (100, pytest.approx(10.0), "")
    assert pg.note == "service failed at step pgbench_init" and pg.ops == 0
    assert res.missed == ["postgresql: service failed at step pgbench_init"]
    assert any("nginx: up at" in line for line in lines)
    doc = json.loads(res.data.read_text())
    assert {"host", "config", "paper", "rows", "total", "general_profit_pages",
            "reconcile_gap", "samples", "missed"} <= doc.keys()
    assert res.plot.stat().st_size > 10_000
