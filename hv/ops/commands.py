"""The ``hv top`` subcommand (registered by hv.cli).

    hv top [--sort COLUMN] [--reverse] [--once | --json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hv.errors import HvError
from hv.ops import top
from hv.published import running_status, status_file

__all__ = ["register", "cmd_top"]


async def cmd_top(args: argparse.Namespace) -> int:
    sort = top.Sort(args.sort, args.reverse)
    if args.once or args.json:
        snap = running_status()
        if snap is None:
            raise HvError(f"no hv run is running (no live status in {status_file()})")
        print(json.dumps(snap, indent=1) if args.json else top.frame(snap, sort))
        return 0
    if not sys.stdout.isatty():
        raise HvError("hv top needs a terminal; use --once or --json otherwise")
    top.run(running_status, sort)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("top", help="live view of the running hv run (reads its published "
                       "status, not QMP)")
    s.add_argument("--sort", choices=list(top.COLUMNS), default="resident",
                   help="column to sort by (default resident); s/S change it live")
    s.add_argument("--reverse", action="store_true", help="reverse the sort order")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--once", action="store_true", help="print one frame and exit")
    out.add_argument("--json", action="store_true", help="print the snapshot as JSON and exit")
    s.set_defaults(func=cmd_top)
