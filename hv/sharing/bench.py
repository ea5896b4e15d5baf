"""``hv bench sharing``: how much do N guests booted from one image share, and how fast
does each KSM policy realize it?

For each N: boot N guests from the guest image (one boot per N), wait until they
are up, then run every policy in turn on the same guests.  Before each policy KSM
unmerges everything (``run=2``) and the run starts from nothing merged:

* ``hv``       — hv's governor (:mod:`hv.sharing.governor`), ``use_zero_pages=1``;
* ``stock``    — KSM's defaults: 100 pages every 20 ms, no zero-page merging;
* ``advisor``  — KSM's scan-time advisor (``advisor_mode=scan-time``, kernel defaults);
* ``ksmtuned`` — ksmtuned's rule: +300 pages (at most 1250) every period, starting at
  64, ``sleep_millisecs`` from host memory as ksmtuned computes it (at least 10), with
  memory pressure assumed throughout (on an idle host ksmtuned would leave KSM off).
  Its 60 s period is scaled down (``--ksmtuned-period``) to fit the timeout.

hv scans every guest every ``--scan-period`` seconds under every policy: the scan
gives the potential (stable duplicates and zero pages) and what KSM realized.  A run
*converges* when the realized savings reach 90% of the potential; it is cut off at
``--timeout`` and reported as "did not converge in T s".  After convergence ksmd's CPU
is measured for ``--steady`` seconds more.  KSM's settings are restored at the end,
whatever happens.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hv import paths
from hv.errors import HostError, HvError, UsageError
from hv.host.ksm import Ksm
from hv.qemu import accel as accel_mod
from hv.qemu import launch as launcher
from hv.sharing.governor import Governor, Mode
from hv.sharing.index import SharingIndex
from hv.sharing.scan import Scanner, Target
from hv.units import MiB, PAGE_SIZE, format_size, parse_size, table

__all__ = ["BenchConfig", "RunResult", "BenchResult", "add_arguments", "run", "format_result"]

# hv runs last: with use_zero_pages KSM maps zero pages to the zero page, and run=2 leaves
# them there (they are legitimate mappings), so a policy after hv would start ahead.
POLICIES = ("stock", "advisor", "ksmtuned", "hv")
WATCHED = ("run", "sleep_millisecs", "pages_to_scan", "use_zero_pages", "advisor_mode")
CONVERGED_FRACTION = 0.90  # realized >= 90% of potential: the bar
UNMERGE_TIMEOUT_S = 120.0  # run=2 unmerges a few hundred MiB in seconds
BOOT_TIMEOUT_S = 240.0  # TCG: the initramfs in ~5 s, Debian to multi-user in ~22 s; slower several at once
IDLE_SCAN_PERIOD_S = 10.0  # hv's governor scans less often once everything is merged
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

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "BenchConfig":
        try:
            vms = tuple(int(x) for x in a.vms.split(","))
        except ValueError as exc:
            raise UsageError(f"--vms takes numbers separated by commas, not {a.vms!r}") from exc
        if not vms or min(vms) < 1:
            raise UsageError("--vms: every count must be at least 1")
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
        for name in ("timeout", "steady", "scan_period", "ksmtuned_period"):
            if getattr(a, name) <= 0 and name != "steady":
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        debian_dir = Path(a.debian_dir) if a.debian_dir else paths.cache_dir() / "debian"
        if a.image == "debian":
            for f in ("debian.ext4", "debian-initrd.cpio.gz"):
                if not (debian_dir / f).exists():
                    raise UsageError(f"no {debian_dir / f}: build it with guest_balloon/build_debian.sh "
                                     f"--kernel-root {paths.kernel_root()} --out-dir {debian_dir}")
        return cls(vms, policies, parse_size(a.mem), a.workload, tuple(params), a.timeout,
                   a.steady, a.scan_period, a.ksmtuned_period, a.prefix, Path(a.out), a.image,
                   debian_dir, max(0, a.retries))


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
    p.add_argument("--scan-period", type=float, default=2.0, metavar="SECONDS")
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
    converged: bool
    t_converge_s: float | None
    elapsed_s: float
    potential_pages: int
    realized_pages: int
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

    def scan_period(self, default_s: float) -> float:
        return default_s


class HvPolicy(Policy):
    name = "hv"

    def __init__(self, ksm: Ksm) -> None:
        super().__init__(ksm)
        self.gov = Governor(ksm)

    def start(self) -> None:
        self.gov.start()

    def tick(self, index: SharingIndex, t_s: float) -> None:
        self.gov.step(index)

    def scan_period(self, default_s: float) -> float:
        return IDLE_SCAN_PERIOD_S if self.gov.mode is Mode.IDLE else default_s


class StockPolicy(Policy):
    name = "stock"

    def start(self) -> None:
        extra = {"advisor_mode": "none"} if self.ksm.has("advisor_mode") else {}
        self.ksm.set(pages_to_scan=100, sleep_millisecs=20, use_zero_pages=0, run=1, **extra)


class AdvisorPolicy(Policy):
    name = "advisor"

    def start(self) -> None:
        if not self.ksm.has("advisor_mode"):
            raise HvError("this kernel's KSM has no advisor_mode (scan-time advisor needs 6.7+)")
        self.ksm.set(pages_to_scan=100, sleep_millisecs=20, use_zero_pages=0)
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
                     use_zero_pages=0, run=1, **extra)
        self.next_s = self.period_s

    def tick(self, index: SharingIndex, t_s: float) -> None:
        while t_s >= self.next_s:  # "memory pressure": boost every period
            self.npages = min(KSMTUNED_MAX, self.npages + KSMTUNED_BOOST)
            self.ksm.set(pages_to_scan=self.npages)
            self.next_s += self.period_s


def make_policy(name: str, ksm: Ksm, cfg: BenchConfig) -> Policy:
    if name == "hv":
        return HvPolicy(ksm)
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


def run_policy(name: str, n: int, scanner: Scanner, ksm: Ksm, cfg: BenchConfig,
               progress: Callable[[str], None]) -> RunResult:
    unmerge(ksm)
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
                        "realized": index.realized_savings_pages,
                        "pages_sharing": stats["pages_sharing"],
                        "ksm_zero_pages": stats["ksm_zero_pages"],
                        "pages_to_scan": int(ksm.get("pages_to_scan")),
                        "ksmd_cpu_s": round(stats.ksmd_cpu_s - cpu0, 3)})
        if (t_conv is None and index.potential_savings_pages > 0
                and index.realized_savings_pages >= CONVERGED_FRACTION * index.potential_savings_pages):
            t_conv, cpu_conv = t, stats.ksmd_cpu_s - cpu0
            steady_from = (time.monotonic(), stats.ksmd_cpu_s)
            progress(f"  {name} N={n}: converged at {t:.1f} s (realized "
                     f"{index.realized_savings_pages} of {index.potential_savings_pages} pages)")
        if t_conv is not None and t - t_conv >= cfg.steady_s:
            break
        if t_conv is None and t >= cfg.timeout_s:
            cpu_conv = stats.ksmd_cpu_s - cpu0
            progress(f"  {name} N={n}: did not converge in {cfg.timeout_s:.0f} s (realized "
                     f"{index.realized_savings_pages} of {index.potential_savings_pages} pages)")
            break
        other = policy.disturbed()
        if other is not None:
            disturbed.append(f"t={t:.0f}s {other}")
            progress(f"  {name} N={n}: another process changed KSM: {other} (run disturbed)")
        policy.tick(index, t)
        policy.remember()
        next_t = t + policy.scan_period(cfg.scan_period_s)
        if t_conv is not None:
            next_t = min(next_t, t_conv + cfg.steady_s)
        time.sleep(max(0.0, next_t - (time.monotonic() - t0)))
        index = scanner.scan_all()
        scans += 1
    steady: float | None = None
    if steady_from is not None:
        dt = time.monotonic() - steady_from[0]
        if dt > 1.0:
            steady = (ksm.stats().ksmd_cpu_s - steady_from[1]) / dt
    ksm.restore()
    return RunResult(
        n=n, policy=name, converged=t_conv is not None, t_converge_s=t_conv,
        elapsed_s=time.monotonic() - t0, potential_pages=index.potential_savings_pages,
        realized_pages=index.realized_savings_pages, shared_pages=_shared(index),
        inter_vm_dup_pages=sum(v.inter_vm_dups for v in index.vms), present_pages=index.present,
        ksmd_cpu_converge_s=cpu_conv, ksmd_steady_cores=steady,
        scan_cpu_s=scanner.scan_cpu_s - scan_cpu0, scans=scans,
        per_vm=[{"vm": v.vm, "present": v.present, "potential": v.potential_savings_pages,
                 "realized": v.realized_savings_pages, "ksm_merging_pages": v.ksm_merging_pages}
                for v in index.vms],
        samples=samples, disturbed=bool(disturbed),
        note="; ".join(([] if t_conv is not None else [f"did not converge in {cfg.timeout_s:.0f} s"])
                       + ([f"DISTURBED: KSM changed by another process ({', '.join(disturbed[:3])})"]
                          if disturbed else [])))


# -- guests --------------------------------------------------------------------------
def _ready(name: str) -> bool:
    log = launcher.console_log(name)
    return log.exists() and "event=ready" in log.read_text(errors="replace")


async def boot(names: list[str], cfg: BenchConfig) -> list[Target]:
    verdict = accel_mod.choose()
    targets = []
    initrd = disk = None
    if cfg.image == "debian":
        # The disk is attached with snapshot=on (writes go to a temporary file), so
        # every guest boots the same image.
        initrd = str(cfg.debian_dir / "debian-initrd.cpio.gz")
        disk = str(cfg.debian_dir / "debian.ext4")
    for name in names:
        spec = launcher.GuestSpec(name=name, mem_bytes=cfg.mem_bytes, workload=cfg.workload,
                                  params=dict(cfg.params), accel=verdict.accel,
                                  initrd=initrd, disk=disk)
        vm = await launcher.launch(spec)
        targets.append(Target.from_info(vm.info))
        await vm.detach()
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while not all(_ready(n) for n in names):
        if time.monotonic() > deadline:
            late = [n for n in names if not _ready(n)]
            raise HvError(f"guests {', '.join(late)} did not boot in {BOOT_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.5)
    return targets


async def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> BenchResult:
    from hv.published import running_status  # KSM has one owner at a time
    if (snapshot := running_status()) is not None:
        raise HostError(f"`hv run` (pid {snapshot['pid']}) governs KSM on this host: "
                        "stop it before benchmarking KSM policies")
    ksm = Ksm()
    has_advisor = ksm.has("advisor_mode")
    policies = [p for p in cfg.policies if p != "advisor" or has_advisor]
    if len(policies) < len(cfg.policies):
        progress("this kernel has no KSM advisor: skipping the advisor policy")
    runs: list[RunResult] = []
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for n in cfg.vms:
            names = [f"{cfg.prefix}{n}-{i}" for i in range(1, n + 1)]
            progress(f"N={n}: booting {n} guest(s) of {format_size(cfg.mem_bytes)}")
            try:
                targets = await boot(names, cfg)
                scanner = Scanner(targets, replace_foreign=True)
                try:
                    for name in policies:
                        for attempt in range(cfg.retries + 1):
                            progress(f"  {name} N={n}: running (timeout {cfg.timeout_s:.0f} s)")
                            r = await asyncio.to_thread(run_policy, name, n, scanner, ksm, cfg,
                                                        progress)
                            if not r.disturbed or attempt == cfg.retries:
                                break
                            progress(f"  {name} N={n}: disturbed by another process; again")
                        runs.append(r)
                finally:
                    scanner.close()
            finally:
                for name in names:
                    if (launcher.vm_dir(name) / "qmp.sock").exists() or \
                            (launcher.vm_dir(name) / "qemu.pid").exists():
                        await launcher.stop(name)
    finally:
        ksm.restore()
    data = cfg.out_dir / "sharing.json"
    plot = cfg.out_dir / "sharing.png"
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    result = BenchResult(conf, runs, has_advisor, plot, data)
    data.write_text(json.dumps({"config": conf, "kernel_has_advisor": has_advisor,
                                "runs": [asdict(r) for r in runs]}, indent=1))
    save_plot(result)
    return result


# -- output --------------------------------------------------------------------------
def _mib(pages: float) -> float:
    return pages * PAGE_SIZE / MiB


def format_result(result: BenchResult) -> str:
    rows = []
    for r in result.runs:
        rows.append([
            r.n, r.policy, r.present_pages, f"{_mib(r.shared_pages):.1f}",
            f"{_mib(r.potential_pages):.1f}", f"{_mib(r.realized_pages):.1f}",
            f"{100 * r.realized_pages / r.potential_pages:.0f}%" if r.potential_pages else "-",
            f"{r.t_converge_s:.1f}" if r.t_converge_s is not None else f">{r.elapsed_s:.0f} (did not converge)",
            f"{r.ksmd_cpu_converge_s:.2f}",
            f"{100 * r.ksmd_steady_cores:.2f}" if r.ksmd_steady_cores is not None else "-",
            f"{r.scan_cpu_s:.2f} ({r.scans})"])
    text = table(rows, ["N", "POLICY", "PRESENT", "SHARED-MiB", "POTENTIAL-MiB", "REALIZED-MiB",
                        "REAL/POT", "CONVERGE-S", "KSMD-CPU-S", "KSMD-STEADY-%CORE",
                        "HV-SCAN-CPU-S (SCANS)"])
    notes = [f"N={r.n} {r.policy}: {r.note}" for r in result.runs if r.note]
    return "\n".join([text, *notes])


def save_plot(result: BenchResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.runs
    policies = list(dict.fromkeys(r.policy for r in runs))
    ns = sorted({r.n for r in runs})
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
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
    fig.tight_layout()
    fig.savefig(result.plot, dpi=100)
    plt.close(fig)
