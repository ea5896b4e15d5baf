#!/usr/bin/env python3
"""Benchmark content-based page sharing (a benchmark, not a test): `hv bench sharing`.

Boots N guests from hv's guest image for each N of --vms, and on the same boots runs
hv's KSM governor, stock KSM, KSM's scan-time advisor and a ksmtuned-like policy in
turn (unmerging in between); prints the table and writes sharing.png and sharing.json
to --out.  Needs root (KSM, pagemap frames).  See hv/bench/sharing.py.

    .venv/bin/python scripts/bench_sharing.py --vms 1,2,4 --timeout 150
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hv.errors import HvError  # noqa: E402
from hv.bench import sharing as bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    args = parser.parse_args()
    try:
        cfg = bench.BenchConfig.from_args(args)
        result = asyncio.run(bench.run(cfg, progress=lambda s: print(s, flush=True)))
    except HvError as exc:
        print(f"bench_sharing: error: {exc}", file=sys.stderr)
        return 1
    print(bench.format_result(result))
    print(f"plot: {result.plot}\ndata: {result.data}")
    return 0 if result.all_converged else 3


if __name__ == "__main__":
    sys.exit(main())
