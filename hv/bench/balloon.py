"""``hv bench balloon`` (the paper's Figure 2): ballooned against configured memory.

The same memory-bound workload runs in three kinds of guest, at each size X:

- **configured**: a guest booted with X;
- **ballooned**: a guest booted with ``--mem`` (larger) and ballooned down to X
  (``hv balloon``'s QMP path: :meth:`hv.qemu.vm.VM.set_balloon`);
- **swapped**: a guest booted with ``--mem`` and held at X of host memory by
  hypervisor swap instead, as ``hv run`` pages out a VM whose balloon cannot get there:
  every :data:`SWAP_TICK_S` the excess over X is paged out, chosen at random among the
  guest's present pages (``MADV_PAGEOUT``), because the hypervisor cannot know which
  pages the guest needs (the paper's argument for ballooning, its section 3).

**Workloads** (hv's initramfs image, ``--workload``):

- ``pagecache`` (the default; the paper ran dbench, whose throughput is its page
  cache): ``filecache`` reads a ``--file`` MiB disk of random data in 1 MiB blocks at
  random, seeded alike in every guest (``--access random``, ``file_loop=2``), or from
  start to end again and again (``--access cyclic``, ``file_loop=1``); the throughput
  is MiB read per second.  A guest whose cache holds the whole disk reads it from
  memory; a smaller one partly from the virtual disk.  Read at random, the share that
  hits is what the cache holds of the disk, whatever its history; read cyclically,
  a cache smaller than the disk misses every block under plain LRU, but a guest
  ballooned down from a larger size keeps hitting on what its older cache had
  made active, so the two series measure the cache's history, not its size (the
  committed cyclic run: ballooned 14 % and 51 % faster at 256 and 192 MiB).
- ``toucher``: the toucher writes one word of every page of its ``--ws`` MiB working
  set, pass after pass (``rate=0``); the throughput is passes per second.  Beside it,
  ``filecache`` reads a disk of ``--mem`` MiB once, so the guest's whole memory is in
  use (clean cache) and the balloon and the page-out have a full guest to take from.

The two large guests are booted once and paused while the other series run, so that
only one guest runs at a time (2 cores; TCG); the sizes go from the largest down.  At
each size the configured guest boots, then each large guest is brought down to X and
runs there for ``--settle``; then each series' ``--window`` is measured as
``--rounds`` slices taken in rotation (configured, ballooned, swapped; then ballooned,
swapped, configured; ...), each after :data:`SLICE_SETTLE_S` of running, so that a slow
patch of the shared host falls on every series alike.  A slice is the workload's own
per-second console lines (a running count and guest time); a series' throughput is
its slices' counts over their guest time.
The guests read a disk of random data made for the run in ``/var/tmp``; host swap is
created for the swapped series if the host has less than ``--mem`` free.  Both are
removed at the end, as every guest is stopped, even after an error or ^C.

**Shape** (the issue's): the ballooned throughput is within :data:`BALLOON_TOLERANCE`
of the configured one at every size.  The swapped series has no bound; it is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hv.bench import report
from hv.bench.args import int_list
from hv.bench.fleet import Fleet, GuestPlan, Progress, console_events, refuse_if_daemon, wait_event
from hv.bench.hostswap import host_swap
from hv.errors import HvError, UsageError
from hv.host import reclaim
from hv.qemu.launch import console_log
from hv.qemu.vm import VM, balloon_floor
from hv.sampler import check_can_sample, page_out_random
from hv.units import MiB, PAGE_SIZE, parse_size, table

__all__ = ["BalloonConfig", "BalloonResult", "SERIES", "BALLOON_TOLERANCE", "ACCESSES", "add_arguments",
           "config_from_args", "run", "format_result", "shape_rows", "throughput"]

SERIES = ("configured", "ballooned", "swapped")
T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    """What runs in the guest and which running count of its console lines is throughput."""

    programs: str  # hv.workload
    event: str  # its per-second line: event=EVENT t_s=T COUNTER=N
    counter: str
    unit: str


WORKLOADS = {
    "pagecache": Workload("filecache", "filecache", "read_mib", "MiB/s"),
    "toucher": Workload("toucher,filecache", "toucher", "passes", "passes/s"),
}
BALLOON_TOLERANCE = 0.10  # the bound: ballooned within 10 % of configured
GUEST_RESERVE_MIB = 128  # the guest's kernel, init and some cache beside the toucher
SLICE_SETTLE_S = 2.0  # a resumed guest's workload back in stride before a slice
SWAP_TICK_S = 0.5  # how often the excess over X is paged out (hv run's tick is 1-2 s)
SWAP_SLACK_BYTES = 2 * MiB  # "at X": resident guest RAM within this of X
REDUCE_TIMEOUT_S = 60.0  # TCG balloons and pages out a few hundred MiB in seconds
FILL_TIMEOUT_S = 300.0  # toucher fill and the disk read, several guests at once under TCG
REPORT_TIMEOUT_S = 30.0  # the toucher prints a line every guest second
DISK_CHUNK = 4 * MiB
ACCESS_SEED = 1  # every guest reads the disk's blocks in the same random order
ACCESSES = ("random", "cyclic")


@dataclass(frozen=True)
class BalloonConfig:
    sizes_mib: tuple[int, ...] = (192, 256, 320, 384, 448)
    mem_bytes: int = 512 * MiB
    workload: str = "pagecache"
    file_mib: int = 200
    access: str = "random"  # pagecache: blocks at random, or the disk cyclically
    ws_mib: int = 64
    window_s: float = 25.0
    rounds: int = 5  # the window taken as this many slices, the series in rotation
    settle_s: float = 8.0
    prefix: str = "bb"
    out_dir: Path = Path("bench-balloon")

    @property
    def mem_mib(self) -> int:
        return self.mem_bytes // MiB

    @property
    def disk_mib(self) -> int:
        """The disk read: the looped file, or (toucher) one the size of the large guests."""
        return self.file_mib if self.workload == "pagecache" else self.mem_mib

    def params(self) -> tuple[tuple[str, str], ...]:
        disk = (("file_dev", "/dev/vda"), ("file_mib", "0"))
        if self.workload == "pagecache":
            loop = "2" if self.access == "random" else "1"
            return (*disk, ("file_loop", loop), ("seed", str(ACCESS_SEED)))
        return (("alloc_mib", str(self.ws_mib)), ("rate", "0"), *disk)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "BalloonConfig":
        sizes = int_list("--sizes", a.sizes)
        if len(set(sizes)) != len(sizes):
            raise UsageError("--sizes: every size must differ")
        mem = parse_size(a.mem)
        if mem % MiB:
            raise UsageError("-m/--mem must be a whole number of MiB")
        if a.ws < 1 or a.file < 1:
            raise UsageError("--ws and --file must be at least 1 MiB")
        least = balloon_floor(mem) // MiB
        if a.workload == "toucher":
            least = max(least, a.ws + GUEST_RESERVE_MIB)
        if min(sizes) < least:
            raise UsageError(f"--sizes: {min(sizes)} MiB is too small: the {a.workload} "
                             f"workload needs guests of at least {least} MiB")
        if max(sizes) > mem // MiB:
            raise UsageError(f"--sizes: {max(sizes)} MiB is above the ballooned guests' "
                             f"{mem // MiB} MiB (-m)")
        if not (math.isfinite(a.window) and a.window >= 3):
            raise UsageError("--window must be at least 3 seconds")
        if not 1 <= a.rounds <= a.window / 3:
            raise UsageError("--rounds must be at least 1, with slices of at least 3 seconds "
                             "(--window / --rounds)")
        if not (math.isfinite(a.settle) and a.settle >= 0):
            raise UsageError("--settle must be a number of seconds >= 0")
        return cls(tuple(sorted(sizes, reverse=True)), mem, a.workload, a.file, a.access,
                   a.ws, a.window, a.rounds, a.settle, a.prefix, Path(a.out))


def config_from_args(a: argparse.Namespace) -> BalloonConfig:
    return BalloonConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="192,256,320,384,448", metavar="MIB,...",
                   help="the guest sizes X (default 192,256,320,384,448)")
    p.add_argument("-m", "--mem", default="512M",
                   help="boot size of the ballooned and swapped guests (default 512M)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="pagecache",
                   help="pagecache: read a disk again and again (MiB/s); toucher: write a "
                   "working set pass after pass (passes/s)  (default pagecache)")
    p.add_argument("--file", type=int, default=200, metavar="MIB",
                   help="pagecache: the disk read in a loop (default 200)")
    p.add_argument("--access", choices=ACCESSES, default="random",
                   help="pagecache: read the disk's 1 MiB blocks at random, or from start to "
                   "end again and again (cyclic)  (default random)")
    p.add_argument("--ws", type=int, default=64, metavar="MIB",
                   help="toucher: the working set (default 64)")
    p.add_argument("--window", type=float, default=25.0, metavar="SECONDS",
                   help="how long each throughput is measured (default 25)")
    p.add_argument("--rounds", type=int, default=5, metavar="N",
                   help="take each window as N slices, the three series in rotation, so that "
                   "a slow patch of the host falls on all of them (default 5)")
    p.add_argument("--settle", type=float, default=8.0, metavar="SECONDS",
                   help="how long the workload runs at X before the window (default 8)")
    p.add_argument("--prefix", default="bb", help="prefix of the guests' names")
    p.add_argument("--out", default="bench-balloon", help="directory for the PNG and JSON")


@dataclass
class BalloonResult:
    config: dict[str, Any]
    runs: list[dict[str, Any]]            # one per (size, series)
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per size: shape_rows
    swap_created_mib: int = 0
    plot: Path = Path()
    data: Path = Path()

    @property
    def shapes_hold(self) -> bool:
        return bool(self.rows) and all(r["shape_holds"] for r in self.rows)

    @property
    def complete(self) -> bool:
        """What ``hv bench`` exits 0 on: every series measured, the shape held."""
        return self.shapes_hold


# -- analysis (pure) -----------------------------------------------------------------
def throughput(points: list[tuple[float, int]]) -> float | None:
    """Count per guest second between the first and the last (t_s, count) line."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    (t0, p0), (t1, p1) = points[0], points[-1]
    return (p1 - p0) / (t1 - t0)


def shape_rows(runs: list[dict[str, Any]], sizes_mib: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per size: each series' passes/s, ratios to configured, and the shape."""
    rows = []
    for x in sizes_mib:
        got = {r["series"]: r for r in runs if r["size_mib"] == x}
        rate = {s: got[s]["throughput"] if s in got else None for s in SERIES}
        conf = rate["configured"]
        ratio = {s: (round(rate[s] / conf, 4) if conf and rate[s] is not None else None)
                 for s in ("ballooned", "swapped")}
        misses = [f"no {s} throughput" for s in SERIES if not rate[s]]
        bal = ratio["ballooned"]
        if bal is not None and abs(bal - 1) > BALLOON_TOLERANCE:
            misses.append(f"ballooned {100 * (bal - 1):+.1f} % from configured "
                          f"(bound {100 * BALLOON_TOLERANCE:g} %)")
        misses += [f"{s} never got down to {x} MiB" for s in SERIES
                   if s in got and not got[s]["reached"]]
        rows.append({"size_mib": x, **{f"{s}_throughput": rate[s] for s in SERIES},
                     "ballooned_ratio": bal, "swapped_ratio": ratio["swapped"],
                     "misses": misses, "shape_holds": not misses})
    return rows


# -- the run -------------------------------------------------------------------------
def _points(name: str, w: Workload) -> list[tuple[float, int]]:
    """The workload's (guest seconds, running count) lines so far.  A line the guest
    kernel's own messages cut on the serial console is left out: the counts run on,
    so the next whole line covers its second."""
    out = []
    for e in console_events(name, w.event):
        try:
            out.append((float(e["t_s"]), int(e[w.counter])))
        except (KeyError, ValueError):
            continue
    return out


async def _next_point(name: str, w: Workload, after: int) -> int:
    """Index of the workload's first line after the first ``after`` ones (waits for it)."""
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while len(_points(name, w)) <= after:
        if time.monotonic() > deadline:
            raise HvError(f"{name}: no event={w.event} line for {REPORT_TIMEOUT_S:.0f} s "
                          f"(see {console_log(name)})")
        await asyncio.sleep(0.2)
    return after


async def _slice(vm: VM, cfg: BalloonConfig, seconds: float) -> list[tuple[float, int]]:
    """The workload's console lines over ``seconds`` from now (one slice of a window)."""
    w = WORKLOADS[cfg.workload]
    first = await _next_point(vm.name, w, len(_points(vm.name, w)))
    await asyncio.sleep(seconds)  # the measurement interval itself
    last = await _next_point(vm.name, w, len(_points(vm.name, w)))
    return _points(vm.name, w)[first:last + 1]


def pooled_throughput(slices: list[list[tuple[float, int]]]) -> float | None:
    """Count per guest second over all slices: their counts over their guest times."""
    spans = [(s[-1][1] - s[0][1], s[-1][0] - s[0][0]) for s in slices
             if len(s) >= 2 and s[-1][0] > s[0][0]]
    seconds = sum(t for _, t in spans)
    return sum(c for c, _ in spans) / seconds if seconds > 0 else None


class Squeeze:
    """Hypervisor swap: page the excess over ``target_bytes`` out, random pages, each tick,
    and free what that left in the swap cache, as ``hv run`` does (:mod:`hv.host.reclaim`).

    No guard file records the reclaim tunable while it is lowered (milliseconds per
    tick): a bench killed in that moment leaves ``vm.min_unmapped_ratio`` at 0, which
    matters only with zone reclaim on, where it is not touched."""

    def __init__(self, vm: VM, target_bytes: int, seed: int = 0) -> None:
        self.vm = vm
        self.target_bytes = target_bytes
        self.rng = np.random.default_rng(seed)
        self.invalidated = 0
        self.freed_bytes = 0  # left the swap cache after the page-outs
        self.collateral_bytes = 0  # written to swap by the releases: pages not paged out
        self.rss_seen: list[int] = []  # resident bytes of guest RAM found at each tick

    def tick(self) -> int:
        """Page out once; returns the resident bytes of guest RAM after it."""
        info = self.vm.info
        rss = self.vm.host_usage().rss_bytes
        self.rss_seen.append(rss)
        excess = (rss - self.target_bytes) // PAGE_SIZE
        if excess * PAGE_SIZE <= SWAP_SLACK_BYTES:
            return rss
        _, out = page_out_random(info.pid, [(r.hva, r.size) for r in info.ram], int(excess),
                                 self.rng)
        self.invalidated += out
        r = reclaim.release(out * PAGE_SIZE, lambda _: None)
        self.freed_bytes += r.freed_bytes
        self.collateral_bytes += r.collateral_bytes
        return rss - out * PAGE_SIZE

    async def down(self, timeout_s: float) -> bool:
        """Tick until a page-out brings resident guest RAM to the target; False at timeout.

        A guest that keeps using the pages paged out brings them back between ticks: the
        resident memory then swings above X between ticks (``rss_seen``)."""
        deadline = time.monotonic() + timeout_s
        while self.tick() > self.target_bytes + SWAP_SLACK_BYTES:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(SWAP_TICK_S)
        return True

    async def hold(self) -> None:
        """Keep ticking (a task, cancelled when the window ends)."""
        while True:
            self.tick()
            await asyncio.sleep(SWAP_TICK_S)


def _plan(cfg: BalloonConfig, name: str, mem_mib: int, disk: Path) -> GuestPlan:
    return GuestPlan(name, mem_mib * MiB, WORKLOADS[cfg.workload].programs, cfg.params(),
                     disk=disk)


async def _ready(plan: GuestPlan) -> None:
    """The disk read once (and the toucher's allocation written)."""
    await wait_event(plan.name, "filecache_done", FILL_TIMEOUT_S)
    if "toucher" in plan.workload:
        await wait_event(plan.name, "toucher_filled", FILL_TIMEOUT_S)


def _make_disk(path: Path, mib: int) -> None:
    """``mib`` MiB of random data: page cache that no other page equals."""
    with open(path, "wb") as f:
        for _ in range(mib * MiB // DISK_CHUNK):
            f.write(os.urandom(DISK_CHUNK))


async def _ballooned_to(vm: VM, cfg: BalloonConfig, x: int) -> dict[str, Any]:
    """Balloon the running guest down to X and let the workload settle there."""
    rss0 = vm.host_usage().rss_bytes
    t0 = time.monotonic()
    await vm.set_balloon(x * MiB)
    await vm.wait_balloon(x * MiB, REDUCE_TIMEOUT_S)
    reduce_s = time.monotonic() - t0
    rss_at_x = vm.host_usage().rss_bytes
    await asyncio.sleep(cfg.settle_s)
    return {"reached": True, "reduce_s": round(reduce_s, 2), "rss_before_mib": round(rss0 / MiB, 1),
            "rss_at_x_mib": round(rss_at_x / MiB, 1)}


async def _swapped_to(squeeze: Squeeze, cfg: BalloonConfig) -> dict[str, Any]:
    """Page the running guest out to X and let the workload settle there (held at X)."""
    rss0 = squeeze.vm.host_usage().rss_bytes
    t0 = time.monotonic()
    reached = await squeeze.down(REDUCE_TIMEOUT_S)
    reduce_s = time.monotonic() - t0
    async with _holding(squeeze):
        await asyncio.sleep(cfg.settle_s)
    squeeze.invalidated, squeeze.freed_bytes, squeeze.collateral_bytes = 0, 0, 0
    squeeze.rss_seen = []
    return {"reached": reached, "reduce_s": round(reduce_s, 2),
            "rss_before_mib": round(rss0 / MiB, 1)}


@contextlib.asynccontextmanager
async def _holding(squeeze: Squeeze | None) -> AsyncIterator[None]:
    """Hypervisor swap holding the guest at X while it runs (nothing for the others)."""
    task = asyncio.create_task(squeeze.hold()) if squeeze is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _resumed(vm: VM, measure: Callable[[], Awaitable[T]]) -> T:
    """Run ``measure`` with the (paused) guest running; pause it again after."""
    await vm.resume()
    try:
        return await measure()
    finally:
        await vm.pause()


def rotation(series: list[str], rounds: int) -> list[str]:
    """The order of a size's slices: each round starts one series later, so no series
    is always first after another's slice or always last."""
    n = len(series)
    return [series[(r + i) % n] for r in range(rounds) for i in range(n)]


async def _interleaved(cfg: BalloonConfig, guests: dict[str, tuple[VM, Squeeze | None]]
                       ) -> dict[str, dict[str, Any]]:
    """Each series' window, taken as ``cfg.rounds`` slices in rotation with one guest
    running at a time: a slow patch of the shared host falls on every series alike."""
    slices: dict[str, list[list[tuple[float, int]]]] = {s: [] for s in guests}
    seconds = cfg.window_s / cfg.rounds
    for series in rotation(list(guests), cfg.rounds):
        vm, squeeze = guests[series]

        async def one(vm: VM = vm, squeeze: Squeeze | None = squeeze
                      ) -> list[tuple[float, int]]:
            async with _holding(squeeze):
                await asyncio.sleep(SLICE_SETTLE_S)
                return await _slice(vm, cfg, seconds)
        slices[series].append(await _resumed(vm, one))
    out = {}
    for series, (vm, squeeze) in guests.items():
        use = vm.host_usage()
        rate = pooled_throughput(slices[series])
        got: dict[str, Any] = {
            "throughput": None if rate is None else round(rate, 2),
            "slice_throughputs": [None if (r := throughput(p)) is None else round(r, 2)
                                  for p in slices[series]],
            "points": [p for sl in slices[series] for p in sl],
            "slices": [len(sl) for sl in slices[series]],
            "rss_mib": round(use.rss_bytes / MiB, 1), "swap_mib": round(use.swap_bytes / MiB, 1),
            "balloon_actual_mib": round(await vm.balloon_actual() / MiB, 1)}
        if squeeze is not None:
            seen = squeeze.rss_seen or [0]
            got.update({"window_paged_out_mib": round(squeeze.invalidated * PAGE_SIZE / MiB, 1),
                        "window_freed_mib": round(squeeze.freed_bytes / MiB, 1),
                        "window_collateral_mib": round(squeeze.collateral_bytes / MiB, 1),
                        "window_rss_mean_mib": round(sum(seen) / len(seen) / MiB, 1)})
        out[series] = got
    return out


async def _measure_all(cfg: BalloonConfig, disk: Path, progress: Progress) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    big = [_plan(cfg, f"{cfg.prefix}{s}", cfg.mem_mib, disk) for s in ("b", "s")]
    what = (f"reading a {cfg.file_mib} MiB disk ({cfg.access} 1 MiB blocks)"
            if cfg.workload == "pagecache" else
            f"toucher {cfg.ws_mib} MiB back to back, a {cfg.mem_mib} MiB disk read once")
    progress(f"booting {big[0].name} and {big[1].name} ({cfg.mem_mib} MiB; {what})")
    async with Fleet(big, progress) as fleet:
        for p in big:
            await _ready(p)
        async with VM(big[0].name, fleet.vms[0].socket) as bal, \
                VM(big[1].name, fleet.vms[1].socket) as swp:
            for vm in (bal, swp):
                await vm.pause()
            for x in cfg.sizes_mib:
                runs += await _measure_size(cfg, x, disk, bal, swp, progress)
    return runs


async def _measure_size(cfg: BalloonConfig, x: int, disk: Path, bal: VM, swp: VM,
                        progress: Progress) -> list[dict[str, Any]]:
    """The three series at X: a guest booted with X, the two large guests brought down
    to X one at a time, then their windows in rotation."""
    plan = _plan(cfg, f"{cfg.prefix}c{x}", x, disk)
    async with Fleet([plan], progress) as fleet:
        await _ready(plan)
        async with VM(plan.name, fleet.vms[0].socket) as conf:
            await asyncio.sleep(cfg.settle_s)
            await conf.pause()
            squeeze = Squeeze(swp, x * MiB, seed=x)
            reach = {"configured": {"reached": True, "reduce_s": 0.0},
                     "ballooned": await _resumed(bal, lambda: _ballooned_to(bal, cfg, x)),
                     "swapped": await _resumed(swp, lambda: _swapped_to(squeeze, cfg))}
            measured = await _interleaved(cfg, {"configured": (conf, None),
                                                "ballooned": (bal, None),
                                                "swapped": (swp, squeeze)})
    runs = []
    for series in SERIES:
        got = {**reach[series], **measured[series]}
        runs.append({"size_mib": x, "series": series, **got})
        slices = ", ".join("-" if r is None else f"{r:.0f}" for r in got["slice_throughputs"])
        progress(f"  X={x} MiB  {series:<10}  {got['throughput'] or 0:8.1f} "
                 f"{WORKLOADS[cfg.workload].unit} (slices {slices})"
                 f"  (at X in {got['reduce_s']:.1f} s; host RSS {got['rss_mib']:.0f} MiB,"
                 f" swapped {got['swap_mib']:.0f} MiB)")
    return runs


async def run(cfg: BalloonConfig, progress: Progress = lambda s: None) -> BalloonResult:
    refuse_if_daemon("running the balloon benchmark (it balloons and swaps its guests itself)")
    work = Path(tempfile.mkdtemp(prefix="hv-bench-balloon-", dir="/var/tmp"))
    try:
        disk = work / "disk.img"
        _make_disk(disk, cfg.disk_mib)
        with host_swap(cfg.mem_bytes, work, progress) as created_mib:
            check_can_sample()  # page-out needs host swap and process_madvise
            progress(f"sizes {', '.join(map(str, cfg.sizes_mib))} MiB; {cfg.window_s:g} s per "
                     f"measurement in {cfg.rounds} slices, the series in rotation; configured, "
                     f"ballooned from {cfg.mem_mib} MiB, swapped from {cfg.mem_mib} MiB")
            runs = await _measure_all(cfg, disk, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = BalloonResult(report.jsonable(cfg), runs, swap_created_mib=created_mib)
    result.rows = shape_rows(runs, cfg.sizes_mib)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    result.data = cfg.out_dir / "balloon.json"
    result.plot = cfg.out_dir / "balloon.png"
    report.write_json(result.data, {
        "config": result.config, "unit": WORKLOADS[cfg.workload].unit,
        "tolerance": BALLOON_TOLERANCE,
        "shapes_hold": result.shapes_hold, "swap_created_mib": created_mib,
        "rows": result.rows, "runs": runs})
    save_plot(result)
    return result


# -- output --------------------------------------------------------------------------
def format_result(result: BalloonResult) -> str:
    def opt(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [[r["size_mib"], *(opt(r[f"{s}_throughput"]) for s in SERIES),
             opt(r["ballooned_ratio"] and 100 * r["ballooned_ratio"], "{:.1f}%"),
             opt(r["swapped_ratio"] and 100 * r["swapped_ratio"], "{:.1f}%"),
             "yes" if r["shape_holds"] else "MISSED"] for r in result.rows]
    unit = WORKLOADS[result.config["workload"]].unit
    text = table(rows, ["X-MiB", f"CONFIGURED {unit}", f"BALLOONED {unit}", f"SWAPPED {unit}",
                        "BALLOON/CONF", "SWAP/CONF", "SHAPE"])
    notes = [f"X={r['size_mib']} MiB: {'; '.join(r['misses'])}" for r in result.rows if r["misses"]]
    return "\n".join([text, *notes])


def save_plot(result: BalloonResult) -> None:
    plt = report.pyplot()
    rows = result.rows
    cfg = result.config
    fig, (ax, tx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    xs = np.arange(len(rows))
    colors = {"configured": "black", "ballooned": "0.6", "swapped": "tab:red"}
    for i, s in enumerate(SERIES):
        vals = [r[f"{s}_throughput"] or 0 for r in rows]
        ax.bar(xs + (i - 1) * 0.27, vals, 0.27, color=colors[s], label=s if s != "configured"
               else "configured at X", **({"hatch": "//"} if s == "swapped" else {}))
    for i, r in enumerate(rows):
        if r["ballooned_ratio"] is not None:
            ax.annotate(f"{100 * r['ballooned_ratio']:.0f}%", (xs[i], r["ballooned_throughput"]),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [str(r["size_mib"]) for r in rows])
    unit = WORKLOADS[cfg["workload"]].unit
    what = (f"reading a {cfg['file_mib']} MiB disk, "
            f"{cfg.get('access', 'cyclic')} blocks" if cfg["workload"] == "pagecache"
            else f"toucher, {cfg['ws_mib']} MiB working set")
    ax.set(xlabel=f"guest memory X (MiB); ballooned and swapped guests booted with "
           f"{cfg['mem_bytes'] // MiB} MiB", ylabel=f"throughput ({unit})",
           title=f"Ballooned vs configured (cf. ESX Fig. 2): {what}")
    ax.legend(fontsize=8, loc="lower right")
    smallest = min(cfg["sizes_mib"])
    for run_ in result.runs:
        if run_["size_mib"] != smallest:
            continue
        t, rate, at, pts = [], [], 0.0, run_["points"]
        for n in run_.get("slices", [len(pts)]):  # seconds within a slice, slices end to end
            sl, pts = pts[:n], pts[n:]
            for a, b in zip(sl, sl[1:]):
                at += b[0] - a[0]
                t.append(at)
                rate.append((b[1] - a[1]) / max(b[0] - a[0], 1e-9))
        if t:
            tx.plot(t, rate, color=colors[run_["series"]], label=run_["series"])
    tx.set(xlabel="guest seconds measured (its slices end to end)", ylabel=unit,
           title=f"each second at X = {smallest} MiB", ylim=(0, None))
    tx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
