"""``hv bench workloads`` (the paper's Figure 5): page sharing in guests running real services.

The paper's table gives, for three production deployments of ESX Server, the guests'
total memory, how much of it was shared and how much sharing reclaimed.  Here one
Debian guest per service (``--services``, default nginx, postgresql, redis and python)
boots the services variant of hv's Debian image (``guest_balloon/build_services.sh``):
the guest starts the service named by ``hv.service=`` on its kernel command line and a
load on it (nginx: HTTP GETs of static files; postgresql: pgbench; redis:
redis-benchmark; python: an in-process cache of rendered JSON documents), reporting
``event=service_ready`` and then ``event=service_load ... ops=N`` on its console.

All guests run at once, as the deployments did, with KSM run the way ``hv run`` runs it:
hv's governor (:mod:`hv.sharing.governor`, ``use_zero_pages=1``) stepped every
``--share-interval`` (``hv run``'s default) from hv's scan of every guest
(:class:`~hv.sharing.scan.Scanner`).  After every service is up, the load runs
``--load`` seconds more; then the guests are paused and ksmd stopped, and one more
scan gives the table (:mod:`hv.sharing.index`), read with KSM's counters while nothing
moves:

* **total**: the guest's configured memory (and *present*: pages it has touched);
* **shared**: guest pages backed by a shared frame now: pages mapping a KSM frame plus
  KSM's zero-page mappings (the paper's "shared");
* **reclaimed**: what that saves, net of KSM's bookkeeping, each VM credited its fair
  part of every frame (``(k - 1) / k``) — the index's *realized*, which adds up to
  KSM's ``general_profit`` (checked: :data:`RECONCILE_FRACTION`);
* **zero**: of the shared pages, those KSM mapped to the kernel's zero page;
* **intra/inter**: hv's scan's duplicates within one guest and across guests.

KSM is unmerged first (so no earlier run's merges count) and put back as it was at the
end, and every guest is stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv import paths
from hv.bench import report
from hv.bench.fleet import Fleet, GuestPlan, Progress, console_events, refuse_if_daemon
from hv.bench.sharing import HvPolicy, unmerge
from hv.errors import HostError, HvError, UsageError
from hv.host.ksm import Ksm
from hv.policy.config import DEFAULT_SHARE_INTERVAL_S
from hv.qemu.launch import check_memory
from hv.qemu.vm import VM
from hv.sharing.index import SharingIndex, VmSharing, read_ksm_stat
from hv.sharing.scan import Scanner, Target
from hv.units import MiB, PAGE_SIZE, parse_size, table

__all__ = ["SERVICES", "PaperRow", "WorkloadsConfig", "Row", "WorkloadsResult", "add_arguments",
           "config_from_args", "run", "format_result", "row_of", "total_row", "missing", "vm_profit_gap",
           "PAPER"]

SERVICES = ("nginx", "postgresql", "redis", "python")
RECONCILE_FRACTION = 0.02  # the bar: hv's realized within 2% of general_profit
FREEZE_SETTLE_S = 0.5  # after run=0, longer than ksmd's batch at any governor rate
# With the guests paused, ksmd walks every page once before the reading: KSM keeps its
# record of a merged page that a guest then wrote over (counted in pages_sharing and
# ksm_merging_pages) until ksmd passes that page again.  Measured, read without that
# pass: Redis under load left 1,017 such records, 1.8 % of general_profit.
FREEZE_PASS_PAGES_TO_SCAN = 20_000   # per 10 ms: a 2 GiB fleet in about 3 s of ksmd
FREEZE_PASS_TIMEOUT_S = 120.0
IMAGE_FILES = ("debian.ext4", "debian-initrd.cpio.gz")

@dataclass(frozen=True)
class PaperRow:
    name: str
    total_mb: int
    shared_mb: int
    reclaimed_mb: int


# The paper's Figure 5 (Waldspurger, OSDI 2002): production deployments of ESX Server.
# Written from memory of the paper: the stored copies of it this project can search
# (its HTML and full-text pages) cut off before section 4.3, so these rows are not
# checked against the paper's text; docs/bench-workloads.md says so.
PAPER = (
    PaperRow("A: 10 Windows NT VMs (databases, web, development)", 2048, 880, 673),
    PaperRow("B: 9 Linux VMs (web: Apache; mail)", 1846, 539, 345),
    PaperRow("C: 5 Linux VMs (web proxy: Squid; mail; remote access)", 1658, 165, 120),
)


def default_image_dir() -> Path:
    return paths.cache_dir() / "debian-services"


def build_hint(image_dir: Path) -> str:
    return (f"build it with: bash guest_balloon/build_services.sh --kernel-root "
            f"{paths.kernel_root()} --out-dir {image_dir}  (or scripts/setup.sh --with-services)")


@dataclass(frozen=True)
class WorkloadsConfig:
    services: tuple[str, ...] = SERVICES
    mem_bytes: int = 512 * MiB
    load_s: float = 240.0  # load after every service is up
    setup_timeout_s: float = 420.0  # boot to service_ready, all guests at once under TCG
    share_interval_s: float = DEFAULT_SHARE_INTERVAL_S
    report_s: int = 10  # the guests' service_load period
    pg_scale: int = 5  # pgbench's scale factor (about 15 MiB of tables per unit)
    prefix: str = "wl"
    out_dir: Path = Path("bench-workloads")
    image_dir: Path = field(default_factory=default_image_dir)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "WorkloadsConfig":
        services = tuple(s.strip() for s in a.services.split(","))
        bad = [s for s in services if s not in SERVICES]
        if bad or not services:
            raise UsageError(f"unknown service {bad[0] if bad else a.services!r}: choose from "
                             f"{', '.join(SERVICES)}")
        if len(set(services)) != len(services):
            raise UsageError(f"--services names a service twice: {a.services}")
        for name in ("load", "setup_timeout", "share_interval"):
            value = getattr(a, name)
            if not math.isfinite(value) or value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number of "
                                 f"seconds > 0, not {value:g}")
        if a.report_s < 1:
            raise UsageError(f"--report-s must be a whole number of seconds >= 1, not {a.report_s}")
        if a.pg_scale < 1:
            raise UsageError(f"--pg-scale must be at least 1, not {a.pg_scale}")
        mem = check_memory(parse_size(a.mem))
        image_dir = Path(a.image_dir) if a.image_dir else default_image_dir()
        for f in IMAGE_FILES:
            if not (image_dir / f).exists():
                raise UsageError(f"no services image {image_dir / f}: {build_hint(image_dir)}")
        return cls(services, mem, a.load, a.setup_timeout, a.share_interval, a.report_s,
                   a.pg_scale, a.prefix, Path(a.out), image_dir)


def config_from_args(a: argparse.Namespace) -> WorkloadsConfig:
    return WorkloadsConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--services", default=",".join(SERVICES),
                   help=f"one guest per service, comma separated (default {','.join(SERVICES)})")
    p.add_argument("-m", "--mem", default="512M", help="memory per guest (default 512M)")
    p.add_argument("--load", type=float, default=240.0, metavar="SECONDS",
                   help="how long the load runs once every service is up (default 240)")
    p.add_argument("--setup-timeout", type=float, default=420.0, metavar="SECONDS",
                   help="give up on a service not up this long after boot (default 420)")
    p.add_argument("--share-interval", type=float, default=DEFAULT_SHARE_INTERVAL_S,
                   metavar="SECONDS", help="how often hv scans and its governor steps "
                   f"(default: hv run's share_interval_s, {DEFAULT_SHARE_INTERVAL_S:g})")
    p.add_argument("--report-s", type=int, default=10, metavar="SECONDS",
                   help="how often the guests report their load (default 10)")
    p.add_argument("--pg-scale", type=int, default=5, help="pgbench scale factor (default 5)")
    p.add_argument("--prefix", default="wl", help="name prefix of the guests it boots")
    p.add_argument("--out", default="bench-workloads", help="directory for the PNG and JSON")
    p.add_argument("--image-dir", default="", help="where build_services.sh put the image "
                   "(default: HV_CACHE_DIR/debian-services)")


# -- the table -------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table (pages, except the fractional reclaimed credit)."""

    workload: str
    vm: str
    total_pages: int  # configured
    present_pages: int
    shared_pages: int  # mapping a KSM frame, or KSM's zero page
    zero_pages: int  # of those, KSM's zero-page mappings
    reclaimed_pages: float  # realized: fair part of the savings, less KSM's bookkeeping
    ksm_profit_pages: float | None  # hv's count of the kernel's ksm_process_profit
    sharable_pages: int  # hv's scan: zero pages and stable duplicates (the potential's pages)
    intra_vm_dup_pages: int
    inter_vm_dup_pages: int
    kernel_profit_pages: float | None = None  # ksm_process_profit as the kernel reports it
    ops: int = 0  # the load's operations over the measured window
    ops_per_s: float | None = None
    note: str = ""

    @property
    def zero_share(self) -> float | None:
        return self.zero_pages / self.shared_pages if self.shared_pages else None


def row_of(workload: str, v: VmSharing, total_pages: int) -> Row:
    """The table's line for one guest, from the index's row for it."""
    zero = v.ksm_zero_pages or 0
    return Row(workload=workload, vm=v.vm, total_pages=total_pages, present_pages=v.present,
               shared_pages=v.ksm_pages + zero, zero_pages=zero,
               reclaimed_pages=v.realized_savings_pages, ksm_profit_pages=v.ksm_profit_pages,
               sharable_pages=v.zero + v.stable_dups,
               intra_vm_dup_pages=v.stable_dups - v.inter_vm_dups,
               inter_vm_dup_pages=v.inter_vm_dups)


def total_row(rows: Sequence[Row], index: SharingIndex) -> Row:
    """All guests together (the paper's rows are deployments of several VMs)."""
    ops_rates = [r.ops_per_s for r in rows if r.ops_per_s is not None]
    return Row(workload="all", vm=f"{len(rows)} VMs",
               total_pages=sum(r.total_pages for r in rows),
               present_pages=sum(r.present_pages for r in rows),
               shared_pages=sum(r.shared_pages for r in rows),
               zero_pages=sum(r.zero_pages for r in rows),
               reclaimed_pages=float(index.realized_savings_pages),
               ksm_profit_pages=None,
               sharable_pages=sum(r.sharable_pages for r in rows),
               intra_vm_dup_pages=sum(r.intra_vm_dup_pages for r in rows),
               inter_vm_dup_pages=sum(r.inter_vm_dup_pages for r in rows),
               ops=sum(r.ops for r in rows), ops_per_s=sum(ops_rates) if ops_rates else None)


def load_ops(events: Sequence[Mapping[str, str]], since_s: float | None = None
             ) -> tuple[int, float | None]:
    """Operations a guest's load did, from its ``service_load`` lines (cumulative ``ops``
    at ``t_s``): over the lines at or after ``since_s`` (load time), and their rate."""
    points = []
    for e in events:
        try:
            points.append((float(e["t_s"]), int(e["ops"])))
        except (KeyError, ValueError):
            continue
    if since_s is not None:
        before = [p for p in points if p[0] < since_s]
        points = before[-1:] + [p for p in points if p[0] >= since_s]
    if not points:
        return 0, None
    if len(points) == 1:
        return points[0][1], None
    (t0, n0), (t1, n1) = points[0], points[-1]
    return n1 - n0, ((n1 - n0) / (t1 - t0) if t1 > t0 else None)


def reconcile_gap(index: SharingIndex, general_profit_pages: float) -> float | None:
    """|hv's realized - general_profit| / general_profit (None without a profit)."""
    if general_profit_pages <= 0:
        return None
    return abs(index.realized_savings_pages - general_profit_pages) / general_profit_pages


def vm_profit_gap(rows: Sequence[Row]) -> float | None:
    """hv's per-VM count of ``ksm_process_profit`` against the kernel's, summed over the
    guests: sum |hv - kernel| / sum kernel (None without the kernel's figures)."""
    pairs = [(r.ksm_profit_pages, r.kernel_profit_pages) for r in rows
             if r.ksm_profit_pages is not None and r.kernel_profit_pages is not None]
    whole = sum(k for _, k in pairs)
    if not pairs or whole <= 0:
        return None
    return sum(abs(h - k) for h, k in pairs) / whole


def outside_guest_ram_pages(index: SharingIndex) -> int:
    """Pages of the guests' QEMU processes that KSM merged outside guest RAM (ROMs,
    video memory), as hv's scan counts them (their frames only).  Measured on two
    Debian service guests: about 500-600 pages each; before hv counted them, they were
    the 2.8% by which its count fell short of the kernel's."""
    return sum(v.ksm_outside_pages for v in index.vms)


def unseen_ksm_pages(index: SharingIndex) -> int:
    """KSM pages of the guests' QEMUs that hv's scan did not see: the kernel's
    ``ksm_merging_pages`` less hv's count in and outside guest RAM (pages merged or
    unmerged between the scan and the kernel's count)."""
    return sum(abs(v.ksm_merging_pages - v.ksm_pages - v.ksm_outside_pages)
               for v in index.vms if v.ksm_merging_pages is not None)


def other_ksm_users(mine: set[int]) -> list[int]:
    """Processes other than ``mine`` with pages KSM merged (their savings are in
    ``general_profit`` too, but in no guest of this run)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) not in mine:
            stat = read_ksm_stat(int(d.name))
            if stat.get("ksm_merging_pages", 0) > 0 or stat.get("ksm_zero_pages", 0) > 0:
                out.append(int(d.name))
    return sorted(out)


def missing(rows: Sequence[Row], gap: float | None, disturbed: Sequence[str],
            vm_gap: float | None = None, others: Sequence[int] = ()) -> list[str]:
    """What the run failed to measure (empty: complete).  The total is held to KSM's
    ``general_profit`` only when no other process on the host has KSM pages."""
    out = [f"{r.workload}: {r.note or 'no load ran'}" for r in rows if r.note or r.ops <= 0]
    if gap is not None and gap > RECONCILE_FRACTION and not others:
        out.append(f"hv's reclaimed differs from KSM's general_profit by {100 * gap:.1f}% "
                   f"(more than {100 * RECONCILE_FRACTION:.0f}%)")
    if vm_gap is not None and vm_gap > RECONCILE_FRACTION:
        out.append(f"hv's per-VM KSM profit differs from the kernel's ksm_process_profit by "
                   f"{100 * vm_gap:.1f}% (more than {100 * RECONCILE_FRACTION:.0f}%)")
    if disturbed:
        out.append(f"another process changed KSM during the run ({'; '.join(disturbed[:3])})")
    return out


@dataclass
class WorkloadsResult:
    config: dict[str, Any]
    rows: list[Row]
    total: Row
    general_profit_pages: float
    reconcile_gap: float | None
    vm_profit_gap: float | None
    other_ksm_pids: list[int]
    samples: list[dict[str, Any]]
    missed: list[str]
    plot: Path
    data: Path
    elapsed_s: float = 0.0
    ksmd_cpu_s: float = 0.0
    scan_cpu_s: float = 0.0
    outside_pages: int = 0  # merged by KSM in the guests' QEMUs outside guest RAM
    unseen_pages: int = 0   # KSM pages the kernel counts and hv's scan did not see

    @property
    def complete(self) -> bool:
        return not self.missed


# -- running it --------------------------------------------------------------------------
def plans(cfg: WorkloadsConfig) -> list[GuestPlan]:
    """One guest per service, each booting the services image (snapshot=on: writes are
    the guest's own)."""
    return [GuestPlan(guest_name(cfg, s), cfg.mem_bytes, "idle",
                      (("service", s), ("service_report_s", str(cfg.report_s)),
                       ("pg_scale", str(cfg.pg_scale))),
                      initrd=cfg.image_dir / "debian-initrd.cpio.gz",
                      disk=cfg.image_dir / "debian.ext4")
            for s in cfg.services]


def guest_name(cfg: WorkloadsConfig, service: str) -> str:
    return f"{cfg.prefix}-{service}"


def _service_state(name: str) -> tuple[bool, str]:
    """(up, error) from a guest's console: service_ready seen; hv-service's error line."""
    errors = [e for e in console_events(name, "error") if e.get("what") == "service"]
    if errors:
        return False, f"service failed at step {errors[-1].get('step', '?')}"
    return bool(console_events(name, "service_ready")), ""


def _sample(t_s: float, index: SharingIndex, ksm: Ksm, cfg: WorkloadsConfig
            ) -> dict[str, Any]:
    stats = ksm.stats()
    by_vm = {v.vm: v for v in index.vms}
    return {"t_s": round(t_s, 1), "general_profit": stats["general_profit"] / PAGE_SIZE,
            "realized": index.realized_savings_pages, "potential": index.potential_savings_pages,
            "pages_to_scan": int(ksm.get("pages_to_scan")),
            "vms": {s: {"present": by_vm[n].present, "realized": by_vm[n].realized_savings_pages,
                        "ksm_zero": by_vm[n].ksm_zero_pages or 0, "ksm_pages": by_vm[n].ksm_pages}
                    for s in cfg.services if (n := guest_name(cfg, s)) in by_vm}}


async def _frozen_reading(fleet: Fleet, ksm: Ksm, scanner: Scanner
                          ) -> tuple[SharingIndex, float, dict[str, int | None]]:
    """The table's figures with nothing moving: hv's scan, KSM's ``general_profit`` and
    each guest's ``ksm_process_profit``, read with the guests paused, after one full
    ksmd pass (so the kernel holds no records of pages written over since it last
    passed them), with ksmd stopped (``run=0`` keeps what it merged).  Read while the
    services ran and ksmd merged at the governor's rate, hv's count and the kernel's
    were 3% apart (2.4% per guest): they were taken a scan's length apart.  The guests
    are resumed whatever happens; KSM is restored by the caller."""
    vms = [VM(i.name, i.socket) for i in fleet.vms]
    paused: list[VM] = []
    try:
        for vm in vms:
            await vm.attach()
            await vm.pause()
            paused.append(vm)
        # Two more full scans: the one under way, then a whole one.
        until = int(ksm.stats()["full_scans"]) + 2
        ksm.set(pages_to_scan=FREEZE_PASS_PAGES_TO_SCAN, sleep_millisecs=10, run=1)
        deadline = time.monotonic() + FREEZE_PASS_TIMEOUT_S
        while int(ksm.stats()["full_scans"]) < until:
            if time.monotonic() > deadline:
                raise HostError(f"ksmd did not finish a full pass in {FREEZE_PASS_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)
        ksm.set(run=0)
        await asyncio.sleep(FREEZE_SETTLE_S)  # ksmd finishes the batch it was in
        index = await asyncio.to_thread(scanner.scan_all)
        profit = ksm.stats()["general_profit"] / PAGE_SIZE
        kernel = {i.name: read_ksm_stat(i.pid).get("ksm_process_profit") for i in fleet.vms}
    finally:
        for vm in paused:
            with contextlib.suppress(HvError):
                await vm.resume()
        for vm in vms:
            with contextlib.suppress(HvError):
                await vm.detach()
    return index, profit, kernel


async def _measure(cfg: WorkloadsConfig, ksm: Ksm, fleet: Fleet, progress: Progress
                   ) -> dict[str, Any]:
    """Share the guests' memory as hv run does until the load has run ``cfg.load_s``."""
    scanner = Scanner([Target.from_info(i) for i in fleet.vms], replace_foreign=True)
    policy = HvPolicy(ksm, cfg.share_interval_s)
    t0 = time.monotonic()
    cpu0 = ksm.stats().ksmd_cpu_s
    samples: list[dict[str, Any]] = []
    up: dict[str, float] = {}  # service -> bench time it came up
    failed: dict[str, str] = {}
    disturbed: list[str] = []
    load_from: float | None = None
    last_said = -math.inf
    try:
        policy.start()
        policy.remember()
        while True:
            index = await asyncio.to_thread(scanner.scan_all)
            t = time.monotonic() - t0
            other = policy.disturbed()
            if other is not None:
                disturbed.append(f"t={t:.0f}s {other}")
                progress(f"  another process changed KSM: {other} (run disturbed)")
            policy.tick(index, t)
            policy.remember()
            samples.append(_sample(t, index, ksm, cfg))
            for s in cfg.services:
                if s in up or s in failed:
                    continue
                ok, error = _service_state(guest_name(cfg, s))
                if error:
                    failed[s] = error
                    progress(f"  {s}: {error} (see {guest_name(cfg, s)}'s console.log)")
                elif ok:
                    up[s] = t
                    progress(f"  {s}: up at {t:.0f} s, load running")
                elif t > cfg.setup_timeout_s:
                    failed[s] = f"not up in {cfg.setup_timeout_s:.0f} s"
                    progress(f"  {s}: {failed[s]}")
            if load_from is None and len(up) + len(failed) == len(cfg.services):
                load_from = t
                progress(f"every service up or failed at {t:.0f} s: load for {cfg.load_s:.0f} s")
            if t - last_said >= 30:
                last_said = t
                progress(f"  t={t:4.0f} s  reclaimed {report.mib(index.realized_savings_pages):6.1f}"
                         f" MiB of {report.mib(index.present):.0f} MiB present; potential "
                         f"{report.mib(index.potential_savings_pages):.1f} MiB; "
                         f"ksm pages_to_scan {samples[-1]['pages_to_scan']}")
            if load_from is not None and t - load_from >= cfg.load_s:
                break
            await asyncio.sleep(max(0.0, cfg.share_interval_s - (time.monotonic() - t0 - t)))
        index, profit, kernel = await _frozen_reading(fleet, ksm, scanner)
        others = other_ksm_users({i.pid for i in fleet.vms})
        if others:
            progress(f"  note: other processes have KSM pages (pids {others[:5]}): "
                     "general_profit counts them too")
        return {"index": index, "profit": profit, "kernel": kernel, "others": others, "samples": samples, "up": up,
                "failed": failed, "disturbed": disturbed, "load_from": load_from,
                "elapsed": time.monotonic() - t0, "ksmd_cpu": ksm.stats().ksmd_cpu_s - cpu0,
                "scan_cpu": scanner.scan_cpu_s}
    finally:
        scanner.close()


async def run(cfg: WorkloadsConfig, progress: Progress = lambda s: None) -> WorkloadsResult:
    refuse_if_daemon("measuring page sharing (KSM has one owner at a time)")
    ksm = Ksm()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"workloads: {', '.join(cfg.services)}; one guest of {cfg.mem_bytes // MiB} MiB "
             f"each from {cfg.image_dir}; load {cfg.load_s:.0f} s once all are up")
    try:
        await asyncio.to_thread(unmerge, ksm)  # nothing merged before counts
        async with Fleet(plans(cfg), progress) as fleet:
            m = await _measure(cfg, ksm, fleet, progress)
            events = {s: console_events(guest_name(cfg, s), "service_load") for s in cfg.services}
    finally:
        ksm.restore()
    index: SharingIndex = m["index"]
    by_vm = {v.vm: v for v in index.vms}
    rows = []
    for s in cfg.services:
        row = row_of(s, by_vm[guest_name(cfg, s)], cfg.mem_bytes // PAGE_SIZE)
        # The load's window: from when the last service came up (guest time is not
        # bench time, so count from the guest's own report times: the last load_s).
        reports = events[s]
        last_t = max((float(e.get("t_s", 0)) for e in reports), default=0.0)
        row.ops, row.ops_per_s = load_ops(reports, last_t - cfg.load_s)
        row.note = m["failed"].get(s, "")
        kernel = m["kernel"].get(guest_name(cfg, s))
        row.kernel_profit_pages = kernel / PAGE_SIZE if kernel is not None else None
        rows.append(row)
    total = total_row(rows, index)
    gap, vm_gap = reconcile_gap(index, m["profit"]), vm_profit_gap(rows)
    data, plot = cfg.out_dir / "workloads.json", cfg.out_dir / "workloads.png"
    result = WorkloadsResult(report.jsonable(cfg), rows, total, m["profit"], gap, vm_gap,
                             m["others"], m["samples"],
                             missing(rows, gap, m["disturbed"], vm_gap, m["others"]), plot, data,
                             m["elapsed"], m["ksmd_cpu"], m["scan_cpu"],
                             outside_guest_ram_pages(index), unseen_ksm_pages(index))
    report.write_json(data, {
        "config": result.config, "paper": report.jsonable(PAPER),
        "rows": [{**report.jsonable(r), "zero_share": r.zero_share} for r in rows],
        "total": {**report.jsonable(total), "zero_share": total.zero_share},
        "general_profit_pages": m["profit"], "reconcile_gap": gap, "vm_profit_gap": vm_gap,
        "outside_guest_ram_pages": outside_guest_ram_pages(index),
        "unseen_ksm_pages": unseen_ksm_pages(index),
        "other_ksm_pids": m["others"],
        "index": index.as_dict(), "service_up_s": m["up"], "load_from_s": m["load_from"],
        "elapsed_s": m["elapsed"], "ksmd_cpu_s": m["ksmd_cpu"], "scan_cpu_s": m["scan_cpu"],
        "missed": result.missed, "samples": m["samples"]})
    save_plot(result)
    return result


# -- output ----------------------------------------------------------------------------
def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_result(result: WorkloadsResult) -> str:
    mib = report.mib
    lines = []
    for r in [*result.rows, result.total]:
        lines.append([
            r.workload, f"{mib(r.total_pages):.0f}", f"{mib(r.present_pages):.0f}",
            f"{mib(r.shared_pages):.1f}", _pct(r.shared_pages, r.total_pages),
            f"{mib(r.reclaimed_pages):.1f}", _pct(r.reclaimed_pages, r.total_pages),
            f"{100 * r.zero_share:.0f}%" if r.zero_share is not None else "-",
            f"{mib(r.intra_vm_dup_pages):.1f}", f"{mib(r.inter_vm_dup_pages):.1f}",
            f"{r.ops_per_s:.1f}" if r.ops_per_s is not None else "-"])
    text = table(lines, ["WORKLOAD", "TOTAL-MiB", "PRESENT-MiB", "SHARED-MiB", "SHARED-%",
                         "RECLAIMED-MiB", "RECLAIMED-%", "ZERO-%SHARED", "INTRA-DUP-MiB",
                         "INTER-DUP-MiB", "LOAD-OPS/S"])
    paper = table([[p.name, p.total_mb, p.shared_mb, _pct(p.shared_mb, p.total_mb),
                    p.reclaimed_mb, _pct(p.reclaimed_mb, p.total_mb)] for p in PAPER],
                  ["PAPER (ESX, Fig. 5)", "TOTAL-MB", "SHARED-MB", "SHARED-%", "RECLAIMED-MB",
                   "RECLAIMED-%"])
    gap = result.reconcile_gap
    tail = [f"KSM general_profit {mib(result.general_profit_pages):.1f} MiB; hv's reclaimed "
            f"{mib(result.total.reclaimed_pages):.1f} MiB"
            + (f" ({100 * gap:.2f}% apart)" if gap is not None else "")
            + (f"; other processes with KSM pages: {result.other_ksm_pids[:5]}"
               if result.other_ksm_pids else ""),
            "per VM, hv's count of ksm_process_profit vs the kernel's: "
            + (f"{100 * result.vm_profit_gap:.2f}% apart" if result.vm_profit_gap is not None
               else "-"),
            f"of it, KSM merges in the guests' QEMU memory outside guest RAM (ROMs, video "
            f"memory): {mib(result.outside_pages):.1f} MiB; KSM pages hv's scan did not see: "
            f"{result.unseen_pages}",
            f"ksmd CPU {result.ksmd_cpu_s:.1f} s, hv scan CPU {result.scan_cpu_s:.1f} s "
            f"over {result.elapsed_s:.0f} s"]
    return "\n".join([text, "", paper, "", *tail, *[f"MISSED: {m}" for m in result.missed]])


def save_plot(result: WorkloadsResult) -> None:
    plt = report.pyplot()
    mib = report.mib
    fig, ax = plt.subplots(1, 3, figsize=(18, 5.5))
    rows = [*result.rows, result.total]
    names = [r.workload for r in rows]
    x = range(len(rows))
    # (a) the table as bars: present, shared (zero part hatched), reclaimed, per guest
    a = ax[0]
    w = 0.27
    a.bar([i - w for i in x], [mib(r.present_pages) for r in rows], w, label="present", color="#bbb")
    a.bar(list(x), [mib(r.shared_pages - r.zero_pages) for r in rows], w, label="shared (KSM frames)",
          color="#4c72b0")
    a.bar(list(x), [mib(r.zero_pages) for r in rows], w,
          bottom=[mib(r.shared_pages - r.zero_pages) for r in rows], label="shared (zero page)",
          color="#4c72b0", hatch="//", alpha=0.5)
    a.bar([i + w for i in x], [mib(r.reclaimed_pages) for r in rows], w, label="reclaimed",
          color="#55a868")
    a.set_xticks(list(x), names)
    a.set(ylabel="MiB", title="Per workload after the load (cf. ESX Fig. 5)")
    a.legend(fontsize=8)
    # (b) beside the paper: shared and reclaimed as % of total memory
    b = ax[1]
    labels = [p.name.split(":")[0] + " (ESX)" for p in PAPER] + names
    shared = ([100 * p.shared_mb / p.total_mb for p in PAPER]
              + [100 * r.shared_pages / r.total_pages for r in rows])
    recl = ([100 * p.reclaimed_mb / p.total_mb for p in PAPER]
            + [100 * r.reclaimed_pages / r.total_pages for r in rows])
    xs = range(len(labels))
    b.bar([i - 0.2 for i in xs], shared, 0.4, label="shared, % of total", color="#4c72b0")
    b.bar([i + 0.2 for i in xs], recl, 0.4, label="reclaimed, % of total", color="#55a868")
    b.set_xticks(list(xs), labels, rotation=30, ha="right")
    b.set(ylabel="% of configured guest memory", title="Beside the paper's deployments A, B, C")
    b.legend(fontsize=8)
    # (c) reclaimed over time per guest
    c = ax[2]
    ts = [s["t_s"] for s in result.samples]
    for r in result.rows:
        c.plot(ts, [mib(s["vms"].get(r.workload, {}).get("realized", math.nan))
                    for s in result.samples], label=r.workload)
    c.plot(ts, [mib(s["general_profit"]) for s in result.samples], "k--", label="KSM general_profit")
    c.set(xlabel="seconds since boot", ylabel="MiB reclaimed",
          title="Reclaimed over time (hv's governor, use_zero_pages=1)")
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
