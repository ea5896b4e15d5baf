"""``hv bench sharing`` (the paper's Figure 4): how much do N guests booted from one image share, and how fast
does each KSM policy realize it?

For each N, the policies run in random order (``--order``, seeded by ``--seed``), each
from a cold start (``--cold``): by default on N guests booted fresh for that policy
from the guest image, so none inherits another's merges or the transparent huge pages
KSM split; or (``--cold unmerge``) on one boot per N, with KSM unmerging everything
(``run=2``, zero-page mappings included on Linux 6.5+) before each policy, and the
guests run without transparent huge pages so that no policy finds them split by
another (each run records the guests' huge pages at its start).  Every
policy runs with ``use_zero_pages=1``, as ``hv run`` sets it:

* ``hv``       — hv's governor (:mod:`hv.sharing.governor`), stepped every
  ``--share-interval`` (``hv run``'s default ``share_interval_s``);
* ``stock``    — KSM's default rate: 100 pages every 20 ms;
* ``advisor``  — KSM's scan-time advisor (``advisor_mode=scan-time``, kernel defaults);
* ``ksmtuned`` — ksmtuned's rule: +300 pages (at most 1250) every period, starting at
  64, ``sleep_millisecs`` from host memory as ksmtuned computes it (at least 10), with
  memory pressure assumed throughout (on an idle host ksmtuned would leave KSM off).
  Its 60 s period is scaled down (``--ksmtuned-period``) to fit the timeout.

hv scans every guest every ``--scan-period`` seconds under every policy, to measure
(the hv policy's governor only sees every ``--share-interval``): the scan
gives the potential (stable duplicates and zero pages with a frame of their own) and
what KSM merged (:mod:`hv.sharing.index`: *merged* counts pages, *realized* is merged
less KSM's bookkeeping, the kernel's ``general_profit``).  A run *converges* when the
merged savings reach 90% of the potential (like with like); it is cut off at
``--timeout`` and reported as "did not converge in T s".  After convergence ksmd's CPU
is measured for ``--steady`` seconds more.  KSM's settings are restored at the end,
whatever happens.

Figures are given as a share of configured memory (N x ``--mem``, the paper's axis) and
of present memory (pages the guests have touched, what KSM can work on).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv import paths
from hv.bench import report
from hv.bench.args import int_list
from hv.bench.fleet import Fleet, GuestPlan, Progress, refuse_if_daemon
from hv.errors import HvError, UsageError
from hv.host import proc
from hv.host.ksm import Ksm
from hv.policy.config import DEFAULT_SHARE_INTERVAL_S
from hv.qemu import launch as launcher
from hv.sharing.governor import Governor
from hv.sharing.index import SharingIndex
from hv.sharing.scan import Scanner, Target
from hv.units import PAGE_SIZE, MiB, format_size, parse_size, table

__all__ = ["BenchConfig", "RunResult", "BenchResult", "add_arguments", "config_from_args", "run",
           "format_result"]

POLICIES = ("stock", "advisor", "ksmtuned", "hv")
ORDERS = ("random", "given")
COLD_STARTS = ("boot", "unmerge")
WATCHED = ("run", "sleep_millisecs", "pages_to_scan", "use_zero_pages", "advisor_mode")
CONVERGED_FRACTION = 0.90  # merged >= 90% of potential: the bar
UNMERGE_TIMEOUT_S = 120.0  # run=2 unmerges a few hundred MiB in seconds
KSMTUNED_BOOST, KSMTUNED_MAX, KSMTUNED_MIN = 300, 1250, 64  # ksmtuned's defaults


@dataclass(frozen=True)
class BenchConfig:
    vms: tuple[int, ...] = (1, 2, 4)
    policies: tuple[str, ...] = POLICIES
    mem_bytes: int = 256 * MiB
    workload: str = "idle"
    params: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 120.0
    steady_s: float = 15.0
    scan_period_s: float = 2.0
    ksmtuned_period_s: float = 15.0
    prefix: str = "shb"
    out_dir: Path = Path("bench-sharing")
    image: str = "initramfs"  # or "debian": guest_balloon/build_debian.sh's root FS on a virtio disk
    debian_dir: Path = field(default_factory=lambda: paths.cache_dir() / "debian")
    retries: int = 1  # runs again a run another process disturbed (changed KSM's tunables)
    order: str = "random"  # the policies' order for each N: "random" (seeded) or "given"
    seed: int = 0
    cold: str = "boot"  # each policy on fresh boots, or "unmerge" on one boot per N
    share_interval_s: float = DEFAULT_SHARE_INTERVAL_S  # how often hv's governor steps

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "BenchConfig":
        vms = int_list("--vms", a.vms)
        policies = tuple(p.strip() for p in a.policies.split(","))
        bad = [p for p in policies if p not in POLICIES]
        if bad:
            raise UsageError(f"unknown policy {bad[0]!r}: choose from {', '.join(POLICIES)}")
        params = []
        for pair in a.param:
            k, sep, v = pair.partition("=")
            if not sep:
                raise UsageError(f"--param takes KEY=VALUE, not {pair!r}")
            params.append((k.removeprefix("hv."), v))
        for name in ("timeout", "steady", "scan_period", "ksmtuned_period", "share_interval"):
            value = getattr(a, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name != "steady"):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number of seconds "
                                 f"{'>= 0' if name == 'steady' else '> 0'}, not {value:g}")
        debian_dir = Path(a.debian_dir) if a.debian_dir else paths.cache_dir() / "debian"
        if a.image == "debian":
            for f in ("debian.ext4", "debian-initrd.cpio.gz"):
                if not (debian_dir / f).exists():
                    raise UsageError(f"no {debian_dir / f}: build it with guest_balloon/build_debian.sh "
                                     f"--kernel-root {paths.kernel_root()} --out-dir {debian_dir}")
        seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
        return cls(vms, policies, parse_size(a.mem), a.workload, tuple(params), a.timeout,
                   a.steady, a.scan_period, a.ksmtuned_period, a.prefix, Path(a.out), a.image,
                   debian_dir, max(0, a.retries), a.order, seed, a.cold, a.share_interval)


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    return BenchConfig.from_args(a)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vms", default="1,2,4", help="numbers of guests, comma separated (default 1,2,4)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"subset of {','.join(POLICIES)}")
    p.add_argument("-m", "--mem", default="256M", help="memory per guest (default 256M)")
    p.add_argument("-w", "--workload", default="idle", choices=launcher.WORKLOADS)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up on one policy run after this long (default 120)")
    p.add_argument("--steady", type=float, default=15.0, metavar="SECONDS",
                   help="measure ksmd's CPU this long after convergence (default 15)")
    p.add_argument("--scan-period", type=float, default=2.0, metavar="SECONDS",
                   help="how often the bench measures, under every policy (default 2)")
    p.add_argument("--share-interval", type=float, default=DEFAULT_SHARE_INTERVAL_S,
                   metavar="SECONDS", help="how often hv's governor steps (default: hv run's "
                   f"share_interval_s, {DEFAULT_SHARE_INTERVAL_S:g})")
    p.add_argument("--order", default="random", choices=ORDERS,
                   help="the policies' order for each N (default random, seeded by --seed)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random order "
                   "(default: drawn, and printed and saved)")
    p.add_argument("--cold", default="boot", choices=COLD_STARTS,
                   help="each policy's cold start: fresh boots (default), or KSM unmerged on "
                   "one boot per N")
    p.add_argument("--ksmtuned-period", type=float, default=15.0, metavar="SECONDS",
                   help="ksmtuned's adjustment period (its own is 60 s; default 15)")
    p.add_argument("--retries", type=int, default=1,
                   help="run a policy again when another process changed KSM meanwhile (default 1)")
    p.add_argument("--prefix", default="shb", help="name prefix of the guests it boots")
    p.add_argument("--out", default="bench-sharing", help="directory for the PNG and JSON")
    p.add_argument("--image", default="initramfs", choices=("initramfs", "debian"),
                   help="hv's initramfs guest image, or the Debian root FS from "
                   "guest_balloon/build_debian.sh (booted to multi-user from a virtio disk)")
    p.add_argument("--debian-dir", default="", help="where build_debian.sh put its output "
                   "(default: HV_CACHE_DIR/debian)")


@dataclass
class RunResult:
    """One policy on one set of N guests."""

    n: int
    policy: str
    configured_pages: int  # N x the guests' memory: the paper's axis
    converged: bool
    t_converge_s: float | None
    elapsed_s: float
    potential_pages: int
    realized_pages: int  # net of KSM's bookkeeping: general_profit in pages
    merged_pages: int
    zero_mapped_pages: int  # zero-page mappings that were never KSM's: free either way
    general_profit_pages: float  # the kernel's figure at the end, for comparison
    shared_pages: int  # pages in duplicate groups plus zero pages (the paper's "shared")
    inter_vm_dup_pages: int
    present_pages: int
    ksmd_cpu_converge_s: float  # ksmd CPU from the start of the run to convergence (or timeout)
    ksmd_steady_cores: float | None  # ksmd's CPU rate after convergence
    scan_cpu_s: float  # hv's own scanning during the run
    scans: int
    per_vm: list[dict[str, Any]]
    samples: list[dict[str, float]] = field(default_factory=list)
    note: str = ""
    disturbed: bool = False  # another process changed KSM's tunables during the run
    thp_bytes_at_start: int = 0  # guest RAM in transparent huge pages when the run began


@dataclass
class BenchResult:
    config: dict[str, Any]
    runs: list[RunResult]
    kernel_has_advisor: bool
    plot: Path
    data: Path

    @property
    def all_converged(self) -> bool:
        return all(r.converged for r in self.runs)

    @property
    def complete(self) -> bool:
        """What ``hv bench`` exits 0 on: every policy converged."""
        return self.all_converged


# -- policies ------------------------------------------------------------------------
def ksmtuned_sleep_ms() -> int:
    """ksmtuned's sleep: 10 ms per 16 GiB of host memory, at least 10."""
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    return max(10, int(10 * 16 * 1024 * 1024 / total_kib))


class Policy(abc.ABC):
    """Base: start KSM one way; ``tick`` is called after every scan."""

    name = "?"

    def __init__(self, ksm: Ksm) -> None:
        self.ksm = ksm
        self.expected: dict[str, str] = {}

    @abc.abstractmethod
    def start(self) -> None:
        """Set KSM up the way this policy runs it."""

    def remember(self) -> None:
        """Record KSM's tunables as this policy left them (to notice other writers)."""
        self.expected = {k: v for k, v in self.ksm.tunables().items() if k in self.watched()}

    def watched(self) -> tuple[str, ...]:
        return WATCHED

    def disturbed(self) -> str | None:
        """A tunable someone else changed since :meth:`remember`, if any."""
        now = self.ksm.tunables()
        for k, v in self.expected.items():
            if now.get(k) != v:
                return f"{k} {v} -> {now.get(k)}"
        return None

    def tick(self, index: SharingIndex, t_s: float) -> None:
        """Policies that only set KSM once ignore the ticks."""


class HvPolicy(Policy):
    name = "hv"

    def __init__(self, ksm: Ksm, interval_s: float) -> None:
        super().__init__(ksm)
        self.gov = Governor(ksm)
        self.interval_s = interval_s
        self.next_s = 0.0

    def start(self) -> None:
        self.gov.start()

    def tick(self, index: SharingIndex, t_s: float) -> None:
        if t_s >= self.next_s:  # as hv run: one step per sharing round
            self.gov.step(index)
            self.next_s = t_s + self.interval_s


class StockPolicy(Policy):
    name = "stock"

    def start(self) -> None:
        extra = {"advisor_mode": "none"} if self.ksm.has("advisor_mode") else {}
        self.ksm.set(pages_to_scan=100, sleep_millisecs=20, use_zero_pages=1, run=1, **extra)


class AdvisorPolicy(Policy):
    name = "advisor"

    def start(self) -> None:
        if not self.ksm.has("advisor_mode"):
            raise HvError("this kernel's KSM has no advisor_mode (scan-time advisor needs 6.7+)")
        self.ksm.set(pages_to_scan=100, sleep_millisecs=20, use_zero_pages=1)
        self.ksm.set(advisor_mode="scan-time", run=1)

    def watched(self) -> tuple[str, ...]:
        return ("run", "sleep_millisecs", "use_zero_pages", "advisor_mode")  # it sets the rate


class KsmtunedPolicy(Policy):
    name = "ksmtuned"

    def __init__(self, ksm: Ksm, period_s: float) -> None:
        super().__init__(ksm)
        self.period_s = period_s
        self.npages = KSMTUNED_MIN
        self.next_s = 0.0

    def start(self) -> None:
        extra = {"advisor_mode": "none"} if self.ksm.has("advisor_mode") else {}
        self.ksm.set(pages_to_scan=self.npages, sleep_millisecs=ksmtuned_sleep_ms(),
                     use_zero_pages=1, run=1, **extra)
        self.next_s = self.period_s

    def tick(self, index: SharingIndex, t_s: float) -> None:
        while t_s >= self.next_s:  # "memory pressure": boost every period
            self.npages = min(KSMTUNED_MAX, self.npages + KSMTUNED_BOOST)
            self.ksm.set(pages_to_scan=self.npages)
            self.next_s += self.period_s


def make_policy(name: str, ksm: Ksm, cfg: BenchConfig) -> Policy:
    if name == "hv":
        return HvPolicy(ksm, cfg.share_interval_s)
    if name == "stock":
        return StockPolicy(ksm)
    if name == "advisor":
        return AdvisorPolicy(ksm)
    return KsmtunedPolicy(ksm, cfg.ksmtuned_period_s)


# -- one run -------------------------------------------------------------------------
def unmerge(ksm: Ksm, timeout_s: float = UNMERGE_TIMEOUT_S) -> None:
    """Unmerge every KSM page (run=2) and wait until KSM shares nothing."""
    ksm.set(run=2)
    deadline = time.monotonic() + timeout_s
    while True:
        s = ksm.stats()
        if s["pages_sharing"] == 0 and s["pages_shared"] == 0 and s["ksm_zero_pages"] == 0:
            break
        if time.monotonic() > deadline:
            raise HvError(f"KSM did not unmerge in {timeout_s:.0f} s "
                          f"(pages_sharing {s['pages_sharing']})")
        time.sleep(0.2)
    ksm.set(run=0)


def _shared(index: SharingIndex) -> int:
    return sum(v.stable_dups + v.zero for v in index.vms)


class Stopped(Exception):
    """The bench was cancelled (^C, SIGTERM) while a policy ran in its thread."""


def run_policy(name: str, n: int, scanner: Scanner, ksm: Ksm, cfg: BenchConfig,
               progress: Progress, stop: threading.Event | None = None) -> RunResult:
    """One policy's run (blocking; in a thread).  ``stop`` set: return at the next
    step by raising :class:`Stopped`, leaving KSM to the caller to restore."""
    stop = stop or threading.Event()
    unmerge(ksm)
    thp_at_start = sum(proc.range_usage(t.pid, r.hva, r.size, t.name).anon_huge_bytes
                       for t in scanner.targets for r in t.ram)
    progress(f"  {name} N={n}: KSM unmerged; {format_size(thp_at_start)} of guest RAM "
             "in huge pages")
    policy = make_policy(name, ksm, cfg)
    cpu0 = ksm.stats().ksmd_cpu_s
    scan_cpu0, scans = scanner.scan_cpu_s, 0
    t0 = time.monotonic()
    policy.start()
    policy.remember()
    disturbed: list[str] = []
    samples: list[dict[str, float]] = []
    t_conv: float | None = None
    cpu_conv = 0.0
    steady_from: tuple[float, float] | None = None
    index = scanner.scan_all()
    scans += 1
    while True:
        t = time.monotonic() - t0
        stats = ksm.stats()
        samples.append({"t_s": round(t, 2), "potential": index.potential_savings_pages,
                        "merged": index.merged_savings_pages,
                        "realized": index.realized_savings_pages,
                        "general_profit": stats["general_profit"] / PAGE_SIZE,
                        "pages_sharing": stats["pages_sharing"],
                        "ksm_zero_pages": stats["ksm_zero_pages"],
                        "pages_to_scan": int(ksm.get("pages_to_scan")),
                        "ksmd_cpu_s": round(stats.ksmd_cpu_s - cpu0, 3)})
        if (t_conv is None and index.potential_savings_pages > 0
                and index.merged_savings_pages >= CONVERGED_FRACTION * index.potential_savings_pages):
            t_conv, cpu_conv = t, stats.ksmd_cpu_s - cpu0
            steady_from = (time.monotonic(), stats.ksmd_cpu_s)
            progress(f"  {name} N={n}: converged at {t:.1f} s (merged "
                     f"{index.merged_savings_pages} of {index.potential_savings_pages} pages)")
        if t_conv is not None and t - t_conv >= cfg.steady_s:
            break
        if t_conv is None and t >= cfg.timeout_s:
            cpu_conv = stats.ksmd_cpu_s - cpu0
            progress(f"  {name} N={n}: did not converge in {cfg.timeout_s:.0f} s (merged "
                     f"{index.merged_savings_pages} of {index.potential_savings_pages} pages)")
            break
        other = policy.disturbed()
        if other is not None:
            disturbed.append(f"t={t:.0f}s {other}")
            progress(f"  {name} N={n}: another process changed KSM: {other} (run disturbed)")
        policy.tick(index, t)
        policy.remember()
        next_t = t + cfg.scan_period_s
        if t_conv is not None:
            next_t = min(next_t, t_conv + cfg.steady_s)
        if stop.wait(max(0.0, next_t - (time.monotonic() - t0))):
            raise Stopped(f"{name} N={n}: stopped")
        index = scanner.scan_all()
        scans += 1
    steady: float | None = None
    if steady_from is not None:
        dt = time.monotonic() - steady_from[0]
        if dt > 1.0:
            steady = (ksm.stats().ksmd_cpu_s - steady_from[1]) / dt
    profit_pages = ksm.stats()["general_profit"] / PAGE_SIZE
    ksm.restore()
    return RunResult(
        n=n, policy=name, configured_pages=n * cfg.mem_bytes // PAGE_SIZE,
        converged=t_conv is not None, t_converge_s=t_conv,
        elapsed_s=time.monotonic() - t0, potential_pages=index.potential_savings_pages,
        realized_pages=index.realized_savings_pages, merged_pages=index.merged_savings_pages,
        zero_mapped_pages=index.zero_mapped,
        general_profit_pages=profit_pages, shared_pages=_shared(index),
        inter_vm_dup_pages=sum(v.inter_vm_dups for v in index.vms), present_pages=index.present,
        ksmd_cpu_converge_s=cpu_conv, ksmd_steady_cores=steady,
        scan_cpu_s=scanner.scan_cpu_s - scan_cpu0, scans=scans,
        per_vm=[{"vm": v.vm, "present": v.present, "potential": v.potential_savings_pages,
                 "merged": v.merged_savings_pages, "realized": v.realized_savings_pages,
                 "zero_mapped": v.zero_mapped, "ksm_merging_pages": v.ksm_merging_pages,
                 "ksm_profit_pages": v.ksm_profit_pages, "outside": v.outside_savings_pages}
                for v in index.vms],
        samples=samples, disturbed=bool(disturbed), thp_bytes_at_start=thp_at_start,
        note="; ".join(([] if t_conv is not None else [f"did not converge in {cfg.timeout_s:.0f} s"])
                       + ([f"DISTURBED: KSM changed by another process ({', '.join(disturbed[:3])})"]
                          if disturbed else [])))


# -- guests --------------------------------------------------------------------------
def plans(names: list[str], cfg: BenchConfig) -> list[GuestPlan]:
    """The guests of one N.  A Debian disk is attached with snapshot=on (writes go to a
    temporary file), so every guest boots the same image.  With ``--cold unmerge`` the
    guests run without transparent huge pages: KSM splits the huge pages it merges and
    unmerging does not join them again, so only without them does every policy after
    the first start from the same state."""
    debian = cfg.image == "debian"
    return [GuestPlan(name, cfg.mem_bytes, cfg.workload, cfg.params,
                      initrd=cfg.debian_dir / "debian-initrd.cpio.gz" if debian else None,
                      disk=cfg.debian_dir / "debian.ext4" if debian else None,
                      thp=cfg.cold == "boot")
            for name in names]


def policy_orders(cfg: BenchConfig, policies: list[str]) -> dict[int, list[str]]:
    """The policies' order for each N: shuffled by a generator seeded with ``cfg.seed``
    (so a run can be repeated), or as given."""
    rng = random.Random(cfg.seed)
    out = {}
    for n in cfg.vms:
        order = list(policies)
        if cfg.order == "random":
            rng.shuffle(order)
        out[n] = order
    return out


async def _run_with_retries(name: str, n: int, scanner: Scanner, ksm: Ksm, cfg: BenchConfig,
                            progress: Progress) -> RunResult:
    """One policy's run, again (up to ``cfg.retries`` times) if another process changed KSM."""
    for attempt in range(cfg.retries + 1):
        progress(f"  {name} N={n}: running (timeout {cfg.timeout_s:.0f} s)")
        stop = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(run_policy, name, n, scanner, ksm,
                                                          cfg, progress, stop))
        try:
            r = await asyncio.shield(running)
        except asyncio.CancelledError:
            # Let the thread see it and end before the caller restores KSM and stops
            # the guests: a thread still stepping would set KSM again after the restore.
            stop.set()
            with contextlib.suppress(Exception):
                await running
            raise
        if not r.disturbed or attempt == cfg.retries:
            break
        progress(f"  {name} N={n}: disturbed by another process; again")
    return r


async def run(cfg: BenchConfig, progress: Progress = lambda s: None) -> BenchResult:
    refuse_if_daemon("benchmarking KSM policies (KSM has one owner at a time)")
    ksm = Ksm()
    has_advisor = ksm.has("advisor_mode")
    policies = [p for p in cfg.policies if p != "advisor" or has_advisor]
    if len(policies) < len(cfg.policies):
        progress("this kernel has no KSM advisor: skipping the advisor policy")
    runs: list[RunResult] = []
    orders = policy_orders(cfg, policies)
    progress(f"policy order ({cfg.order}, seed {cfg.seed}), each from a cold start by "
             f"{'fresh boots' if cfg.cold == 'boot' else 'unmerging KSM (guests without THP)'}: "
             + "; ".join(f"N={n}: {', '.join(o)}" for n, o in orders.items()))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for n in cfg.vms:
            names = [f"{cfg.prefix}{n}-{i}" for i in range(1, n + 1)]
            groups = [[p] for p in orders[n]] if cfg.cold == "boot" else [orders[n]]
            for group in groups:
                progress(f"N={n}: booting {n} guest(s) of {format_size(cfg.mem_bytes)}")
                async with Fleet(plans(names, cfg), progress) as fleet:
                    scanner = Scanner([Target.from_info(i) for i in fleet.vms],
                                      replace_foreign=True)
                    try:
                        for name in group:
                            runs.append(await _run_with_retries(name, n, scanner, ksm, cfg,
                                                                progress))
                    finally:
                        scanner.close()
    finally:
        ksm.restore()
    data = cfg.out_dir / "sharing.json"
    plot = cfg.out_dir / "sharing.png"
    conf = {**report.jsonable(cfg), "orders": {str(n): o for n, o in orders.items()}}
    result = BenchResult(conf, runs, has_advisor, plot, data)
    report.write_json(data, {"config": conf, "kernel_has_advisor": has_advisor, "runs": runs})
    save_plot(result)
    return result


# -- output --------------------------------------------------------------------------
_mib = report.mib


def _pct(part: float, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def format_result(result: BenchResult) -> str:
    rows = []
    for r in result.runs:
        rows.append([
            r.n, r.policy, f"{_mib(r.configured_pages):.0f}/{_mib(r.present_pages):.0f}",
            f"{_pct(r.shared_pages, r.configured_pages)}/{_pct(r.shared_pages, r.present_pages)}",
            f"{_pct(r.realized_pages, r.configured_pages)}/{_pct(r.realized_pages, r.present_pages)}",
            f"{_mib(r.shared_pages):.1f}",
            f"{_mib(r.potential_pages):.1f}", f"{_mib(r.merged_pages):.1f}",
            f"{_mib(r.realized_pages):.1f}", f"{_mib(r.general_profit_pages):.1f}",
            f"{100 * r.merged_pages / r.potential_pages:.0f}%" if r.potential_pages else "-",
            f"{r.t_converge_s:.1f}" if r.t_converge_s is not None else f">{r.elapsed_s:.0f} (did not converge)",
            f"{r.ksmd_cpu_converge_s:.2f}",
            f"{100 * r.ksmd_steady_cores:.2f}" if r.ksmd_steady_cores is not None else "-",
            f"{r.scan_cpu_s:.2f} ({r.scans})"])
    text = table(rows, ["N", "POLICY", "CFG/PRESENT-MiB", "SHARED-%CFG/%PRES",
                        "REALIZED-%CFG/%PRES", "SHARED-MiB", "POTENTIAL-MiB", "MERGED-MiB",
                        "REALIZED-MiB", "KSM-PROFIT-MiB", "MERGED/POT", "CONVERGE-S", "KSMD-CPU-S", "KSMD-STEADY-%CORE",
                        "HV-SCAN-CPU-S (SCANS)"])
    notes = [f"N={r.n} {r.policy}: {r.note}" for r in result.runs if r.note]
    orders = result.config.get("orders") or {}
    head = (f"policies in {result.config.get('order')} order (seed {result.config.get('seed')}), "
            f"cold start by {result.config.get('cold')}: "
            + "; ".join(f"N={n}: {', '.join(o)}" for n, o in orders.items()))
    return "\n".join([head, text, *notes])


def save_plot(result: BenchResult) -> None:
    plt = report.pyplot()
    runs = result.runs
    policies = list(dict.fromkeys(r.policy for r in runs))
    ns = sorted({r.n for r in runs})
    fig, ax = plt.subplots(2, 3, figsize=(18, 9))
    # (a) the paper's Figure 4: shared and reclaimed memory against the number of VMs
    a = ax[0][0]
    first = {r.n: r for r in runs if r.policy == policies[0]} if policies else {}
    a.plot(ns, [_mib(first[n].shared_pages) for n in ns], "o-", label="shared (scan)")
    a.plot(ns, [_mib(first[n].potential_pages) for n in ns], "s-", label="reclaimable (scan)")
    for p in policies:
        pr = {r.n: r for r in runs if r.policy == p}
        a.plot(ns, [_mib(pr[n].realized_pages) for n in ns], "x--", label=f"reclaimed by KSM: {p}")
    a.set(xlabel="number of VMs", ylabel="MiB", title="Memory shared and reclaimed (cf. ESX Fig. 4)")
    a.legend(fontsize=8)
    # (b) potential against realized, per VM (mean over the VMs of each N)
    b = ax[0][1]
    width = 0.8 / (len(policies) + 1)
    for j, p in enumerate(["potential (scan)"] + policies):
        vals = []
        for n in ns:
            r = next(x for x in runs if x.n == n and x.policy == (policies[0] if j == 0 else p))
            key = "potential" if j == 0 else "realized"
            vals.append(_mib(sum(v[key] for v in r.per_vm) / max(len(r.per_vm), 1)))
        b.bar([i + j * width for i in range(len(ns))], vals, width, label=p)
    b.set_xticks([i + width * len(policies) / 2 for i in range(len(ns))], [str(n) for n in ns])
    b.set(xlabel="number of VMs", ylabel="MiB per VM (fair share of savings)",
          title="Potential (scan) vs realized (KSM) per VM")
    b.legend(fontsize=8)
    # (c) time to converge
    c = ax[1][0]
    for p in policies:
        prl = [r for r in runs if r.policy == p]
        (line,) = c.plot([r.n for r in prl],
                         [r.t_converge_s if r.converged else math.nan for r in prl], "o-", label=p)
        for r in prl:
            if r.disturbed:
                c.annotate("disturbed", (r.n, r.t_converge_s if r.converged else r.elapsed_s),
                           fontsize=7, textcoords="offset points", xytext=(4, 4))
        late = [r for r in prl if not r.converged]
        if late:
            c.scatter([r.n for r in late], [r.elapsed_s for r in late], marker="^",
                      color=line.get_color(), label=f"{p}: did not converge (timeout)")
    c.set(xlabel="number of VMs", ylabel="seconds to 90% of potential",
          title="Time to converge (\"disturbed\": another process changed KSM)")
    c.legend(fontsize=8)
    # (d) CPU seconds
    d = ax[1][1]
    for j, p in enumerate(policies):
        pr = {r.n: r for r in runs if r.policy == p}
        d.bar([i + j * width for i in range(len(ns))], [pr[n].ksmd_cpu_converge_s for n in ns],
              width, label=f"ksmd to converge: {p}")
    hv_runs = {r.n: r for r in runs if r.policy == "hv"}
    if hv_runs:
        d.plot([i + width * (len(policies) - 1) / 2 for i in range(len(ns))],
               [hv_runs[n].scan_cpu_s if n in hv_runs else math.nan for n in ns], "k*--",
               label="hv scan (hv run)")
    d.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(ns))], [str(n) for n in ns])
    d.set(xlabel="number of VMs", ylabel="CPU seconds", title="CPU to converge (or to timeout)")
    d.legend(fontsize=8)
    # (e, f) the same as shares of configured memory (the paper's axis) and of present memory
    for axis, whole, what in ((ax[0][2], "configured_pages", "configured"),
                              (ax[1][2], "present_pages", "present")):
        axis.plot(ns, [100 * first[n].shared_pages / max(getattr(first[n], whole), 1) for n in ns],
                  "o-", label="shared (scan)")
        for p in policies:
            pr = {r.n: r for r in runs if r.policy == p}
            axis.plot(ns, [100 * pr[n].realized_pages / max(getattr(pr[n], whole), 1) for n in ns],
                      "x--", label=f"reclaimed by KSM: {p}")
        axis.set(xlabel="number of VMs", ylabel=f"% of {what} memory", ylim=(0, 100),
                 title=f"Shared and reclaimed, % of {what} memory")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
