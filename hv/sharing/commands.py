"""The sharing subcommand: ``hv share`` (``hv bench sharing`` is in :mod:`hv.bench`).

Handlers print and return the exit code; everything else raises HvError.
"""

from __future__ import annotations

import argparse
import math
import asyncio
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from hv.errors import HvError, QMPBusy, UsageError
from hv.qemu import launch as launcher
from hv.qemu.vm import VM, RamRange
from hv.sharing import optout
from hv.sharing import state as st
from hv.sharing.index import SharingIndex, VmPages, build_index, read_ksm_stat
from hv.sharing.scan import Scanner, Target, open_targets, outside_ksm
from hv.units import PAGE_SIZE, format_size, table

__all__ = ["register", "cmd_share", "format_index"]


# hv run applies an opt-out at its next tick (a second by default) and unmerging a
# VM's pages takes about a second per GiB merged.
OPT_DAEMON_WAIT_S = 30.0


def _pages(n: float) -> str:
    return format_size(n * PAGE_SIZE)


def format_index(index: SharingIndex) -> str:
    """The table of ``hv share``: counts in pages, savings as sizes.

    ZERO counts zero pages that hold (or, before KSM, held) a frame; ZERO-MAPPED the
    zero-page mappings KSM did not make (free before and after merging, in neither
    POTENTIAL nor REALIZED).  REALIZED is what KSM's merges save, in guest RAM and in the
    rest of QEMU's mergeable memory, less its bookkeeping: the kernel's
    ``general_profit`` (per VM: the VM's fair part of it).
    """

    header = ["VM", "SCANNED", "PRESENT", "ZERO", "ZERO-MAPPED", "STABLE-DUPS", "INTER-VM",
              "HINTS", "VOLATILE", "KSM-MERGED", "KSM-ZERO", "POTENTIAL", "REALIZED"]
    rows: list[list[object]] = []
    for v in index.vms:
        merged = v.ksm_merging_pages if v.ksm_merging_pages is not None else v.ksm_pages
        rows.append([v.vm, v.scanned, v.present, v.zero, v.zero_mapped, v.stable_dups,
                     v.inter_vm_dups, v.hints, v.volatile, merged, v.ksm_zero_pages or 0,
                     _pages(v.potential_savings_pages), _pages(v.realized_savings_pages)])
    if len(index.vms) > 1:
        tot = [sum(getattr(v, k) for v in index.vms)
               for k in ("scanned", "present", "zero", "zero_mapped", "stable_dups",
                         "inter_vm_dups", "hints", "volatile")]
        merged_total = sum((v.ksm_merging_pages if v.ksm_merging_pages is not None else v.ksm_pages)
                           for v in index.vms)
        rows.append(["TOTAL", *tot, merged_total, sum(v.ksm_zero_pages or 0 for v in index.vms),
                     _pages(index.potential_savings_pages), _pages(index.realized_savings_pages)])
    text = table(rows, header)
    meta = round(sum(v.ksm_metadata_pages for v in index.vms))
    outside = round(sum(v.outside_savings_pages for v in index.vms))
    text += (f"\n{index.groups} duplicate groups ({index.inter_vm_groups} across VMs); "
             f"unmerged stable duplicates: {index.backlog_pages} pages "
             f"({_pages(index.backlog_pages)}); KSM's merges save "
             f"{_pages(index.merged_savings_pages)} in guest RAM and {_pages(outside)} in "
             f"the rest of QEMU's memory (ROMs, video), less {_pages(meta)} of its bookkeeping")
    return text


def _share_scan(targets: list[Target], interval_s: float, replace_bad: bool) -> SharingIndex:
    scanner = Scanner(targets, replace_foreign=replace_bad)
    try:
        return scanner.scan_stable(interval_s)
    finally:
        scanner.close()


def _share_cached(targets: list[Target]) -> SharingIndex:
    """The table from the page-state files, with the KSM pages of QEMU's other RAM
    blocks read now (their frames only, as after a scan) so the kernel's profit is met."""
    vms = []
    for t in targets:
        with st.open_state(st.state_path(t.name), t.identity(), writable=False) as s:
            vms.append(VmPages(t.name, s.snapshot(), read_ksm_stat(t.pid), *outside_ksm(t)))
    return build_index(vms)


def _daemon_targets(names: Sequence[str]) -> list[Target] | None:
    """The targets as the running ``hv run`` published them (None if it does not manage
    them all): its VMs' pids and RAM, for reading page state while it holds QMP."""
    from hv.published import running_status
    snapshot = running_status()
    if snapshot is None:
        return None
    pairs = [launcher.socket_of(n) for n in names] if names else launcher.known_vms()
    by_socket = {os.path.realpath(row["socket"]): (vm, row) for vm, row in snapshot["vms"].items()}
    out = []
    for _, sock in pairs:
        found = by_socket.get(os.path.realpath(sock))
        if found is None or not found[1].get("ram"):
            return None
        vm, row = found  # the daemon's name: its scanner's state files go by it
        merge = False if row.get("ksm") == optout.OPTED_OUT else None
        out.append(Target(vm, row["socket"], row["pid"], tuple(RamRange(**r) for r in row["ram"]),
                          merge=merge))
    return out


async def _targets(names: Sequence[str], cached: bool, connect: str | None = None) -> list[Target]:
    """The VMs to report on, asked over QMP; for a report from the page-state files only
    (``cached``), from the running ``hv run``'s snapshot when it holds their QMP."""
    try:
        async with open_targets(names, connect) as targets:
            return targets
    except QMPBusy:
        daemon_targets = _daemon_targets(names) if cached else None
        if daemon_targets is None:
            raise
        return daemon_targets


async def cmd_share(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.interval) and args.interval >= 0):
        raise UsageError("--interval must be a finite number of seconds, 0 or more")
    if args.opt_out or args.opt_in:
        if args.vm or args.cached or (args.opt_out and args.opt_in):
            raise UsageError("--opt-out VM and --opt-in VM go alone")
        return await _opt(args.opt_out or args.opt_in, merge=bool(args.opt_in))
    all_targets = await _targets(args.vm, args.cached, getattr(args, "connect", None))
    if not all_targets:
        print("no VMs known to hv (launch some, or name QMP sockets)")
        return 0
    # An opted-out VM's pages are no part of what could be shared.
    targets = [t for t in all_targets if t.merge is not False]
    opted_out = [t.name for t in all_targets if t.merge is False]
    if not targets:
        index = build_index([])
    elif args.cached:
        index = _share_cached(targets)
    else:
        index = await asyncio.to_thread(_share_scan, targets, args.interval, args.replace_bad_state)
    if args.json:
        out: dict[str, Any] = index.as_dict()
        out["page_size"] = PAGE_SIZE
        out["opted_out"] = opted_out
        print(json.dumps(out, indent=1))
    else:
        print(format_index(index))
        for name in opted_out:
            print(f"{name}: {optout.OPTED_OUT} of page sharing (guest RAM not mergeable: merge=off "
                  "on its memory backend, <nosharepages/> or mem-merge=off); not scanned")
    return 0


async def _opt(vm_arg: str, merge: bool) -> int:
    """``--opt-out`` / ``--opt-in``: record the admin's choice, then apply it: over QMP,
    or, while ``hv run`` holds the VM's socket, by that daemon within a tick."""
    name, sock = launcher.socket_of(vm_arg)
    optout.set_admin_choice(name, merge)
    what = "back in page sharing" if merge else "opted out of page sharing"
    try:
        async with VM(name, sock) as vm:
            backend = await vm.set_merge(merge)
    except QMPBusy:
        from hv.published import running_status
        snapshot = running_status()
        if snapshot is None or name not in snapshot["vms"]:
            raise
        want = "on" if merge else optout.OPTED_OUT
        deadline = time.monotonic() + OPT_DAEMON_WAIT_S
        while time.monotonic() < deadline:
            snapshot = running_status()
            if snapshot is None or snapshot["vms"].get(name, {}).get("ksm") == want:
                break
            await asyncio.sleep(0.2)
        if snapshot is None or snapshot["vms"].get(name, {}).get("ksm") != want:
            raise HvError(f"{name}: recorded, but `hv run` did not apply it within "
                          f"{OPT_DAEMON_WAIT_S:.0f} s (its configuration may say ksm = false; "
                          "see its log)") from None
        print(f"{name}: {what} (applied by hv run, pid {snapshot['pid']})")
        return 0
    print(f"{name}: {what} (merge={'on' if merge else 'off'} on {backend}"
          + ("" if merge else "; KSM unmerges its pages") + ")")
    return 0


def register(subparsers: Any) -> None:
    s = subparsers.add_parser("share", help="content-based page sharing: what VMs could share "
                              "and what KSM has merged (scans now)")
    s.add_argument("vm", nargs="*", help="VM names, QMP socket paths or libvirt:DOMAIN "
                   "(default: all known)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="pause between the two scans a VM needs when it has no page state yet "
                   "(stability is judged across scans; default 2)")
    s.add_argument("--cached", action="store_true",
                   help="report from the page-state files; hash nothing")
    s.add_argument("--opt-out", metavar="VM", help="take VM's RAM out of page sharing, live "
                   "(QOM merge=off on its memory backend: KSM unmerges its pages); remembered")
    s.add_argument("--opt-in", metavar="VM", help="put an opted-out VM back in page sharing")
    s.add_argument("--replace-bad-state", action="store_true",
                   help="replace a truncated or foreign page-state file instead of failing")
    s.set_defaults(func=cmd_share)
