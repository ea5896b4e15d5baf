"""``hv bench FIGURE``: the paper's experiments on real guests.

Every experiment module offers the same few names: ``add_arguments(parser)``,
``config_from_args(args)`` (bad input is a :class:`~hv.errors.UsageError` before
anything starts), ``run(config, progress)`` and ``format_result(result)``, whose result
has ``plot``, ``data`` and ``complete``.  The handler runs it with progress lines on
stdout, prints the result table and where the JSON and PNG went.  The exit code
is 0, or 3 when the run finished but missed what it measures (a policy that did not
converge, a shape the paper shows that this run does not).
"""

from __future__ import annotations

import argparse
import functools
import importlib
from typing import Any

__all__ = ["register"]

MISSED = 3  # the run completed, but a result misses (printed above the exit)


def _say(line: str) -> None:
    print(line, flush=True)


async def _run(module: str, args: argparse.Namespace) -> int:
    """Configure, run and report one experiment (``hv.bench.MODULE``)."""
    bench = importlib.import_module(f"hv.bench.{module}")
    cfg = bench.config_from_args(args)
    result = await bench.run(cfg, progress=_say)
    print(bench.format_result(result))
    print(f"plot: {result.plot}\ndata: {result.data}")
    return 0 if result.complete else MISSED


# Each experiment: (subcommand = module of hv.bench, help).  In the paper's order.
EXPERIMENTS = (
    ("balloon", "Figure 2: a workload's throughput in a guest booted at X, ballooned down "
     "to X, and held at X by hypervisor swap"),
    ("sharing", "Figure 4: boot N guests from one image; measure what is shared, what KSM "
     "merges and how fast, per KSM policy"),
    ("workloads", "Figure 5: Debian guests running real services (web, database, cache, "
     "runtime) under load; shared, reclaimed, zero pages"),
    ("sampling", "Figure 6: the working-set estimates against a working set that grows, "
     "shrinks and grows again"),
    ("tax", "Figure 7: an idle and an active VM under host pressure; the idle memory tax "
     "(0, then 0.75 by reload) moves memory to the active one"),
    ("overcommit", "Figure 8: five VMs with mixed workloads overcommit the host under a "
     "memory locker's pressure; states and allocations"),
)


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="the paper's experiments on real guests")
    sub = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))
    for name, help_text in EXPERIMENTS:
        b = sub.add_parser(name, help=help_text)
        importlib.import_module(f"hv.bench.{name}").add_arguments(b)
        b.set_defaults(func=functools.partial(_run, name))
