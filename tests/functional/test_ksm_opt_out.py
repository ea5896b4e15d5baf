"""Per-VM KSM opt-out on real guests, with real KSM driven by a real `hv run`.

Three guests fill 64 MiB with the same pages (``hog fill=shared``); hv's governor gets
KSM to merge them.  Then one is opted out, live: none of its pages is a KSM page any
more (pagemap + kpageflags), while the other two keep merging with each other.  The
kernel's own count for it, ``ksm_merging_pages`` in ``/proc/PID/ksm_stat``, drops once
ksmd has walked past its pages, which hv's governor has it do at once (a sweep) rather
than at the idle trickle.  KSM's settings are put back by hv when it stops; the test
checks that.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import numpy as np

from hv.host import native
from hv.host.native import PageFlags
from hv.qemu.vm import VM
from tests.conftest import Guests, hv_cli, wait_for
from tests.functional.hvrun import (HvRun, assert_ksm_restored, bare_qemu, ksm_snapshot,
                                   write_config)
from tests.functional.test_sharing import HOG_MIB, HOG_PAGES

pytestmark = pytest.mark.guest

MERGE_TIMEOUT_S = 120  # hv's governor merges two such guests in ~20 s here (TCG, 2 cores)


def merging(pid: int) -> int:
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        if line.startswith("ksm_merging_pages "):
            return int(line.split()[1])
    raise AssertionError("no ksm_merging_pages in ksm_stat")


def backend_merge(sock: str) -> tuple[str, bool]:
    async def go() -> tuple[str, bool]:
        async with VM("probe", sock) as vm:
            return await vm.ram_backend(), await vm.merge()
    return asyncio.run(go())


def ksm_flagged(g: dict[str, Any]) -> int:
    """Pages of the guest's RAM that are KSM pages now (pagemap + kpageflags, hv's scanner)."""
    res = native.scan(g["pid"], [(r.hva, r.size) for r in g["info"].ram])
    return int(np.count_nonzero(res.flags & np.uint16(int(PageFlags.KSM))))


def test_opt_out_unmerges_one_vm_while_the_others_keep_sharing(
        guests: Guests, state_dir: Path, tmp_path: Path) -> None:
    names = ["ka", "kb", "kc"]
    g = {n: guests.launch(n, mem="256M", workload="hog", hog_mib=HOG_MIB, fill="shared")
         for n in names}
    for n in names:
        guests.wait_event(g[n], "hog_touched", 90)
    pid = {n: g[n]["pid"] for n in names}
    # The backend hv's launcher names (-object memory-backend-ram,id=ram0), found by qom-list.
    assert backend_merge(g["kb"]["socket"]) == ("/objects/ram0", True)

    before = ksm_snapshot()
    config_path = tmp_path / "hv.toml"
    vm_tables: dict[str, dict[str, Any]] = {n: {"min": "256M", "max": "256M"} for n in names}
    host = {"managed": "4G", "share_interval_s": 1}
    config = write_config(config_path, host, vm_tables)
    log = tmp_path / "events.jsonl"
    run = HvRun(config, log)
    try:
        def all_merged() -> bool:
            run.check_alive()
            return all(merging(pid[n]) >= 0.9 * HOG_PAGES for n in names)

        wait_for(all_merged, MERGE_TIMEOUT_S, "KSM to merge the three guests' shared pages",
                 interval_s=1)
        # What three guests could share: the largest estimate so far (the first rounds,
        # before KSM merged and before pages were stable, see less).
        wait_for(lambda: run.events("share")[-1]["realized_pages"] > 0, 30,
                 "a sharing round that sees the merges")
        three = max(e["potential_pages"] for e in run.events("share"))

        # The admin opts kb out while hv run holds its QMP socket: hv run applies it, and
        # QEMU's MADV_UNMERGEABLE unmerges every page of kb at once (kpageflags).
        done = hv_cli("share", "--opt-out", "kb")
        assert done.returncode == 0, done.stderr
        assert "kb: opted out of page sharing (applied by hv run" in done.stdout
        assert run.wait_event("ksm_opt_out", 5, vm="kb")["backend"] == "/objects/ram0"
        assert ksm_flagged(g["kb"]) == 0
        assert ksm_flagged(g["ka"]) >= 0.9 * HOG_PAGES and ksm_flagged(g["kc"]) >= 0.9 * HOG_PAGES
        row = json.loads(hv_cli("status", "kb", "--json").stdout)["vms"][0]
        assert row["ksm"] == "opted out" and row["managed_by"] is not None
        status = json.loads((state_dir / "daemon" / "status.json").read_text())
        assert status["vms"]["kb"]["ksm"] == "opted out" and status["vms"]["ka"]["ksm"] == "on"

        # Left out of the sharing estimates: the next rounds scan ka and kc only, and two
        # identical guests save about half of what three did (the sharing scan backs off
        # while nothing changes, hence the deadline).
        def dropped() -> bool:
            run.check_alive()
            return any(e["potential_pages"] <= 0.75 * three for e in run.events("share")[-2:])

        wait_for(dropped, 150, f"the potential to drop from {three} pages without kb",
                 interval_s=1)
        # The kernel's count: what remains are pages of QEMU's other RAM blocks (ROMs,
        # video memory; 83 pages measured), which no live switch takes out of KSM.
        assert any(e["reason"].startswith("a VM left sharing") for e in run.events("share"))
        wait_for(lambda: merging(pid["kb"]) <= 0.01 * HOG_PAGES, 120,
                 "kb's ksm_merging_pages to drop after ksmd's sweep", interval_s=1)
        assert merging(pid["ka"]) >= 0.9 * HOG_PAGES and merging(pid["kc"]) >= 0.9 * HOG_PAGES
        assert run.stop() == 0
    finally:
        run.close()
    assert_ksm_restored(log, state_dir, before)

    # ksm = false in a configuration takes kc out at hv run's first tick; the admin's
    # --opt-in puts kb back (merge on again), live.
    vm_tables["kc"]["ksm"] = False
    write_config(config_path, host, vm_tables)
    run = HvRun(config, log)
    try:
        run.wait_event("ksm_opt_out", 30, vm="kc")
        assert ksm_flagged(g["kc"]) == 0
        done = hv_cli("share", "--opt-in", "kb")
        assert done.returncode == 0 and "kb: back in page sharing (applied by hv run" \
            in done.stdout, done.stderr
        assert run.wait_event("ksm_opt_in", 5, vm="kb")["backend"] == "/objects/ram0"
        assert run.stop() == 0
    finally:
        run.close()
    assert backend_merge(g["kb"]["socket"])[1] is True
    assert backend_merge(g["kc"]["socket"])[1] is False
    # The admin's choices are kept (0600) for the next hv; the config's are the config's.
    record = state_dir / "sharing" / "opt-out.json"
    assert json.loads(record.read_text()) == {"kb": True}
    assert record.stat().st_mode & 0o777 == 0o600

    # Without a daemon, hv share applies an opt-out over QMP itself, and leaves the VM
    # out of its report.
    done = hv_cli("share", "--opt-out", "ka")
    assert done.returncode == 0 and "merge=off on /objects/ram0" in done.stdout, done.stderr
    assert backend_merge(g["ka"]["socket"]) == ("/objects/ram0", False)
    done = hv_cli("share", "ka", "kb", "--json", "--interval", "0.5")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["opted_out"] == ["ka"] and [v["vm"] for v in report["vms"]] == ["kb"]
    done = hv_cli("share", "--opt-in", "ka")
    assert done.returncode == 0 and backend_merge(g["ka"]["socket"])[1] is True


def test_backend_of_a_plain_m_guest(guests: Guests, tmp_path: Path) -> None:
    """A QEMU started with a plain ``-m`` (no -object): QEMU creates the backend itself,
    ``/objects/pc.ram`` on a pc machine, and hv finds it by qom-list."""
    sock, pid = bare_qemu(tmp_path, "plain")
    guests.adopt(pid)
    assert backend_merge(str(sock)) == ("/objects/pc.ram", True)
