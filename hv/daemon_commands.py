"""The ``hv run``, ``hv swap`` and ``hv sample`` subcommands (registered by hv.cli).

    hv run --config FILE [--log FILE] [--log-max-size SIZE] [--log-keep N] [--once]
           [--force-state STATE] [--force-state-file FILE] [--allow-other-tuners]
           [--metrics [ADDR:PORT]]
    hv swap create SIZE [--path P] | hv swap remove [--path P] | hv swap status
    hv sample VM [--period S] [--pages N] [--periods K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from pathlib import Path
from typing import Any

from hv import backends
from hv.daemon import Daemon, Options, parse_state
from hv.eventlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES, EventLog
from hv.errors import HvError, UsageError
from hv.host import proc, swap
from hv.policy import VMClock, WorkingSetEstimator
from hv.sampler import Sampler, check_can_sample, follow_vm_time
from hv.units import format_size, parse_size

__all__ = ["register"]


def _notice(line: str) -> None:
    print(f"hv: {line}", file=sys.stderr, flush=True)


# Malloc arenas `hv run` may use: its allocations are small and its threads few; more
# arenas only keep freed memory (the 30-minute soak, docs/soak-30min.md).
MALLOC_ARENAS = 2

# Blocks from this size up (a scan's or a sample's arrays) go back to the system when
# freed instead of leaving holes in the heap (see proc.limit_malloc).
MALLOC_MMAP_THRESHOLD_BYTES = 256 * 1024


async def cmd_run(args: argparse.Namespace) -> int:
    proc.limit_malloc(MALLOC_ARENAS, MALLOC_MMAP_THRESHOLD_BYTES)
    EventLog.check_limits(parse_size(args.log_max_size), args.log_keep)
    options = Options(
        config_path=Path(args.config),
        log_path=Path(args.log) if args.log else None,
        once=args.once,
        force_state=parse_state(args.force_state) if args.force_state else None,
        force_state_file=Path(args.force_state_file) if args.force_state_file else None,
        guardian=not args.no_guardian,
        log_max_bytes=parse_size(args.log_max_size),
        log_keep=args.log_keep,
        allow_tuners=args.allow_other_tuners,
    )
    server = None
    if args.metrics is not None:
        from hv.ops import OpsServer, parse_listen
        server = OpsServer(*parse_listen(args.metrics))
        server.start()  # before anything changes: a port in use refuses the run
        _notice(f"metrics at {server.url}metrics, dashboard at {server.url}")
    daemon = Daemon(options, notify=_notice)
    if server is not None:
        daemon.on_publish.append(server.update)
    try:
        await daemon.run()
    finally:
        if server is not None:
            server.stop()
    return 0


async def cmd_swap(args: argparse.Namespace) -> int:
    if args.swap_command == "create":
        size = parse_size(args.size)
        path = await asyncio.to_thread(swap.create, size, args.path)
        print(f"swap: {path} ({format_size(size)}) created and enabled")
    elif args.swap_command == "remove":
        removed = await asyncio.to_thread(swap.remove, args.path)
        print("swap: " + (", ".join(f"{p} disabled and removed" for p in removed)
                          if removed else "hv created no swap file; nothing removed"))
    else:
        total, free = swap.totals()
        rows = swap.areas()
        print(f"swap: {format_size(total)} total, {format_size(free)} free")
        for a in rows:
            print(f"  {a.path}  {a.kind}  size {format_size(a.size_bytes)}  "
                  f"used {format_size(a.used_bytes)}  prio {a.priority}"
                  + ("  (created by hv)" if a.hv_created else ""))
    return 0


async def cmd_sample(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.period) and args.period > 0) or args.pages < 1 or args.periods < 1:
        raise UsageError("--period must be a finite number > 0, --pages and --periods >= 1")
    check_can_sample()
    async with backends.open_vm(args.vm, args.connect) as vm:
        name = vm.name
        info = vm.info
        sampler = Sampler(info.pid, [(r.hva, r.size) for r in info.ram], args.pages)
        est = WorkingSetEstimator()
        clock = VMClock()

        async def running() -> bool:
            return await vm.status() == "running"

        # Periods count VM time: a paused or CPU-starved VM is not read as idle.
        follower = asyncio.create_task(follow_vm_time(clock, info.pid, running, vm_name=name))
        try:
            for i in range(args.periods):
                if follower.done():
                    follower.result()  # the VM has gone: raise why
                res = await sampler.period(args.period, vm_clock=lambda: clock.seconds)
                if res.discarded is not None:
                    print(f"{name}: period {i + 1}: discarded: {res.discarded}", flush=True)
                    continue
                est.update(res.touched, res.sampled)
                row: dict[str, Any] = {
                    "period": i + 1, "touched": res.touched, "sampled": res.sampled,
                    "dropped": res.dropped, "sampleable": res.sampleable, "present": res.present,
                }
                frac = "-" if res.fraction is None else f"{res.fraction:.3f}"
                print(f"{name}: period {row['period']}: {res.touched}/{res.sampled} touched "
                      f"(f={frac}, dropped {res.dropped}, sampleable {res.sampleable} of "
                      f"{res.present} present)  slow={est.slow if est.slow is None else round(est.slow, 3)} "
                      f"fast={est.fast if est.fast is None else round(est.fast, 3)} "
                      f"active={est.active_fraction:.3f}", flush=True)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, HvError):
                await follower
    return 0


def register(sub: Any) -> None:
    """Add ``run``, ``swap`` and ``sample`` to hv's subcommands."""
    s = sub.add_parser("run", help="the allocation loop: manage the configured VMs' memory")
    s.add_argument("--config", required=True, help="TOML configuration (see hv.policy.config)")
    s.add_argument("--log", help="event log, JSON lines (default: STATE/daemon/events.jsonl)")
    s.add_argument("--log-max-size", default=format_size(DEFAULT_MAX_BYTES), metavar="SIZE",
                   help="rotate the event log past this size (default %(default)s)")
    s.add_argument("--log-keep", type=int, default=DEFAULT_KEEP, metavar="N",
                   help="rotated event-log files kept: FILE.1 (newest) to FILE.N "
                   "(default %(default)s; 0: none)")
    s.add_argument("--allow-other-tuners", action="store_true",
                   help="only warn, instead of refusing to start, when ksmtuned or momd runs")
    s.add_argument("--once", action="store_true",
                   help="one tick (collect, decide, act, log) with the saved estimates, then stop")
    s.add_argument("--force-state", choices=["high", "soft", "hard", "low"],
                   help="act as if free memory were at least this bad (tests, drills)")
    s.add_argument("--force-state-file", metavar="FILE",
                   help="read a forced state from FILE every tick (empty or absent: none)")
    s.add_argument("--no-guardian", action="store_true",
                   help="do not spawn the process that resumes VMs if hv is killed")
    s.add_argument("--metrics", nargs="?", const="", metavar="ADDR:PORT",
                   help="serve Prometheus /metrics and the dashboard / over HTTP "
                   "(default 127.0.0.1:7479)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("swap", help="host swap for hypervisor swapping and the sampler")
    ss = s.add_subparsers(dest="swap_command", required=True, metavar="{create,remove,status}")
    c = ss.add_parser("create", help="create and enable a swap file")
    c.add_argument("size", help="e.g. 2G")
    c.add_argument("--path", help=f"default: {swap.default_path()}")
    c.set_defaults(func=cmd_swap)
    r = ss.add_parser("remove", help="disable and delete the swap file(s) hv created")
    r.add_argument("--path")
    r.set_defaults(func=cmd_swap)
    st = ss.add_parser("status", help="host swap areas")
    st.set_defaults(func=cmd_swap)

    s = sub.add_parser("sample", help="measure one VM's working set by sampling")
    s.add_argument("vm", help="VM name, QMP socket path or libvirt:DOMAIN")
    s.add_argument("--period", type=float, default=30.0, help="seconds per period (default 30)")
    s.add_argument("--pages", type=int, default=100, help="pages per sample (default 100)")
    s.add_argument("--periods", type=int, default=3, help="how many periods (default 3)")
    s.set_defaults(func=cmd_sample)
