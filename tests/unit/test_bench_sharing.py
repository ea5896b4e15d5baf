"""hv bench sharing's set-up and report (pure): bad input, the seeded policy order, the
governor's round interval, and the table and plot of synthetic runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hv.bench import sharing
from hv.bench.sharing import BenchConfig, BenchResult, HvPolicy, RunResult, policy_orders
from hv.errors import UsageError
from hv.host.ksm import Ksm
from hv.host.sysfs import Sysfs
from hv.policy.config import DEFAULT_SHARE_INTERVAL_S
from hv.sharing.index import SharingIndex, VmSharing
from hv.units import MiB, PAGE_SIZE


def parse(*argv: str) -> BenchConfig:
    p = argparse.ArgumentParser()
    sharing.add_arguments(p)
    return sharing.config_from_args(p.parse_args(list(argv)))


def test_defaults_are_hv_runs_and_cold_boots_in_random_order() -> None:
    cfg = parse()
    assert cfg.share_interval_s == DEFAULT_SHARE_INTERVAL_S
    assert (cfg.order, cfg.cold) == ("random", "boot")
    assert parse("--seed", "5").seed == 5


@pytest.mark.parametrize("argv", [
    ["--timeout", "nan"], ["--scan-period", "inf"], ["--share-interval", "0"],
    ["--steady", "-1"], ["--policies", "stock,nope"], ["--vms", "0"], ["--param", "x"],
])
def test_bad_input_is_one_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(*argv)


def test_the_order_is_a_seeded_shuffle_per_n() -> None:
    cfg = BenchConfig(vms=(1, 2, 4, 8), seed=42)
    orders = policy_orders(cfg, list(sharing.POLICIES))
    assert orders == policy_orders(cfg, list(sharing.POLICIES))  # repeatable from its seed
    assert all(sorted(o) == sorted(sharing.POLICIES) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # not one order for every N
    given = BenchConfig(vms=(1, 2), order="given")
    assert policy_orders(given, ["hv", "stock"]) == {1: ["hv", "stock"], 2: ["hv", "stock"]}


def _fake_ksm(tmp_path: Path) -> Ksm:
    root = tmp_path / "ksm"
    root.mkdir()
    for name, value in {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20",
                        "use_zero_pages": "0", "pages_sharing": "0", "pages_scanned": "0",
                        "full_scans": "0"}.items():
        (root / name).write_text(value + "\n")
    return Ksm(Sysfs(), root=str(root), saved_file=tmp_path / "saved.json")


def test_hvs_governor_steps_once_per_sharing_round(tmp_path: Path) -> None:
    ksm = _fake_ksm(tmp_path)
    policy = HvPolicy(ksm, interval_s=10.0)
    policy.start()
    row = VmSharing("a", 100_000, 100_000, 0, 0, 0, 0, 0, 0, 0, 0, None, None, None,
                    0.0, 0.0, 0.0, None)
    index = SharingIndex((row,), 0, 0, 50_000, 0, 0)
    for t in (0.0, 2.0, 4.0, 9.9, 10.0, 12.0, 19.9, 20.1):
        policy.tick(index, t)
    assert len(policy.gov.samples) == 3  # at 0, 10 and 20.1 s: not at every measurement
    policy.gov.stop()


def run_of(n: int, policy: str, shared: int, realized: int, present: int) -> RunResult:
    return RunResult(n=n, policy=policy, configured_pages=n * 256 * MiB // PAGE_SIZE,
                     converged=True, t_converge_s=5.0, elapsed_s=20.0,
                     potential_pages=realized, realized_pages=realized, merged_pages=realized,
                     zero_mapped_pages=0, general_profit_pages=float(realized),
                     shared_pages=shared, inter_vm_dup_pages=0, present_pages=present,
                     ksmd_cpu_converge_s=0.3, ksmd_steady_cores=0.001, scan_cpu_s=0.2,
                     scans=5, per_vm=[{"potential": realized, "realized": realized}])


def test_table_and_plot_give_shares_of_configured_and_present_memory(tmp_path: Path) -> None:
    runs = [run_of(n, p, shared=n * 16_384, realized=n * 12_000, present=n * 32_768)
            for n in (1, 2) for p in ("hv", "stock")]
    config = {"order": "random", "seed": 3, "cold": "boot",
              "orders": {"1": ["hv", "stock"], "2": ["stock", "hv"]}}
    result = BenchResult(config, runs, False, tmp_path / "s.png", tmp_path / "s.json")
    text = sharing.format_result(result)
    assert "random order (seed 3), cold start by boot: N=1: hv, stock; N=2: stock, hv" in text
    # 2 guests of 256 MiB: 32 K of 131 K configured pages shared is 25%, of 65 K present 50%.
    assert "512/256" in text and "25%/50%" in text and "18%/37%" in text
    sharing.save_plot(result)
    assert (tmp_path / "s.png").stat().st_size > 10_000
