"""A real distribution: Debian (debootstrap minbase + systemd) booted from a virtio disk
to multi-user, ballooned through hv and sharing pages under hv's KSM governor.

The image is built by `scripts/setup.sh --with-debian` (README's test command).
"""

from __future__ import annotations

import json
import time

import pytest

from hv import paths
from hv.host.ksm import Ksm
from hv.sharing.governor import Governor
from hv.sharing.scan import Scanner, Target
from hv.units import MiB
from tests.conftest import Guests, hv_cli, wait_for

pytestmark = pytest.mark.guest

DEBIAN_BOOT_S = 240  # ~20 s each under TCG alone; two at once on 2 cores, on a busy CI host


def test_debian_guests_balloon_and_share(guests: Guests, ksm: Ksm) -> None:
    initrd, disk = (str(p) for p in paths.debian_image())
    booted = [guests.launch(name, mem="512M", initrd=initrd, disk=disk) for name in ("deb1", "deb2")]
    for g in booted:
        ready = guests.wait_event(g, "ready", DEBIAN_BOOT_S)
        assert ready["workload"] == "debian"  # systemd reached multi-user.target

    r = hv_cli("balloon", "deb1", "384M", "--wait", "120")
    assert r.returncode == 0, r.stderr
    r = hv_cli("status", "deb1", "deb2", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["vm"]: row for row in json.loads(r.stdout)["vms"]}
    assert rows["deb1"]["balloon_bytes"] == 384 * MiB and rows["deb2"]["balloon_bytes"] == 512 * MiB

    targets = [Target(g["name"], g["socket"], g["pid"], g["info"].ram) for g in booted]
    scanner = Scanner(targets)
    try:
        first = scanner.scan_stable(1.0)  # stability is judged across two scans
        # Two guests booted from one image share their distribution's pages.
        assert all(v.inter_vm_dups >= 5_000 for v in first.vms), first.vms
        gov = Governor(ksm)
        gov.start()
        t0 = time.monotonic()

        def converged() -> bool:
            idx = scanner.scan_all()
            gov.step(idx)
            return idx.merged_savings_pages >= 0.9 * idx.potential_savings_pages

        wait_for(converged, 120, "KSM to merge 90% of hv's estimate on Debian guests", 2.0)
        final = scanner.index()
        print(f"\ndebian x2: potential {final.potential_savings_pages * 4096 / MiB:.1f} MiB, "
              f"merged {final.merged_savings_pages * 4096 / MiB:.1f} MiB, realized (net of "
              f"KSM's bookkeeping) {final.realized_savings_pages * 4096 / MiB:.1f} MiB "
              f"in {time.monotonic() - t0:.1f} s")
    finally:
        scanner.close()
