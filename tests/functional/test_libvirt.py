"""VMs managed by libvirt (issue 8), against a real libvirtd and real TCG domains.

Every domain is transient (``virsh create``) and destroyed at teardown; the libvirtd
is started by ``scripts/libvirtd.sh`` and stopped again if this module started it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hv.host import swap
from hv.libvirt.domxml import POLICY_NS
from hv.units import MiB, PAGE_SIZE
from tests.conftest import hv_cli, wait_for
from tests.functional.hvrun import HvRun, swap_fixture
from tests.functional.libvirt_env import (
    Domains,
    domains_fixture,
    libvirtd_fixture,
    libvirtd_script,
    virsh,
)
from tests.functional.pressure import MemoryLocker, meminfo

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[bool]:
    yield from libvirtd_fixture()


@pytest.fixture
def domains(libvirtd: bool, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Domains]:
    yield from domains_fixture(tmp_path, request)


def one_line_error(done: Any, *needles: str) -> None:
    """Bad input: a non-zero exit and exactly one line on stderr, no traceback."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def status_json(*names: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    done = hv_cli("status", "--json", *names, env=env)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["vms"]
    return rows


def dommemstat(name: str) -> dict[str, int]:
    out = virsh("dommemstat", name).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


# -- one domain through every command --------------------------------------------------

def test_domain_balloon_status_pause_share(domains: Domains, state_dir: Path) -> None:
    name = domains.create("one", policy={"min": "128M", "shares": "2000"})
    domains.wait_event(name, "ready")
    ref = f"libvirt:{name}"

    # hv status --json: the domain, its pid (libvirt's pid file), guest statistics, and
    # its policy from the XML metadata.
    [row] = status_json(ref)
    assert row["pid"] == int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    assert row["run_state"] == "running" and row["accel"] == "tcg"
    assert row["max_bytes"] == 256 * MiB and row["balloon_bytes"] == 256 * MiB
    assert row["guest"]["total_bytes"] and row["guest"]["available_bytes"]
    assert row["backend"] == "libvirt" and row["sharing"] == "on"
    assert row["policy"]["min_bytes"] == 128 * MiB and row["policy"]["shares"] == 2000
    assert row["policy"]["source"] == {"min": "domain", "shares": "domain"}
    table = hv_cli("status", ref)
    assert f"{ref}: min 128.0M (domain), shares 2000 (domain)" in table.stdout, table.stdout

    # Balloon 256 -> 128 MiB: libvirt and the guest's own MemTotal follow.
    total_before = domains.memtotal_kib(name)
    done = hv_cli("balloon", ref, "128M", "--wait", "60")
    assert done.returncode == 0, done.stderr
    assert dommemstat(name)["actual"] == 128 * 1024
    wait_for(lambda: domains.memtotal_kib(name) <= total_before - 120 * 1024, 30,
             "the guest's MemTotal down by the 128 MiB ballooned")
    done = hv_cli("balloon", ref, "256M", "--wait", "60")
    assert done.returncode == 0, done.stderr
    assert dommemstat(name)["actual"] == 256 * 1024
    wait_for(lambda: domains.memtotal_kib(name) >= total_before - 4 * 1024, 30,
             "the guest's MemTotal back")

    # Pause and resume: libvirt's state follows.
    assert hv_cli("pause", ref).returncode == 0
    assert virsh("domstate", name).stdout.strip() == "paused"
    assert status_json(ref)[0]["run_state"] == "paused"
    assert hv_cli("resume", ref).returncode == 0
    assert virsh("domstate", name).stdout.strip() == "running"

    # hv share scans it.
    done = hv_cli("share", "--json", "--interval", "1", ref)
    assert done.returncode == 0, done.stderr
    index = json.loads(done.stdout)
    [vm] = index["vms"]
    assert vm["vm"] == ref and vm["scanned"] == 256 * MiB // PAGE_SIZE and vm["present"] > 0
    assert index["opted_out"] == []


def test_nosharepages_opted_out(domains: Domains, state_dir: Path) -> None:
    name = domains.create("nsp", nosharepages=True)
    domains.wait_event(name, "ready")
    ref = f"libvirt:{name}"
    done = hv_cli("share", "--json", ref)
    assert done.returncode == 0, done.stderr
    index = json.loads(done.stdout)
    assert index["opted_out"] == [ref] and index["vms"] == []
    assert "opted out of page sharing" in hv_cli("share", ref).stdout
    [row] = status_json(ref)
    assert row["sharing"] == "opted out"
    assert f"{ref}: page sharing: opted out" in hv_cli("status", ref).stdout


# -- bad input -------------------------------------------------------------------------

def test_bad_input_one_line(domains: Domains, state_dir: Path, tmp_path: Path) -> None:
    # libvirtd not running: a URI whose daemon socket does not exist, exactly what a
    # stopped libvirtd leaves (the real one keeps serving the other tests).
    gone = "qemu:///system?socket=/run/libvirt/hv-test-no-such-libvirtd-sock"
    one_line_error(hv_cli("--connect", gone, "balloon", "libvirt:x", "128M"),
                   "cannot connect to libvirt", "is libvirtd running?")
    one_line_error(hv_cli("status", "libvirt:x", env={"HV_LIBVIRT_URI": gone}),
                   "is libvirtd running?")
    # An unknown domain.
    one_line_error(hv_cli("pause", "libvirt:hvt-no-such-domain"), "no such libvirt domain")
    one_line_error(hv_cli("balloon", "libvirt:", "128M"), "bad libvirt domain name")
    # A domain without a balloon: every balloon command refuses, and hv run too.
    name = domains.create("noballoon", balloon=False)
    one_line_error(hv_cli("balloon", f"libvirt:{name}", "128M"), "no virtio-balloon device")
    config = tmp_path / "hv.toml"
    config.write_text(f'[vm.nb]\nlibvirt = "{name}"\nmin = "128M"\n')
    one_line_error(hv_cli("run", "--once", "--no-guardian", "--config", str(config)),
                   "vm.nb.libvirt", "no virtio-balloon device")
    # A domain that is defined but shut off.
    off = tmp_path / "off.xml"
    off.write_text(Path(tmp_path / f"{name}.xml").read_text().replace(name, "hvt-off"))
    virsh("define", str(off))
    try:
        one_line_error(hv_cli("resume", "libvirt:hvt-off"), "not running (shut off)")
    finally:
        virsh("undefine", "hvt-off", check=False)
    # Bad metadata: one line naming the domain and the attribute.
    bad = domains.create("badmeta", policy={"min": "lots"})
    one_line_error(hv_cli("status", f"libvirt:{bad}"), "hv:policy min")
    assert virsh("domstate", name).stdout.strip() == "running"  # nothing changed


# -- hv run ------------------------------------------------------------------------------

MANAGE_HOST = {"poll_interval_s": 1, "sample_period_s": 5, "sample_pages": 100,
               "share_interval_s": 0}


def toml(host: dict[str, Any], vms: dict[str, dict[str, Any]], libvirt: dict[str, str]) -> str:
    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v)
    lines = ["[host]"] + [f"{k} = {value(v)}" for k, v in host.items()]
    lines += ["", "[libvirt]"] + [f"{k} = {value(v)}" for k, v in libvirt.items()]
    for n, t in vms.items():
        lines += ["", f"[vm.{n}]"] + [f"{k} = {value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def run_swap() -> Iterator[None]:
    """Admission needs max - min of every VM in free swap: 3 GiB covers every test here."""
    _, free = swap.totals()
    yield from swap_fixture(size_bytes=max(3072 * MiB - free, PAGE_SIZE), enough_bytes=3072 * MiB)


def test_run_manage_all_picks_up_and_drops(domains: Domains, state_dir: Path, tmp_path: Path,
                                           run_swap: None) -> None:
    first = domains.create("first", policy={"min": "140M"})
    config = tmp_path / "hv.toml"
    config.write_text(toml(MANAGE_HOST, {}, {"manage": "all"}))
    hv = HvRun(config, tmp_path / "events.jsonl", "--no-guardian")
    try:
        hv.wait_event("tick", 30, vm=first)
        st = json.loads((state_dir / "daemon" / "status.json").read_text())
        row = st["vms"][first]
        assert row["policy"]["min_bytes"] == 140 * MiB
        assert row["policy"]["source"] == {"min": "domain", "max": "default", "shares": "default"}

        # A domain started while hv runs: managed within one tick of appearing.  The
        # snapshot names the last tick finished (T); the tick running when the domain
        # appeared is at most T + 1, so the first tick after it is at most T + 2.
        published = json.loads((state_dir / "daemon" / "status.json").read_text())["tick"]
        late = domains.create("late")
        added = hv.wait_event("vm_added", 30, vm=late)
        assert added["found_tick"] <= published + 2, (added, published)
        hv.wait_event("tick", 30, vm=late)
        # Destroyed mid-run: dropped, no error exit.
        domains.destroy(late)
        hv.wait_event("vm_gone", 30, vm=late)
        hv.wait_event("tick", 10, vm=first)
        hv.check_alive()
        assert late not in json.loads((state_dir / "daemon" / "status.json").read_text())["vms"]
        # The domain's metadata changed, then a reload (SIGHUP): hv takes the new value.
        virsh("metadata", first, POLICY_NS, "--key", "hv", "--live",
              "--set", '<policy min="160M"/>')
        hv.proc.send_signal(signal.SIGHUP)
        hv.wait_event("reload", 30)

        def policy() -> dict[str, Any]:
            st = json.loads((state_dir / "daemon" / "status.json").read_text())
            return st["vms"][first]["policy"]  # type: ignore[no-any-return]
        wait_for(lambda: policy()["min_bytes"] == 160 * MiB, 30, "min 160M after the reload")
        assert policy()["source"]["min"] == "domain"
        assert hv.stop() == 0, hv.stderr()
    finally:
        hv.close()


def test_run_survives_a_libvirtd_restart(libvirtd: bool, domains: Domains, state_dir: Path,
                                         tmp_path: Path, run_swap: None) -> None:
    """libvirtd stopped and started again under a running hv: the domain (whose QEMU
    keeps running) is still managed, on a new connection, and nothing exits."""
    if not libvirtd:
        pytest.skip("libvirtd was running before these tests: not theirs to restart")
    name = domains.create("restart")
    config = tmp_path / "hv.toml"
    config.write_text(toml(MANAGE_HOST, {}, {"manage": "all"}))
    hv = HvRun(config, tmp_path / "events.jsonl", "--no-guardian")
    try:
        hv.wait_event("tick", 30, vm=name)
        libvirtd_script("stop")
        failed = hv.wait_event("collect_failed", 30, vm=name)
        assert "libvirtd" in failed["error"], failed
        hv.wait_event("discovery_failed", 30)
        hv.check_alive()
        assert not hv.events("vm_gone", vm=name)  # libvirtd away is not the domain gone
        libvirtd_script("start")
        hv.wait_event("collect_recovered", 60, vm=name)
        hv.wait_event("discovery_recovered", 30)
        recovered = hv.events("collect_recovered", vm=name)[-1]["ts"]
        wait_for(lambda: [t for t in hv.ticks(name) if t["ts"] > recovered], 30,
                 "a tick of the domain after it recovered")
        assert not hv.events("vm_gone", vm=name) and not hv.events("vm_added", vm=name)[1:]
        assert virsh("domstate", name).stdout.strip() == "running"
        assert hv.stop() == 0, hv.stderr()
    finally:
        hv.close()
        libvirtd_script("start")  # a failed test leaves the module its libvirtd


# -- hv run under real host pressure: two libvirt domains and one QMP guest ----------------

PRESSURE_HOST = {"poll_interval_s": 1, "sample_period_s": 5, "sample_pages": 200}
SOFT_LEVEL_PCT = 3.0  # half-way into soft (hv's default thresholds: high 6, soft 4)
SOFT_GOAL_PCT = 4.5  # soft + hysteresis: where free memory must come back to
ACT_WS_MIB = 150  # fits the 256 MiB the active domain boots with (its need: ~250 MiB)
IDLE_HOG_MIB = 2000  # what the idle domain holds unused: enough to leave a pool above the mins
GUEST_BASE_BYTES = 48 * MiB  # kernel, init, busybox and part of hv's headroom (test_pressure)


def test_run_pressure_moves_memory_from_idle_domain(domains: Domains, guests: Any,
                                                    state_dir: Path, tmp_path: Path,
                                                    run_swap: None) -> None:
    """The host is short of memory (a process holds it down to 3 %, soft) when hv starts.
    The idle domain holds 2000 MiB it no longer uses; the active domain touches 150 MiB
    and was booted ballooned down to 256 of its 512 MiB.  The pool (what the VMs hold
    less the shortfall) is shared by shares and idle tax: hv inflates the idle domain's
    balloon and deflates the active one's, and free memory comes back above soft +
    hysteresis."""
    idle = domains.create("idle", mem_mib=2304, workload="hog", hog_mib=IDLE_HOG_MIB,
                          hog_hold_s=1, fill="unique")
    act = domains.create("act", mem_mib=512, current_mib=256, workload="toucher",
                         alloc_mib=ACT_WS_MIB, ws=ACT_WS_MIB, rate=1, policy={"min": "160M"})
    q = guests.launch("q", mem="256M")
    domains.wait_event(idle, "hog_freed", 180)
    domains.wait_event(act, "toucher_filled", 120)
    config = tmp_path / "hv.toml"
    config.write_text(toml(PRESSURE_HOST, {
        "idle": {"libvirt": idle, "min": "160M"},
        "act": {"libvirt": act},  # min from the domain's metadata
        "q": {"socket": q["socket"], "min": "160M"}}, {}))
    names = ["idle", "act", "q"]
    start = {idle: dommemstat(idle)["actual"] * 1024, act: dommemstat(act)["actual"] * 1024}
    assert start[act] == 256 * MiB
    locker = MemoryLocker()
    hv: HvRun | None = None
    try:
        locker.start()
        level = locker.lock_until_available(SOFT_LEVEL_PCT)
        hv = HvRun(config, tmp_path / "events.jsonl", "--no-guardian")
        hv.wait_event("state", 30, state="soft")
        goal = SOFT_GOAL_PCT / 100 * meminfo()["MemTotal"]

        def shown() -> str:
            assert hv is not None
            return f"{level}; " + "; ".join(
                f"{n}: balloon {hv.last_tick(n)['balloon_bytes'] // MiB}M target "
                f"{(hv.last_tick(n)['target_bytes'] or 0) // MiB}M need "
                f"{(hv.last_tick(n)['need_bytes'] or 0) // MiB}M" for n in names if hv.ticks(n))

        def moved() -> bool:
            assert hv is not None
            hv.check_alive()
            t = hv.events("tick")
            return (bool(t) and t[-1]["free_bytes"] >= goal
                    and dommemstat(idle)["actual"] * 1024 <= start[idle] - 128 * MiB
                    and dommemstat(act)["actual"] * 1024 >= start[act] + 32 * MiB)
        try:
            wait_for(moved, 150, "idle domain ballooned down, active one up, free memory back")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {shown()}") from None
        # hv did it: it asked the idle balloon to inflate and the active one to deflate.
        assert [e for e in hv.events("balloon", vm="idle") if e["goal_bytes"] < e["actual_bytes"]]
        assert [e for e in hv.events("balloon", vm="act") if e["goal_bytes"] > e["actual_bytes"]]
        # The active domain kept its working set all along; nothing was swapped or paused.
        floor = ACT_WS_MIB * MiB + GUEST_BASE_BYTES
        assert min(t["balloon_bytes"] for t in hv.ticks("act")) >= floor, shown()
        assert dommemstat(act)["actual"] * 1024 >= floor, shown()
        assert not hv.events("swap", vm="act") and not hv.events("pause"), shown()
        # Policy sources as published: act's min from its XML, idle's from the TOML.
        st = json.loads((state_dir / "daemon" / "status.json").read_text())["vms"]
        assert st["act"]["policy"]["source"]["min"] == "domain"
        assert st["idle"]["policy"]["source"]["min"] == "config"
        assert hv.stop() == 0, hv.stderr()
    finally:
        locker.close()
        if hv is not None:
            hv.close()
