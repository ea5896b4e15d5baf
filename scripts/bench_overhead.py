#!/usr/bin/env python3
"""Overhead benchmark: the CPU ``hv run`` spends managing idle guests (issue 7, item 9).

Boots --vms idle guests, runs ``hv run`` on them with the default [host] section
(``poll_interval_s = 1``, sampling and sharing on; host swap is created if there is
too little, and removed afterwards), and after --warmup seconds measures for --window
seconds:

  * hv run's CPU: utime + stime of its process in /proc/PID/stat (every thread of
    it; the guardian, a separate process, is not in it and is printed apart),
  * ksmd's CPU, printed apart (the kernel's work, not hv's),

against GOAL_CORE_PCT.  Then, with hv run stopped (QEMU serves one QMP client at a
time), a breakdown from the same guests, each part timed alone with
time.process_time over --iterations calls and converted to CPU per second at the
daemon's rates; the sharing scan is taken from hv run's own event log instead.  The
breakdown's sum stands next to the measured total, and the old code paths of the
per-tick work (whole-file smaps parse, a statistics-interval check per tick) are
timed next to the current ones as the baseline.

    flock /tmp/hv-tests.lock .venv/bin/python scripts/bench_overhead.py [--vms 8] \\
        [--mem 256M] [--warmup 30] [--window 60] [--iterations 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Private run and state directories: this run's guests, daemon lock, event log and
# swap record are its own, whatever else runs on the host.
WORK = Path(tempfile.mkdtemp(prefix="hv-bench-overhead-"))
os.environ["HV_RUN_DIR"] = str(WORK / "run")
os.environ["HV_STATE_DIR"] = str(WORK / "state")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hv.errors import HvError  # noqa: E402
from hv.eventlog import read_events  # noqa: E402
from hv.host import proc, swap  # noqa: E402
from hv.policy.config import DEFAULT_SAMPLE_PAGES, DEFAULT_SAMPLE_PERIOD_S  # noqa: E402
from hv.qemu import accel, launch  # noqa: E402
from hv.qemu.vm import VM  # noqa: E402
from hv.sampler import POLL_MAX_S, POLL_PERIOD_FRACTION, Sampler  # noqa: E402
from hv.units import KiB, MiB, format_size, parse_size  # noqa: E402

GOAL_CORE_PCT = 1.0  # issue 7, item 9: hv run under 1 % of a core
POLL_INTERVAL_S = 1.0  # the default, written out: the rate the per-tick parts run at
MIN_BYTES = 128 * MiB  # each VM's min: half of a 256 MiB guest
BOOT_TIMEOUT_S = 120.0
FIRST_TICK_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(HvError):
    """The benchmark could not run (a guest did not boot, hv run exited...)."""


def progress(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:5.0f} s] {text}", file=sys.stderr, flush=True)


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads, not its children), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def find_pid(comm: str) -> int | None:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as f:
                    if f.read().strip() == comm:
                        return int(entry.name)
            except OSError:
                continue
    return None


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (hv run's guardian), from /proc/PID/task/TID/children."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue  # the thread exited meanwhile
    return out


def old_range_usage(pid: int, start: int, length: int) -> proc.RangeUsage:
    """hv.host.proc.range_usage before this benchmark: the whole smaps file, line by line."""
    end = start + length
    rss = swp = huge = 0
    inside = False
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            first = line.split(b" ", 1)[0]
            if b"-" in first and not first.endswith(b":"):
                lo, hi = (int(x, 16) for x in first.split(b"-"))
                inside = lo < end and hi > start
            elif inside:
                if first == b"Rss:":
                    rss += int(line.split()[1]) * KiB
                elif first == b"Swap:":
                    swp += int(line.split()[1]) * KiB
                elif first == b"AnonHugePages:":
                    huge += int(line.split()[1]) * KiB
    return proc.RangeUsage(rss, swp, huge)


@dataclass
class Part:
    name: str
    pct: float  # % of one core
    how: str


def per_call_s(n: int, fn: Callable[[], object]) -> float:
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n


async def per_call_async_s(n: int, fn: Callable[[], object]) -> float:
    c0 = time.process_time()
    for _ in range(n):
        await fn()  # type: ignore[misc]
    return (time.process_time() - c0) / n


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.names = [f"ovh-{i + 1}" for i in range(args.vms)]
        self.launched: list[str] = []
        self.swap_path: Path | None = None
        self.swap_note = ""
        self.hv: subprocess.Popen[bytes] | None = None
        self.log = WORK / "events.jsonl"

    # -- setup and teardown ------------------------------------------------------
    def ensure_swap(self) -> None:
        """Free swap for admission (sum of max - min) plus sampling; hv's own file if short."""
        need = self.args.vms * (self.args.mem - MIN_BYTES) + 256 * MiB
        _, free = swap.totals()
        if free >= need:
            self.swap_note = f"host swap {format_size(free)} free"
            progress(self.t0, f"{self.swap_note}: enough")
            return
        size = need - free + 64 * MiB
        # /var/tmp, not /tmp: swapon refuses files on tmpfs, which /tmp often is.
        path = Path(tempfile.mkdtemp(prefix="hv-bench-swap-", dir="/var/tmp")) / "swapfile"
        progress(self.t0, f"creating {format_size(size)} of swap at {path}")
        self.swap_path = path
        swap.create(size, path)
        self.swap_note = f"host swap {format_size(free + size)} free (hv swap create)"

    def remove_swap(self) -> None:
        if self.swap_path is not None:
            progress(self.t0, f"removing swap {self.swap_path}")
            swap.remove(self.swap_path)
            shutil.rmtree(self.swap_path.parent, ignore_errors=True)
            self.swap_path = None

    async def boot(self) -> None:
        verdict = accel.choose()
        for name in self.names:
            spec = launch.GuestSpec(name=name, mem_bytes=self.args.mem, accel=verdict.accel)
            self.launched.append(name)
            vm = await launch.launch(spec)
            await vm.detach()
            progress(self.t0, f"launched {name} ({verdict.accel}, {format_size(self.args.mem)})")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        waiting = list(self.names)
        while waiting:
            waiting = [n for n in waiting if "event=ready" not in
                       launch.console_log(n).read_text(errors="replace")]
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{', '.join(waiting)} did not boot within {BOOT_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.5)
        progress(self.t0, f"{len(self.names)} guests booted")

    async def stop_guests(self) -> None:
        for name in self.launched:
            try:
                await launch.stop(name)
            except (HvError, OSError) as exc:
                print(f"bench_overhead: warning: stopping {name}: {exc}", file=sys.stderr)
        if self.launched:
            progress(self.t0, f"stopped {len(self.launched)} guests")
        self.launched = []

    def start_hv(self) -> int:
        config = WORK / "hv.toml"
        lines = ["[host]", f"poll_interval_s = {POLL_INTERVAL_S:g}"]
        for name in self.names:
            lines += ["", f"[vm.{name}]", f'min = "{MIN_BYTES // MiB}M"',
                      f'max = "{self.args.mem // MiB}M"']
        config.write_text("\n".join(lines) + "\n")
        self.hv_stderr = WORK / "hv-run.stderr"
        with open(self.hv_stderr, "wb") as err:
            self.hv = subprocess.Popen(
                [sys.executable, "-m", "hv.cli", "run", "--config", str(config),
                 "--log", str(self.log)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + FIRST_TICK_TIMEOUT_S
        while not any(True for _ in self.events("tick")):
            self.check_hv()
            if time.monotonic() > deadline:
                raise BenchError(f"hv run made no tick within {FIRST_TICK_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        progress(self.t0, f"hv run (pid {self.hv.pid}) ticking")
        return self.hv.pid

    def check_hv(self) -> None:
        assert self.hv is not None
        if self.hv.poll() is not None:
            text = self.hv_stderr.read_text(errors="replace").strip().splitlines()
            raise BenchError(f"hv run exited with {self.hv.returncode}: "
                             f"{text[-1] if text else 'no message'}")

    def stop_hv(self) -> None:
        if self.hv is not None and self.hv.poll() is None:
            self.hv.send_signal(signal.SIGTERM)
            try:
                self.hv.wait(30)
            except subprocess.TimeoutExpired:
                self.hv.kill()
                self.hv.wait(5)
        self.hv = None

    def events(self, event: str) -> list[dict[str, Any]]:
        return list(read_events(self.log, event)) if self.log.exists() else []

    # -- the measured window -----------------------------------------------------
    def sleep_checked(self, what: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(10.0, left))
            self.check_hv()
            progress(self.t0, f"{what}: {max(0.0, end - time.monotonic()):.0f} s left")

    def measure(self, hv_pid: int) -> dict[str, float]:
        ksmd = find_pid("ksmd")
        guardians = children(hv_pid)
        self.sleep_checked("warm-up", self.args.warmup)
        w0 = time.monotonic()
        hv0 = cpu_s(hv_pid)
        k0 = cpu_s(ksmd) if ksmd else 0.0
        g0 = sum(cpu_s(g) for g in guardians)
        ts0 = time.time()
        self.sleep_checked("window", self.args.window)
        hv1 = cpu_s(hv_pid)
        k1 = cpu_s(ksmd) if ksmd else 0.0
        g1 = sum(cpu_s(g) for g in guardians)
        wall = time.monotonic() - w0
        ts1 = time.time()
        ticks = [e for e in self.events("tick") if ts0 <= float(e["ts"]) <= ts1]
        shares = self.events("share")
        before = [float(e["scan_cpu_s"]) for e in shares if float(e["ts"]) < ts0]
        upto = [float(e["scan_cpu_s"]) for e in shares if float(e["ts"]) <= ts1]
        rounds = sum(1 for e in shares if ts0 <= float(e["ts"]) <= ts1)
        samples = sum(1 for e in self.events("sample") if ts0 <= float(e["ts"]) <= ts1)
        scan = (upto[-1] if upto else 0.0) - (before[-1] if before else 0.0)
        return {"wall_s": wall, "hv_s": hv1 - hv0, "ksmd_s": k1 - k0, "guardian_s": g1 - g0,
                "ksmd": float(ksmd or 0), "ticks": len(ticks) / len(self.names),
                "scan_s": scan, "scan_rounds": rounds, "samples": samples}

    # -- the breakdown, part by part -------------------------------------------------
    async def breakdown(self, m: dict[str, float]) -> tuple[list[Part], list[Part]]:
        n, vms = self.args.iterations, len(self.names)
        per_tick = vms / POLL_INTERVAL_S  # VM reads per second of the old daemon (every tick)
        reads = m["ticks"] / m["wall_s"]  # reads per VM per second measured (one tick line each)
        per_read = vms * reads  # VM reads per second now (idle VMs in high: every idle_collect_s)
        handles = []
        for name in self.names:
            vm = VM(name, launch.socket_of(name)[1])
            await vm.attach()
            await vm.enable_stats()
            handles.append(vm)
        try:
            qmp = qmp_old = smaps = smaps_old = runq = 0.0
            samp_edges = samp_poll = 0.0
            for i, vm in enumerate(handles):
                progress(self.t0, f"timing the parts alone: {vm.name} ({i + 1}/{vms})")
                info = vm.info
                r = info.ram[0]

                async def tick_qmp(vm: VM = vm) -> None:  # hv.daemon.collect._read's QMP
                    await vm.balloon_actual()
                    await vm.guest_stats(wait_s=0)
                    await vm.status()

                async def tick_qmp_old(vm: VM = vm, path: str = info.balloon_path or "") -> None:
                    await vm._cmd("qom-get", {"path": path,  # noqa: SLF001 - the old extra check
                                              "property": "guest-stats-polling-interval"})
                    await tick_qmp()

                qmp += await per_call_async_s(n, tick_qmp)
                qmp_old += await per_call_async_s(n, tick_qmp_old)
                smaps += per_call_s(n, vm.host_usage)
                smaps_old += per_call_s(n, lambda: old_range_usage(info.pid, r.hva, r.size))
                runq += per_call_s(n, lambda: proc.vcpu_runqueue_wait_s(info.pid))
                sampler = Sampler(info.pid, [(x.hva, x.size) for x in info.ram], DEFAULT_SAMPLE_PAGES)
                k = max(3, n // 20)  # each begin pages out sample_pages pages: fewer rounds
                c0 = time.process_time()
                for _ in range(k):
                    sampler.begin()
                    sampler.end()
                samp_edges += (time.process_time() - c0) / k
                sampler.begin()
                samp_poll += per_call_s(n, sampler.touched_so_far)
                sampler.abandon()
        finally:
            for vm in handles:
                await vm.detach()
        period = DEFAULT_SAMPLE_PERIOD_S
        polls = period / min(POLL_MAX_S, period * POLL_PERIOD_FRACTION)
        sampler_pct = 100 * vms * (samp_edges / vms + polls * samp_poll / vms) / period
        ms = 1000 / vms  # the sums above are over the VMs: ms per VM = sum * ms
        parts = [
            Part("QMP", 100 * per_read * qmp / vms,
                 f"query-balloon, qom-get guest-stats, query-status: {qmp * ms:.2f} ms "
                 f"CPU per VM per read alone x {vms} VMs x {reads:.3f} reads/s (measured)"),
            Part("smaps", 100 * per_read * smaps / vms,
                 f"VM.host_usage (proc.range_usage): {smaps * ms:.2f} ms per VM per read "
                 f"alone x {vms} x {reads:.3f}/s"),
            Part("run-queue", 100 * per_read * runq / vms,
                 f"proc.vcpu_runqueue_wait_s (collect's VM clock): {runq * ms:.3f} ms per "
                 f"VM per read alone x {vms} x {reads:.3f}/s"),
            Part("scan", 100 * m["scan_s"] / m["wall_s"],
                 f"hv run's own 'share' events: scan_cpu_s grew {m['scan_s']:.3f} s in the "
                 f"window ({m['scan_rounds']} rounds; process_time, so it counts all of hv "
                 f"run's threads during a scan)"),
            Part("sampler", sampler_pct,
                 f"Sampler begin+end {samp_edges * ms:.2f} ms + {polls:.0f} polls x "
                 f"{samp_poll * ms:.3f} ms (touched_so_far) per VM per "
                 f"{period:g} s period, alone"),
        ]
        baseline = [
            Part("QMP, old", 100 * per_tick * qmp_old / vms,
                 f"the same plus the qom-get guest-stats-polling-interval that VM.guest_stats "
                 f"sent, every tick as before: {qmp_old * ms:.2f} ms per VM per tick"),
            Part("smaps, old", 100 * per_tick * smaps_old / vms,
                 f"range_usage before: all of smaps read and parsed line by line, every "
                 f"tick: {smaps_old * ms:.2f} ms per VM per tick"),
        ]
        return parts, baseline

    # -- the whole run -----------------------------------------------------------------
    def run(self) -> None:
        """Everything, with guests, hv run and swap cleaned up however it ends (Ctrl-C too)."""
        try:
            self.ensure_swap()
            asyncio.run(self.boot())
            hv_pid = self.start_hv()
            try:
                m = self.measure(hv_pid)
            finally:
                self.stop_hv()
            progress(self.t0, "hv run stopped")
            parts, baseline = asyncio.run(self.breakdown(m))
        finally:
            self.stop_hv()
            asyncio.run(self.stop_guests())
            self.remove_swap()
        self.report(m, parts, baseline)

    def report(self, m: dict[str, float], parts: list[Part], baseline: list[Part]) -> None:
        wall = m["wall_s"]
        total = 100 * m["hv_s"] / wall
        summed = sum(p.pct for p in parts)
        verdict = "meets" if total < GOAL_CORE_PCT else "misses"
        print(f"setup       {len(self.names)} idle guests of {format_size(self.args.mem)} "
              f"(min {format_size(MIN_BYTES)}), hv run with the default [host] "
              f"(poll_interval_s = {POLL_INTERVAL_S:g}, sampling and sharing on), "
              f"{self.swap_note}")
        print(f"window      {wall:.1f} s after a {self.args.warmup:g} s warm-up; "
              f"{m['ticks']:.0f} ticks per VM, {m['samples']:.0f} sample periods ended, "
              f"{m['scan_rounds']:.0f} share rounds")
        print(f"hv run      {total:.2f} % of a core ({m['hv_s']:.2f} s CPU, utime+stime of "
              f"its process from /proc/PID/stat) -> {verdict} the goal of under "
              f"{GOAL_CORE_PCT:g} % of a core")
        print(f"guardian    {100 * m['guardian_s'] / wall:.2f} % of a core (not in the figure above)")
        print(f"ksmd        {100 * m['ksmd_s'] / wall:.2f} % of a core (pid {m['ksmd']:.0f}; "
              f"the kernel's merging, not in the figure above)")
        print()
        print("BREAKDOWN (each part timed alone on the same guests after the window, at the "
              "daemon's rates)")
        width = max(len(p.name) for p in parts + baseline)
        for p in parts:
            print(f"  {p.name:<{width}}  {p.pct:6.2f} %   {p.how}")
        print(f"  {'sum':<{width}}  {summed:6.2f} %   of the measured {total:.2f} %; the rest, "
              f"{total - summed:.2f} %, is the tick itself (policy, event log, status file, "
              f"asyncio, threads) and timing noise")
        print()
        print("BASELINE (the old code paths of the same per-tick work, timed alone the same way)")
        for p in baseline:
            print(f"  {p.name:<{width}}  {p.pct:6.2f} %   {p.how}")
        old = summed - parts[0].pct - parts[1].pct + baseline[0].pct + baseline[1].pct
        print(f"  {'sum':<{width}}  {old:6.2f} %   the breakdown's sum with the old paths")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=8, help="idle guests to boot (default 8)")
    p.add_argument("--mem", type=parse_size, default=256 * MiB, help="guest memory (default 256M)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before the window (default 30)")
    p.add_argument("--window", type=float, default=60.0, help="measured seconds (default 60)")
    p.add_argument("--iterations", type=int, default=100,
                   help="calls per part per VM when timing the breakdown (default 100)")
    args = p.parse_args()
    if args.vms < 1 or args.window <= 0 or args.warmup < 0 or args.iterations < 1:
        print("bench_overhead: error: need --vms >= 1, --window > 0, --warmup >= 0, "
              "--iterations >= 1", file=sys.stderr)
        return 2
    if args.mem <= MIN_BYTES:
        print(f"bench_overhead: error: --mem must be above each VM's min {format_size(MIN_BYTES)}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_overhead: error: needs root (QEMU's /proc files, KSM, swap)", file=sys.stderr)
        return 1
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("bench_overhead: error: interrupted (guests stopped, swap removed)", file=sys.stderr)
        return 130
    except (HvError, OSError) as exc:
        print(f"bench_overhead: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
