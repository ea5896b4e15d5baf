#!/usr/bin/env python3
"""Balloon benchmark: how fast a guest inflates and deflates, and what the host gets back.

Boots one guest that touches HOG MiB and frees it, then balloons it from its full size
down to TARGET and back, printing the time each way and the fall of the host's resident
memory of guest RAM next to the amount ballooned out of touched memory.

    .venv/bin/python scripts/bench_balloon.py [--mem 256] [--hog 150] [--target 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

from hv.errors import HvError
from hv.qemu import accel, launch
from hv.units import MiB


async def wait_console(path: str, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path) and needle in open(path, errors="replace").read():
            return
        await asyncio.sleep(0.2)
    raise HvError(f"guest did not print {needle!r} within {timeout_s:.0f} s")


async def bench(mem_mib: int, hog_mib: int, target_mib: int) -> None:
    verdict = accel.choose()
    spec = launch.GuestSpec(name="bench-balloon", mem_bytes=mem_mib * MiB, workload="hog",
                            params={"hog_mib": str(hog_mib), "hog_hold_s": "1"}, accel=verdict.accel)
    vm = await launch.launch(spec)
    try:
        await wait_console(str(launch.console_log(spec.name)), "event=hog_freed", 120)
        deadline = time.monotonic() + 30
        while ((await vm.guest_stats(max_age_s=3)).available_bytes or 0) < hog_mib * MiB:
            if time.monotonic() > deadline:
                raise HvError("guest statistics never showed the hog's memory freed")
            await asyncio.sleep(0.5)
        rss0 = vm.host_usage().rss_bytes
        t0 = time.monotonic()
        await vm.set_balloon(target_mib * MiB)
        await vm.wait_balloon(target_mib * MiB, 120)
        inflate_s = time.monotonic() - t0
        rss1 = vm.host_usage().rss_bytes
        t0 = time.monotonic()
        await vm.set_balloon(mem_mib * MiB)
        await vm.wait_balloon(mem_mib * MiB, 120)
        deflate_s = time.monotonic() - t0
        out_of_touched = min(mem_mib - target_mib, hog_mib)
        fell = (rss0 - rss1) / MiB
        print(f"accelerator            {verdict.accel}")
        print(f"guest                  {mem_mib} MiB, touched and freed {hog_mib} MiB")
        print(f"balloon                {mem_mib} -> {target_mib} MiB in {inflate_s:.2f} s "
              f"({(mem_mib - target_mib) / inflate_s:.0f} MiB/s); back in {deflate_s:.2f} s")
        print(f"host RSS of guest RAM  {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB: fell {fell:.1f} MiB")
        print(f"baseline               {out_of_touched} MiB ballooned out of touched memory; "
              f"fall = {100 * fell / out_of_touched:.0f}% of it (goal >= 80%)")
    finally:
        await vm.detach()
        await launch.stop(spec.name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mem", type=int, default=256, help="guest MiB")
    p.add_argument("--hog", type=int, default=150, help="MiB the guest touches then frees")
    p.add_argument("--target", type=int, default=100, help="balloon target MiB")
    args = p.parse_args()
    os.environ.setdefault("HV_RUN_DIR", tempfile.mkdtemp(prefix="hv-bench-"))
    try:
        asyncio.run(bench(args.mem, args.hog, args.target))
    except HvError as exc:
        print(f"bench_balloon: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
