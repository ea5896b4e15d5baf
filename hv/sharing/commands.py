"""The sharing subcommands: ``hv share`` and ``hv bench sharing``.

Handlers print and return the exit code; everything else raises HvError.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from hv.errors import HvError, UsageError
from hv.sharing import state as st
from hv.sharing.index import SharingIndex, VmPages, build_index, read_ksm_stat
from hv.sharing.scan import Scanner, Target, open_targets
from hv.units import PAGE_SIZE, format_size, table

__all__ = ["register", "cmd_share", "cmd_bench_sharing", "format_index"]


def _pages(n: float) -> str:
    return format_size(n * PAGE_SIZE)


def format_index(index: SharingIndex) -> str:
    """The table of ``hv share``: counts in pages, savings as sizes."""

    header = ["VM", "SCANNED", "PRESENT", "ZERO", "STABLE-DUPS", "INTER-VM", "HINTS", "VOLATILE",
              "KSM-MERGED", "POTENTIAL", "REALIZED"]
    rows: list[list[object]] = []
    for v in index.vms:
        merged = v.ksm_merging_pages if v.ksm_merging_pages is not None else v.ksm_pages
        rows.append([v.vm, v.scanned, v.present, v.zero, v.stable_dups, v.inter_vm_dups, v.hints,
                     v.volatile, merged, _pages(v.potential_savings_pages),
                     _pages(v.realized_savings_pages)])
    if len(index.vms) > 1:
        tot = [sum(getattr(v, k) for v in index.vms)
               for k in ("scanned", "present", "zero", "stable_dups", "inter_vm_dups", "hints",
                         "volatile")]
        merged_total = sum((v.ksm_merging_pages if v.ksm_merging_pages is not None else v.ksm_pages)
                           for v in index.vms)
        rows.append(["TOTAL", *tot, merged_total, _pages(index.potential_savings_pages),
                     _pages(index.realized_savings_pages)])
    text = table(rows, header)
    text += (f"\n{index.groups} duplicate groups ({index.inter_vm_groups} across VMs); "
             f"unmerged stable duplicates: {index.backlog_pages} pages "
             f"({_pages(index.backlog_pages)})")
    return text


def _share_scan(targets: list[Target], interval_s: float, replace_bad: bool) -> SharingIndex:
    scanner = Scanner(targets, replace_foreign=replace_bad)
    try:
        return scanner.scan_stable(interval_s)
    finally:
        scanner.close()


def _share_cached(targets: list[Target]) -> SharingIndex:
    vms = []
    for t in targets:
        with st.open_state(st.state_path(t.name), t.identity(), writable=False) as s:
            vms.append(VmPages(t.name, s.snapshot(), read_ksm_stat(t.pid)))
    return build_index(vms)


async def cmd_share(args: argparse.Namespace) -> int:
    if args.interval < 0:
        raise UsageError("--interval must not be negative")
    async with open_targets(args.vm, getattr(args, "connect", None)) as named:
        if not named:
            print("no VMs known to hv (launch some, or name QMP sockets)")
            return 0
        opted_out = [t.name for t in named if t.opted_out]
        targets = [t for t in named if not t.opted_out]
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
            print(f"{name}: opted out of page sharing (guest RAM not mergeable: "
                  "<nosharepages/> or mem-merge=off); not scanned")
    return 0


async def cmd_bench_sharing(args: argparse.Namespace) -> int:
    from hv.sharing import bench

    cfg = bench.BenchConfig.from_args(args)
    result = await bench.run(cfg, progress=lambda line: print(line, flush=True))
    print(bench.format_result(result))
    print(f"plot: {result.plot}\ndata: {result.data}")
    return 0 if result.all_converged else 3


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
                   help="report from the page-state files only; do not scan")
    s.add_argument("--replace-bad-state", action="store_true",
                   help="replace a truncated or foreign page-state file instead of failing")
    s.set_defaults(func=cmd_share)

    bench_parser = subparsers.choices.get("bench")
    if bench_parser is None:
        bench_parser = subparsers.add_parser("bench", help="benchmarks with real guests")
        bench_sub = bench_parser.add_subparsers(dest="bench", required=True,
                                                parser_class=type(bench_parser))
    else:  # another module registered `hv bench` first: add to its subcommands
        actions = [a for a in bench_parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            raise HvError("`hv bench` exists without subcommands; cannot add `sharing`")
        bench_sub = actions[0]
    b = bench_sub.add_parser("sharing", help="boot N guests from one image; measure what "
                             "is shared, what KSM merges and how fast, per KSM policy")
    from hv.sharing.bench import add_arguments
    add_arguments(b)
    b.set_defaults(func=cmd_bench_sharing)
