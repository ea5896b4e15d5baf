#!/usr/bin/env python3
"""What freeing paged-out memory costs the neighbours (``hv.host.reclaim.release``).

Hypervisor swap pages out random pages of one process (``process_madvise``), then
asks the kernel to free what that left in the swap cache.  The kernel frees from the
tail of the node's inactive list, which holds the paged-out pages only while nothing
disturbs it.  This bench holds --size MiB in a target process and in --neighbours idle
processes, then runs --rounds rounds of --chunk MiB paged out of the target and
released, with the target idle and with it reading its pages at random, and measures
for each:

  * freed: the fall of ``SwapCached`` across the releases (what the host got back of
    what was paged out),
  * collateral: swap written during the releases (pages no page-out chose), and the
    neighbours' ``VmSwap`` at the end,
  * the time the releases took.

hv's stepped release is measured next to the baseline, one request for all that was
paged out (what hv did before), in the same run, on fresh processes each.  Host swap
is created if there is none, and removed at the end.

    flock /tmp/hv-tests.lock .venv/bin/python scripts/bench_release.py \\
        [--size 512] [--chunk 64] [--rounds 20] [--neighbours 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hv.host import reclaim, swap  # noqa: E402
from hv.host.proc import meminfo  # noqa: E402
from hv.sampler import page_out_random  # noqa: E402
from hv.units import MiB, PAGE_SIZE  # noqa: E402

# A process holding argv[1] MiB of distinct pages; "read" reads them at random for ever.
HOLDER = r"""
import ctypes, mmap, random, sys
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, n, 4096):
    m[i:i + 8] = i.to_bytes(8, "little")
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
if sys.argv[2] == "read":
    pages, s = n // 4096, 0
    while True:
        s += m[random.randrange(pages) * 4096]
sys.stdin.read()
"""


# The baseline, one request for all that was paged out (what hv did before), and hv's.
HOW = ("one", "hv")


@dataclass
class Holder:
    proc: subprocess.Popen[str]
    addr: int

    @classmethod
    def start(cls, mib: int, mode: str) -> Holder:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(mib), mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        return cls(p, int(p.stdout.readline()))

    def swapped_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmSwap"))
        return kib / 1024

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Result:
    paged_mib: float
    freed_mib: float
    collateral_mib: float
    neighbours_swapped_mib: list[float]
    release_s: float


def swap_used() -> int:
    info = meminfo()
    return info["SwapTotal"] - info["SwapFree"]


def run(args: argparse.Namespace, target_mode: str, how: str) -> Result:
    neighbours = [Holder.start(args.size, "idle") for _ in range(args.neighbours)]
    target = Holder.start(args.size, target_mode)
    rng = np.random.default_rng(1)
    paged = freed = collateral = 0
    spent = 0.0
    try:
        time.sleep(1)  # the reader up to speed
        for _ in range(args.rounds):
            _, out = page_out_random(target.proc.pid, [(target.addr, args.size * MiB)],
                                     args.chunk * MiB // PAGE_SIZE, rng)
            nbytes = out * PAGE_SIZE
            used = swap_used()
            t0 = time.monotonic()
            r = reclaim.release(nbytes, lambda _: None,
                                step_bytes=(max(nbytes, PAGE_SIZE) if how == "one"
                                            else reclaim.STEP_BYTES))
            spent += time.monotonic() - t0
            if r.problem:
                sys.exit(f"bench_release: {r.problem}")
            paged += nbytes
            freed += r.freed_bytes
            collateral += max(0, swap_used() - used)
            time.sleep(args.pause)
        return Result(paged / MiB, freed / MiB, collateral / MiB,
                      [round(n.swapped_mib(), 1) for n in neighbours], spent)
    finally:
        for h in [*neighbours, target]:
            h.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="MiB each process holds")
    ap.add_argument("--chunk", type=int, default=64, help="MiB paged out per round")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--neighbours", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between rounds")
    args = ap.parse_args()
    if not reclaim.nodes():
        sys.exit("bench_release: the kernel has no per-node proactive reclaim (Linux 6.17+)")
    need = (args.size * (args.neighbours + 1) + args.chunk * args.rounds) * MiB
    made = swap.create(need) if swap.totals()[1] < need else None
    try:
        print(f"{'target':8} {'release':9} {'paged':>7} {'freed':>7} {'collateral':>10} "
              f"{'neighbours VmSwap':>18} {'release s':>9}   (MiB)")
        for target_mode in ("idle", "read"):
            for how in HOW:
                r = run(args, target_mode, how)
                print(f"{target_mode:8} {how:9} "
                      f"{r.paged_mib:7.0f} {r.freed_mib:7.0f} {r.collateral_mib:10.0f} "
                      f"{str(r.neighbours_swapped_mib):>18} {r.release_s:9.2f}", flush=True)
    finally:
        if made is not None:
            swap.remove(made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
