#!/usr/bin/env python3
"""Benchmark hv's native scanner (a benchmark, not a test).

Prints, from one run on one core, every figure the best of --repeat runs:
  * memcpy bandwidth (the ceiling for any copy of memory; measured before and
    after the scans, the better figure counts),
  * XXH3-64 over 4 KiB pages already in memory (the ceiling for hashing),
  * the native scan as hv runs it (pagemap + kpageflags, process_vm_readv for
    exclusive non-KSM pages, pread /proc/PID/mem for the rest, XXH3), and the
    same scan with pread only,
  * the two ways to read without pagemap or kpageflags, driven from Python:
    process_vm_readv + XXH3 of the same pages in 256 KiB reads, and pread
    /proc/PID/mem alone in 2 MiB reads,
  * a pure-Python scan of the same present pages (pagemap with numpy, 2 MiB
    reads of /proc/PID/mem, the ``xxhash`` package's xxh3_64 per page),
and whether the native scan reaches GOAL_OF_MEMCPY of memcpy.

By default it spawns its own victim process that maps --size MiB (mostly unique
content, some duplicate pages, some all-zero pages, a few never touched) in 4 KiB
pages (MADV_NOHUGEPAGE: the worst case, scattered frames, a kpageflags entry per
page); ``--thp`` maps it MADV_HUGEPAGE instead, as QEMU marks guest RAM; with
``--pid PID --range START:LEN`` it scans a real process instead (e.g. QEMU's guest
RAM: START and LEN in bytes, hex with 0x allowed; repeat --range for more).

    python scripts/bench_scanner.py --size 1024
    python scripts/bench_scanner.py --size 1024 --thp
    python scripts/bench_scanner.py --pid $(pgrep -f qemu-system) --range 0x7f...:0x20000000

The process_vm_readv ceiling is measured on the victim only: it pins the pages it
reads, which would unmerge KSM pages of a real guest.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

# numpy's BLAS threads spin for a while after numpy work, on any core, and showed
# as ~4% of the scan's core in perf: one thread, before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from hv.host import native  # noqa: E402
from hv.units import MiB, PAGE_SIZE  # noqa: E402

GOAL_OF_MEMCPY = 0.50  # issue 7, item 9: the scan at half of memcpy bandwidth or better

# The victim: mmap SIZE MiB without huge pages (argv[2] "thp": with), fill it, print
# where it is, wait.
VICTIM = r"""
import ctypes, json, mmap, sys
import numpy as np
size_mib = int(sys.argv[1])
n = size_mib * 256
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE if sys.argv[2] == "thp" else mmap.MADV_NOHUGEPAGE)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
words = np.frombuffer(m, dtype=np.uint64).reshape(n, 512)
rng = np.random.default_rng(1)
unique = n * 80 // 100          # 80% unique pages
dups = n * 10 // 100            # 10% copies of 64 patterns
zeros = n * 5 // 100            # 5% written, then zeroed; the last 5% untouched
for s in range(0, unique, 4096):
    e = min(unique, s + 4096)
    words[s:e] = rng.integers(0, 2**63, size=(e - s, 512), dtype=np.uint64)
words[unique:unique + dups] = words[np.arange(dups) % 64]
words[unique + dups:unique + dups + zeros] = 1
words[unique + dups:unique + dups + zeros] = 0
print(json.dumps({"base": base, "length": n * 4096}), flush=True)
sys.stdin.readline()
"""


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Shortest wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def python_scan(pid: int, ranges: Sequence[tuple[int, int]], readable: np.ndarray) -> int:
    """Pure-Python scan of the pages marked readable; returns pages hashed."""
    import xxhash

    hashed = 0
    run_pages = 2 * MiB // PAGE_SIZE
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, \
            open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        offset = 0
        for start, length in ranges:
            n = length // PAGE_SIZE
            pm = np.frombuffer(os.pread(pagemap.fileno(), n * 8, start // PAGE_SIZE * 8),
                               dtype=np.uint64)
            present = (pm >> np.uint64(63)) != 0
            todo = present & readable[offset:offset + n]
            idx = np.flatnonzero(todo)
            i = 0
            while i < len(idx):
                j = i + 1
                while j < len(idx) and idx[j] == idx[j - 1] + 1 and j - i < run_pages:
                    j += 1
                first = int(idx[i])
                data = os.pread(mem.fileno(), (j - i) * PAGE_SIZE, start + first * PAGE_SIZE)
                for k in range(len(data) // PAGE_SIZE):
                    xxhash.xxh3_64_intdigest(data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
                    hashed += 1
                i = j
            offset += n
    return hashed


def readv_hash(pid: int, ranges: Sequence[tuple[int, int]], readable: np.ndarray) -> None:
    """process_vm_readv of the readable pages in 256 KiB runs, then XXH3 of each:
    the ceiling of any process_vm_readv scan (no pagemap, no kpageflags)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    run_pages = 256 * 1024 // PAGE_SIZE
    buf = np.zeros(run_pages * PAGE_SIZE, dtype=np.uint8)
    local = IoVec(buf.ctypes.data, 0)
    remote = IoVec(0, 0)
    offset = 0
    for start, length in ranges:
        n = length // PAGE_SIZE
        idx = np.flatnonzero(readable[offset:offset + n])
        if len(idx):
            breaks = np.flatnonzero(np.diff(idx) != 1) + 1
            for run in np.split(idx, breaks):
                for c in range(0, len(run), run_pages):
                    part = run[c:c + run_pages]
                    local.len = remote.len = len(part) * PAGE_SIZE
                    remote.base = start + int(part[0]) * PAGE_SIZE
                    if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) < 0:
                        raise OSError(ctypes.get_errno(), "process_vm_readv")
                    native.hash_pages(buf[:local.len])
        offset += n


def anon_huge_mib(pid: int) -> int:
    """MiB of the process mapped in transparent huge pages (smaps_rollup AnonHugePages)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) // 1024
    return 0


def parse_range(text: str) -> tuple[int, int]:
    start, _, length = text.partition(":")
    return int(start, 0), int(length, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="victim size in MiB (default 1024)")
    ap.add_argument("--thp", action="store_true",
                    help="victim in transparent huge pages (MADV_HUGEPAGE, as QEMU's guest RAM)")
    ap.add_argument("--pid", type=int, help="scan this process instead of a victim")
    ap.add_argument("--range", action="append", type=parse_range, default=[],
                    help="START:LEN in bytes of the process to scan (with --pid)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure; the best counts")
    ap.add_argument("--batch-kib", type=int, action="append", default=[],
                    help="read window of the native scan in KiB (repeatable; default: the C default)")
    ap.add_argument("--no-python", action="store_true", help="skip the pure-Python scan")
    args = ap.parse_args()

    victim: subprocess.Popen[str] | None = None
    if args.pid is None:
        victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(args.size), "thp" if args.thp else "4k"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert victim.stdout is not None
        info = json.loads(victim.stdout.readline())
        pid, ranges = victim.pid, [(int(info["base"]), int(info["length"]))]
    else:
        if not args.range:
            ap.error("--pid needs at least one --range START:LEN")
        pid, ranges = args.pid, list(args.range)

    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
        copy_bytes = 256 * MiB
        rounds = 8

        def memcpy_gbs() -> float:
            secs = min(native.memcpy_seconds(copy_bytes, rounds) for _ in range(args.repeat))
            return copy_bytes * rounds / secs / 1e9

        memcpy_before = memcpy_gbs()
        print(f"memcpy                 {memcpy_before:6.2f} GB/s")

        buf = np.random.default_rng(2).integers(0, 255, size=256 * MiB, dtype=np.uint8)
        t_hash = best_of(args.repeat, lambda: native.hash_pages(buf))
        hash_bytes = buf.size
        del buf

        first = native.scan(pid, ranges)
        readable = first.has(native.PageFlags.READ)
        # hv scans into its page-state files, allocated once: so does the benchmark.
        hashes = np.zeros(first.pages, dtype=np.uint64)
        flags = np.zeros(first.pages, dtype=np.uint16)
        pfns = np.zeros(first.pages, dtype=np.uint64)

        def pread_only() -> None:
            # The kernel's side alone: the same reads, nothing hashed.
            buf = bytearray(2 * MiB)
            view = memoryview(buf)
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                offset = 0
                for start, length in ranges:
                    n = length // PAGE_SIZE
                    idx = np.flatnonzero(readable[offset:offset + n])
                    if len(idx):
                        # runs of readable pages, cut at 2 MiB
                        breaks = np.flatnonzero((np.diff(idx) != 1)) + 1
                        for run in np.split(idx, breaks):
                            for c in range(0, len(run), len(buf) // PAGE_SIZE):
                                part = run[c:c + len(buf) // PAGE_SIZE]
                                os.preadv(mem.fileno(), [view[:len(part) * PAGE_SIZE]],
                                          start + int(part[0]) * PAGE_SIZE)
                    offset += n

        print(f"target: pid {pid}, {first.pages} pages, {first.present} present, "
              f"{first.read} read, {first.ksm} KSM, {first.zero} zero "
              f"({first.zero_page} zero-page), {first.thp} THP, {first.swapped} swapped; "
              f"process: {anon_huge_mib(pid)} MiB in huge pages")
        scans: list[tuple[str, float, native.ScanResult]] = []
        for batch_kib in args.batch_kib or [0]:
            for pread in (False, True):
                res: list[native.ScanResult] = []
                t = best_of(args.repeat, lambda: res.append(native.scan(
                    pid, ranges, batch_bytes=batch_kib * 1024, pread_only=pread,
                    hashes=hashes, flags=flags, pfns=pfns)))
                label = "native scan" + (" pread only" if pread else "") + \
                    (f" ({batch_kib} KiB)" if batch_kib else "")
                scans.append((label, t, res[-1]))

        # process_vm_readv pins what it reads: never of another process's pages that
        # may be KSM or shared, so this ceiling is measured on the benchmark's victim only.
        t_readv: float | None = None
        if victim is not None:
            t_readv = best_of(args.repeat, lambda: readv_hash(pid, ranges, readable))
        t_pread = best_of(args.repeat, pread_only)
        memcpy = max(memcpy_before, memcpy_gbs())
        print(f"memcpy (after)         {memcpy:6.2f} GB/s  (the better of before and after counts)")
        print(f"XXH3 in memory         {hash_bytes / PAGE_SIZE / t_hash / 1e6:6.2f} M pages/s  "
              f"{hash_bytes / t_hash / 1e9:6.2f} GB/s  ({hash_bytes / t_hash / 1e9 / memcpy:4.0%} of memcpy)")
        for label, t, last in scans:
            gbs = last.bytes_read / t / 1e9
            print(f"{label:34} {last.present / t / 1e6:5.2f} M present pages/s  "
                  f"{last.read / t / 1e6:5.2f} M read pages/s  {gbs:5.2f} GB/s read"
                  f"  ({gbs / memcpy:4.0%} of memcpy)  {t * 1e3:.0f} ms,"
                  f" {last.bytes_readv / max(last.bytes_read, 1):4.0%} by process_vm_readv,"
                  f" {last.readvs} readv + {last.preads} pread calls, {last.readv_declined} declined,"
                  f" {last.readv_huge} pages huge-mapped (no kpageflags)")
        nbytes = int(readable.sum()) * PAGE_SIZE
        ceilings: list[tuple[str, float | None]] = [("process_vm_readv + XXH3", t_readv),
                                                    ("pread /proc/PID/mem", t_pread)]
        for label, tc in ceilings:
            if tc is None:
                continue
            t = tc
            print(f"{label:34} {nbytes / PAGE_SIZE / t / 1e6:5.2f} M read pages/s  "
                  f"{nbytes / t / 1e9:5.2f} GB/s read  ({nbytes / t / 1e9 / memcpy:4.0%} of memcpy;"
                  f" from Python, no pagemap or kpageflags)")

        label, t, hv_scan = scans[0]
        ratio = hv_scan.bytes_read / t / 1e9 / memcpy
        verdict = "REACHES" if ratio >= GOAL_OF_MEMCPY else "DOES NOT REACH"
        target = f"pid {pid}" if victim is None else \
            ("victim in huge pages" if args.thp else "victim in 4 KiB pages")
        print(f"\n{label} ({target}) {hv_scan.bytes_read / t / 1e9:.2f} GB/s vs memcpy {memcpy:.2f} GB/s "
              f"= {ratio:.1%}: {verdict} the goal of {GOAL_OF_MEMCPY:.0%} of memcpy")

        if not args.no_python:
            hashed = [0]

            def run() -> None:
                hashed[0] = python_scan(pid, ranges, readable)

            t = best_of(min(args.repeat, 2), run)
            print(f"pure-Python scan       {hashed[0] / t / 1e6:6.2f} M read pages/s  "
                  f"{hashed[0] * PAGE_SIZE / t / 1e9:6.2f} GB/s read  {t * 1e3:.0f} ms")
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
