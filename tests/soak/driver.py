"""The soak: `hv run` managing 8 guests for N minutes under changing real pressure.

``scripts/soak.sh --minutes N [--report PREFIX]`` (or ``python -m tests.soak.driver``):

1. a private run and state directory (``HV_RUN_DIR``, ``HV_STATE_DIR``) under /var/tmp;
   host swap for admission (every VM's max - min) and hv's swapping, created only if
   the host lacks it and removed at the end;
2. 8 guests (:data:`GUESTS`): idle, an idle one that wrote and freed memory, touchers
   whose working sets change on a schedule, hogs (one holds, one frees after a while),
   and a file cache in tmpfs; together ~6 GiB, far over what is left of the host once
   the memory locker holds its part;
3. `hv run` with the default thresholds (1 s poll, 10 s sampling period);
4. for N minutes, at random (seeded): the memory locker (:mod:`tests.functional.pressure`)
   moves MemAvailable between 10 % and 0.8 % of the host, either once per phase (a
   process that grows and stays) or every 2 s (one that keeps growing into what hv
   frees); a guest is SIGKILLed and launched again; `hv run` gets SIGHUP with changed
   shares and limits;
5. throughout: hv's published tick times, the host's memory stall and hv's run-queue
   wait (10 Hz), hv's RSS, open fds, CPU and event-log size (every few seconds);
6. at the end: pressure released, hv stopped (SIGTERM), every guest asked whether it
   runs, consoles read, every guest stopped, the swap removed, KSM checked; the report
   (markdown and JSON, :mod:`tests.soak.analysis`) written.

Exit status 0 when every promise held, 1 when one did not, 2 when the soak could not
run at all.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.soak import analysis
from tests.soak.analysis import Kill, ResourceSample, StallSample

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

POLL_INTERVAL_S = 1.0

# Sampling period: short enough that estimates follow the touchers' changing working
# sets within a phase, long enough that a period is not discarded as too short on TCG.
SAMPLE_PERIOD_S = 10

# Every guest's guaranteed minimum: above the balloon floor of the largest (1 GiB / 8)
# and what an idle guest uses, as in tests/functional/test_pressure.py.
MIN = "160M"


@dataclass(frozen=True)
class Guest:
    name: str
    mem: str
    workload: str
    params: dict[str, object] = field(default_factory=dict)
    ready: str = "ready"  # the console event that says the workload is in place


GUESTS = (
    Guest("s1-idle", "512M", "idle"),
    Guest("s2-freed", "768M", "hog", {"hog_mib": 500, "hog_hold_s": 1}, "hog_freed"),
    Guest("s3-touch", "1024M", "toucher", {"alloc_mib": 480, "ws": "100:60,400:60,250:60"},
          "toucher_filled"),
    Guest("s4-touch", "768M", "toucher", {"alloc_mib": 320, "ws": "300:40,40:40"}, "toucher_filled"),
    Guest("s5-hog", "1024M", "hog", {"hog_mib": 600}, "hog_touched"),
    Guest("s6-hog", "768M", "hog", {"hog_mib": 400, "hog_hold_s": 120}, "hog_touched"),
    Guest("s7-cache", "768M", "filecache", {"file_mib": 300}, "filecache_done"),
    Guest("s8-idle", "512M", "idle"),
)

# Pressure levels (% of MemTotal available) and how often each is drawn: hv's states
# are high above 6, soft below 4, hard below 2, low below 1 (README).
LEVELS_PCT = ((10.0, 2), (5.0, 1), (3.0, 3), (1.5, 2), (0.8, 1))

# The run starts with a tour of every state, so that hv has done everything once (its
# heap's high-water mark) before the warm-up ends and RSS and fds are judged.
TOUR_PCT = (3.0, 1.5, 0.8, 10.0)

# Admission reserves every VM's max - min in swap; hv's swapping and sampling page out
# more on top.
SWAP_MARGIN_BYTES = 1024 * MiB

# A reload lowers a guest's max to 3/4 of its size, but never below what its workload
# allocates plus what the guest's kernel and init hold (~70 MiB) and hv's headroom: hv
# applies a max at once and whatever the guest needs (README: "max is a limit in every
# state"), so a lower max is an order to OOM the guest, not a test of hv.
GUEST_BASE_MIB = 128


def reduced_max_mib(g: Guest) -> int:
    workload_mib = max((int(str(g.params[k])) for k in ("hog_mib", "alloc_mib", "file_mib")
                        if k in g.params), default=0)
    return min(to_bytes(g.mem) // MiB, max(to_bytes(g.mem) * 3 // 4 // MiB, workload_mib + GUEST_BASE_MIB))


BOOT_TIMEOUT_S = 120.0  # 8 TCG guests booting and filling at once on 2 cores
EVENT_TIMEOUT_S = 30.0  # hv notices a dead QEMU / answers a SIGHUP
REATTACH_TIMEOUT_S = 60.0  # a relaunched guest is managed again


def log(msg: str) -> None:
    sys.stderr.write(f"soak {time.strftime('%H:%M:%S')} {msg}\n")
    sys.stderr.flush()


def to_bytes(size: str) -> int:
    from hv.units import parse_size
    return parse_size(size)


class Timing:
    """How the run is paced: phases, kills and reloads scale with its length."""

    def __init__(self, minutes: float) -> None:
        short = minutes < 10
        self.phase_s = (15.0, 30.0) if short else (45.0, 120.0)
        self.low_phase_max_s = 20.0 if short else 40.0
        self.kill_every_s = (50.0, 70.0) if short else (60.0, 120.0)
        self.reload_every_s = (40.0, 60.0) if short else (45.0, 90.0)
        self.resource_every_s = 2.0 if short else 5.0


class EventTail:
    """Reads new lines of the event log as it grows, across a rotation (``PATH`` renamed
    to ``PATH.1`` and a new ``PATH`` started)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def _read(self, path: Path) -> None:
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end >= 0:
            for line in data[: end + 1].splitlines():
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    continue
            self.offset += end + 1

    def poll(self) -> list[dict[str, Any]]:
        with self.lock:
            try:
                inode = os.stat(self.path).st_ino
                if self.inode is not None and inode != self.inode:  # rotated: finish the old file
                    old = self.path.with_name(self.path.name + ".1")
                    if old.exists() and os.stat(old).st_ino == self.inode:
                        self._read(old)
                    self.offset = 0
                self.inode = inode
                self._read(self.path)
            except FileNotFoundError:
                pass
            return self.events

    def find(self, event: str, after: float, **match: Any) -> dict[str, Any] | None:
        for e in reversed(self.poll()):
            if e.get("ts", 0) < after:
                return None
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                found: dict[str, Any] = e
                return found
        return None


def wait_until(pred: Any, timeout_s: float, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(interval_s)


def read_int(path: str, index: int = 0) -> int:
    with open(path) as f:
        return int(f.read().split()[index])


def mem_full_us() -> int:
    with open("/proc/pressure/memory") as f:
        for line in f:
            if line.startswith("full"):
                return int(line.split("total=")[1])
    return 0


def proc_stat_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_of(pid: int) -> dict[str, int]:
    """hv's memory from /proc/PID/status, bytes: RssAnon, RssFile, RssShmem, VmSwap."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmSwap"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class Soak:
    def __init__(self, minutes: float, seed: int, report: Path, keep: bool,
                 hv_env: dict[str, str] | None = None, trace_malloc: bool = False) -> None:
        self.hv_env = hv_env or {}
        self.trace_malloc = trace_malloc
        self.minutes = minutes
        self.seed = seed
        self.rng = random.Random(seed)
        self.report_prefix = report
        self.keep = keep
        self.timing = Timing(minutes)
        self.work = Path(tempfile.mkdtemp(prefix="hv-soak-", dir="/var/tmp"))
        self.run_dir = self.work / "run"
        self.state_dir = self.work / "state"
        self.log_path = self.work / "events.jsonl"
        self.config_path = self.work / "hv.toml"
        self.consoles_dir = self.work / "consoles"
        self.pids: dict[str, int] = {}
        self.restarting: set[str] = set()
        self.killed_by_us: set[int] = set()
        self.kills: list[Kill] = []
        self.reloads: list[dict[str, Any]] = []
        self.phases: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.tick_times: list[float] = []
        self.stalls: list[StallSample] = []
        self.resources: list[ResourceSample] = []
        self.poller_worst_gap_s = 0.0
        self.stop = threading.Event()
        self.hv: subprocess.Popen[bytes] | None = None
        self.hv_stderr: Any = None
        self.locker: Any = None
        self.swap_path: Path | None = None
        self.shares = {g.name: 1000 for g in GUESTS}
        self.max_override: dict[str, str] = {}
        self.ksm_before: dict[str, str] = {}
        self.archived: dict[str, list[str]] = {g.name: [] for g in GUESTS}
        self.tail = EventTail(self.log_path)
        self.t_start = 0.0
        self.t_warm: float | None = None  # end of the tour of states
        self.t_end = 0.0
        self.exit_status: int | None = None
        self.still_paused: list[str] = []
        self.cleanup_report: dict[str, Any] = {}

    # -- environment ----------------------------------------------------------------
    def setup_env(self) -> None:
        self.run_dir.mkdir()
        self.state_dir.mkdir()
        self.consoles_dir.mkdir()
        os.environ["HV_RUN_DIR"] = str(self.run_dir)
        os.environ["HV_STATE_DIR"] = str(self.state_dir)
        shared = Path("/run/hv/accel.json")
        if "HV_ACCEL" not in os.environ:
            from hv.qemu import accel
            if not shared.exists():
                os.environ["HV_RUN_DIR"] = "/run/hv"
                accel.choose()
                os.environ["HV_RUN_DIR"] = str(self.run_dir)
            shutil.copy(shared, self.run_dir / "accel.json")
        from tests.functional.hvrun import ksm_snapshot
        self.ksm_before = ksm_snapshot()

    def hv_cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hv.cli", *args], capture_output=True,
                              text=True, timeout=timeout_s, cwd=REPO, env=dict(os.environ))

    def ensure_swap(self) -> None:
        from hv.host import swap
        need = sum(to_bytes(g.mem) - to_bytes(MIN) for g in GUESTS) + SWAP_MARGIN_BYTES
        _, free = swap.totals()
        if free >= need:
            log(f"host swap: {free // MiB} MiB free, enough")
            return
        size = (need - free) // MiB * MiB + 64 * MiB
        path = self.work / "swapfile"
        done = self.hv_cli("swap", "create", str(size), "--path", str(path))
        if done.returncode != 0:
            raise RuntimeError(f"hv swap create: {done.stderr.strip()}")
        self.swap_path = path
        log(f"host swap: created {size // MiB} MiB at {path}")

    def remove_swap(self) -> bool:
        if self.swap_path is None:
            return True
        done = self.hv_cli("swap", "remove", "--path", str(self.swap_path), timeout_s=600)
        if done.returncode != 0:
            log(f"hv swap remove failed: {done.stderr.strip()}")
            return False
        self.swap_path = None
        return True

    # -- guests ---------------------------------------------------------------------
    def launch(self, g: Guest) -> int:
        """Launch through the tests' guest factory (the soak stops its guests itself)."""
        from tests.conftest import Guests
        params: dict[str, Any] = dict(g.params)
        pid = int(Guests(self.run_dir).launch(g.name, g.mem, g.workload, **params)["pid"])
        self.pids[g.name] = pid
        return pid

    def console(self, name: str) -> Path:
        return self.run_dir / name / "console.log"

    def console_has(self, name: str, event: str) -> bool:
        from tests.conftest import console_events
        return bool(console_events(self.console(name), event))

    def archive_console(self, name: str) -> None:
        path = self.console(name)
        if path.exists():
            text = path.read_text(errors="replace")
            self.archived[name].append(text)
            n = len(self.archived[name])
            (self.consoles_dir / f"{name}.{n}.log").write_text(text)

    def stop_guest(self, name: str) -> None:
        from hv.qemu import launch
        asyncio.run(launch.stop(name))

    def launch_all(self) -> None:
        for g in GUESTS:
            self.launch(g)
        log(f"launched {len(GUESTS)} guests: {self.pids}")
        if not wait_until(lambda: all(self.console_has(g.name, g.ready) for g in GUESTS), BOOT_TIMEOUT_S, 0.5):
            slow = [g.name for g in GUESTS if not self.console_has(g.name, g.ready)]
            raise RuntimeError(f"guests not ready after {BOOT_TIMEOUT_S:.0f} s: {slow}")
        log("every guest's workload is in place")

    # -- hv -------------------------------------------------------------------------
    def write_config(self) -> None:
        lines = ["[host]", f"poll_interval_s = {POLL_INTERVAL_S:g}",
                 f"sample_period_s = {SAMPLE_PERIOD_S}", "sample_pages = 200"]
        for g in GUESTS:
            lines += ["", f"[vm.{g.name}]", f'min = "{MIN}"',
                      f'max = "{self.max_override.get(g.name, g.mem)}"',
                      f"shares = {self.shares[g.name]}"]
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config_path)

    def start_hv(self) -> None:
        self.write_config()
        self.hv_stderr = open(self.work / "hv.stderr", "wb")
        module, env = "hv.cli", {**os.environ, **self.hv_env}
        if self.trace_malloc:
            module, env["HV_SOAK_TRACE"] = "tests.soak.hv_traced", str(self.work / "malloc")
        self.hv = subprocess.Popen(
            [sys.executable, "-m", module, "run", "--config", str(self.config_path),
             "--log", str(self.log_path)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.hv_stderr, env=env)
        status = self.state_dir / "daemon" / "status.json"
        if not wait_until(lambda: status.exists() or self.hv.poll() is not None, 60):
            raise RuntimeError("hv run published no status in 60 s")
        if self.hv.poll() is not None:
            raise RuntimeError(f"hv run exited with {self.hv.returncode}: "
                               f"{(self.work / 'hv.stderr').read_text().strip()}")
        log(f"hv run started (pid {self.hv.pid})")

    def malloc_snapshot(self) -> None:
        """With --trace-malloc: ask hv for a tracemalloc snapshot and wait for the file."""
        if not self.trace_malloc or not self.hv_alive():
            return
        assert self.hv is not None
        n = len(glob.glob(str(self.work / "malloc.*"))) + 1
        self.hv.send_signal(signal.SIGUSR2)
        wait_until(lambda: (self.work / f"malloc.{n}").exists(), 60, 0.5)
        time.sleep(2)  # the dump is written in one go; let it finish

    def hv_alive(self) -> bool:
        return self.hv is not None and self.hv.poll() is None

    # -- observers ------------------------------------------------------------------
    def poller(self) -> None:
        """Tick times (from the published status) and the host's stall, at 10 Hz."""
        assert self.hv is not None
        status = self.state_dir / "daemon" / "status.json"
        pid = self.hv.pid
        last_t: float | None = None
        last_loop = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            self.poller_worst_gap_s = max(self.poller_worst_gap_s, now - last_loop)
            last_loop = now
            try:
                t = float(json.loads(status.read_text())["time"])
                if t != last_t:
                    self.tick_times.append(t)
                    last_t = t
            except (OSError, ValueError, KeyError, TypeError):
                pass
            try:
                self.stalls.append(StallSample(time.time(), mem_full_us(),
                                               read_int(f"/proc/{pid}/task/{pid}/schedstat", 1)))
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    def sampler(self) -> None:
        """hv's RSS, fds, CPU and event-log size."""
        assert self.hv is not None
        pid = self.hv.pid
        while not self.stop.wait(self.timing.resource_every_s):
            try:
                mem = memory_of(pid)
                self.resources.append(ResourceSample(
                    time.time(), mem["RssAnon"] + mem["VmSwap"], len(os.listdir(f"/proc/{pid}/fd")),
                    proc_stat_cpu_s(pid), self.log_bytes(), mem["RssFile"] + mem["RssShmem"]))
            except OSError:
                pass

    def log_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.log_files())

    def log_files(self) -> list[str]:
        return sorted({str(self.log_path), *glob.glob(f"{self.log_path}.*"),
                       *glob.glob(f"{self.log_path.with_suffix('')}.*.jsonl*")}
                      - {str(self.log_path.with_suffix(".tmp"))}
                      if self.log_path.exists() else set())

    def watch_guests(self) -> None:
        """A guest that dies when the soak did not kill it is lost."""
        from hv.host import proc
        while not self.stop.wait(1.0):
            for name, pid in list(self.pids.items()):
                if name in self.restarting or pid in self.killed_by_us:
                    continue
                if not proc.alive(pid):
                    self.lost.append({"vm": name, "at": time.time(),
                                      "why": f"QEMU (pid {pid}) died, not killed by the soak"})
                    self.killed_by_us.add(pid)  # report it once

    # -- chaos ----------------------------------------------------------------------
    def pressure(self, deadline: float) -> None:
        levels = [lv for lv, w in LEVELS_PCT for _ in range(w)]
        tour = list(TOUR_PCT)
        while not self.stop.is_set() and time.monotonic() < deadline:
            level = tour.pop(0) if tour else self.rng.choice(levels)
            length = self.rng.uniform(*self.timing.phase_s)
            if level < 1.0:
                length = min(length, self.timing.low_phase_max_s)
            chase = self.rng.random() < 0.5 or len(tour) > 0
            if not tour and self.t_warm is None and len(self.phases) >= len(TOUR_PCT):
                self.t_warm = time.time()
                self.malloc_snapshot()
            phase = {"at": time.time(), "level_pct": level, "s": round(length, 1), "chase": chase}
            got = self.locker.set_level(level)
            phase["locked_mib"] = got.locked_bytes // MiB
            self.phases.append(phase)
            log(f"pressure: {level} % for {length:.0f} s ({'chasing' if chase else 'holding'}); {got}")
            end = min(time.monotonic() + length, deadline)
            while not self.stop.is_set() and time.monotonic() < end:
                self.stop.wait(2.0)
                if chase:
                    self.locker.set_level(level)

    def kill_one(self) -> None:
        from hv.host import proc
        candidates = [n for n in self.pids if n not in self.restarting]
        name = self.rng.choice(candidates)
        g = next(x for x in GUESTS if x.name == name)
        pid = self.pids[name]
        self.restarting.add(name)
        try:
            self.archive_console(name)
            self.killed_by_us.add(pid)
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not proc.alive(pid), 10)
            log(f"killed {name} (pid {pid})")
            gone = wait_until(lambda: self.tail.find("vm_gone", t_kill - 1, vm=name), EVENT_TIMEOUT_S)
            self.stop_guest(name)  # clears the dead QEMU's socket and pid file
            self.launch(g)
            t_relaunched = time.time()
            back = wait_until(lambda: self.tail.find("vm_reattached", t_kill, vm=name), REATTACH_TIMEOUT_S)
            kill = Kill(name, t_kill, gone["ts"] if gone else None, t_relaunched,
                        back["ts"] if back else None)
            self.kills.append(kill)
            if back is None:
                self.lost.append({"vm": name, "at": t_kill,
                                  "why": f"not managed again {REATTACH_TIMEOUT_S:.0f} s after its relaunch"
                                         + ("" if gone else "; hv never logged it gone")})
            log(f"{name}: relaunched (pid {self.pids[name]}), "
                + (f"managed again {back['ts'] - t_kill:.1f} s after the kill" if back else "NOT managed again"))
        finally:
            self.restarting.discard(name)

    def reload_once(self) -> None:
        assert self.hv is not None
        name = self.rng.choice([g.name for g in GUESTS])
        self.shares[name] = self.rng.choice([250, 500, 1000, 2000, 4000])
        other = self.rng.choice([g.name for g in GUESTS])
        g = next(x for x in GUESTS if x.name == other)
        if other in self.max_override:
            del self.max_override[other]
        else:
            self.max_override[other] = f"{reduced_max_mib(g)}M"
        self.write_config()
        t = time.time()
        self.hv.send_signal(signal.SIGHUP)
        got = wait_until(lambda: self.tail.find("reload", t) or self.tail.find("reload_refused", t),
                         EVENT_TIMEOUT_S)
        entry = {"at": t, "changed": {"shares": {name: self.shares[name]},
                                      "max": {other: self.max_override.get(other, g.mem)}},
                 "outcome": got["event"] if got else "no answer",
                 "error": got.get("error") if got else None,
                 "took_s": round(got["ts"] - t, 2) if got else None}
        self.reloads.append(entry)
        log(f"SIGHUP: {entry['outcome']} {entry['changed']}")

    def chaos(self, deadline: float) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*self.timing.kill_every_s)
        next_reload = time.monotonic() + self.rng.uniform(*self.timing.reload_every_s)
        while not self.stop.wait(0.5) and time.monotonic() < deadline - 20:
            if not self.hv_alive():
                return
            now = time.monotonic()
            if now >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() + self.rng.uniform(*self.timing.kill_every_s)
            elif now >= next_reload:
                self.reload_once()
                next_reload = time.monotonic() + self.rng.uniform(*self.timing.reload_every_s)

    # -- the run --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tests.functional.pressure import MemoryLocker
        try:
            self.setup_env()
            self.ensure_swap()
            self.launch_all()
            self.start_hv()
            self.locker = MemoryLocker().start()
            self.t_start = time.time()
            deadline = time.monotonic() + self.minutes * 60
            threads = [threading.Thread(target=f, daemon=True) for f in
                       (self.poller, self.sampler, self.watch_guests)]
            chaos = threading.Thread(target=self.chaos, args=(deadline,), daemon=True)
            for t in (*threads, chaos):
                t.start()
            self.pressure(deadline)  # the main thread drives the pressure until the end
            while not self.stop.is_set() and time.monotonic() < deadline:
                self.stop.wait(1.0)
            chaos.join(REATTACH_TIMEOUT_S + 2 * EVENT_TIMEOUT_S)
            self.t_end = time.time()
            self.malloc_snapshot()
            self.stop.set()
            for t in threads:
                t.join(10)
            self.tail.poll()
        finally:
            self.stop.set()
            self.finish()
        return self.write_report()

    def finish(self) -> None:
        """Everything the soak started is stopped and undone, whatever happened."""
        from hv.host import proc
        from tests.functional.hvrun import ksm_snapshot, qmp_status
        if self.locker is not None:
            try:
                self.locker.close()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                log(f"locker close: {exc}")
        if self.hv is not None:
            if self.hv.poll() is None:
                self.hv.send_signal(signal.SIGTERM)
            try:
                self.exit_status = self.hv.wait(60)
            except subprocess.TimeoutExpired:
                self.hv.kill()
                self.exit_status = self.hv.wait(10)
                log("hv run did not stop in 60 s after SIGTERM: killed")
            self.hv_stderr.close()
        for name, pid in self.pids.items():
            if proc.alive(pid):
                try:
                    if qmp_status(str(self.run_dir / name / "qmp.sock")) != "running":
                        self.still_paused.append(name)
                except Exception as exc:  # noqa: BLE001 - reported, cleanup goes on
                    self.still_paused.append(f"{name} (no answer: {exc})")
            self.archive_console(name)
        stopped_all = True
        for name, pid in self.pids.items():
            try:
                self.stop_guest(name)
            except Exception as exc:  # noqa: BLE001
                log(f"stop {name}: {exc}")
            if proc.alive(pid):
                os.kill(pid, signal.SIGKILL)
                stopped_all = stopped_all and bool(wait_until(lambda: not proc.alive(pid), 10))
        swap_removed = self.remove_swap()
        ksm_restored = not self.ksm_before or ksm_snapshot() == self.ksm_before
        self.cleanup_report = {"guests_stopped": stopped_all, "swap_removed": swap_removed,
                               "ksm_restored": ksm_restored,
                               "ok": stopped_all and swap_removed and ksm_restored}

    # -- report ---------------------------------------------------------------------
    def write_report(self) -> dict[str, Any]:
        events = self.tail.poll()
        run = [e for e in events if self.t_start <= e.get("ts", 0) <= self.t_end + 60]
        resources = analysis.growth(self.resources, self.t_warm)
        log_files = [{"path": os.path.basename(p), "bytes": os.path.getsize(p)}
                     for p in self.log_files() if os.path.exists(p)]
        report: dict[str, Any] = {
            "minutes": self.minutes, "seed": self.seed, "hv_env": self.hv_env,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t_start)),
            "poll_interval_s": POLL_INTERVAL_S, "sample_period_s": SAMPLE_PERIOD_S,
            "guests": {
                "plan": [asdict(g) for g in GUESTS],
                "lost": self.lost,
                "console_problems": analysis.console_problems(self.archived),
                "still_paused_after_stop": self.still_paused,
            },
            "ticks": analysis.late_ticks(self.tick_times, POLL_INTERVAL_S, self.stalls),
            "host_stall": {"driver_poller_worst_gap_s": round(self.poller_worst_gap_s, 3)},
            "states_s": analysis.state_time(events, self.t_start, self.t_end),
            "actions": analysis.action_counts(run),
            "failures": analysis.failures(run, self.kills),
            "pauses": analysis.pauses(run, self.still_paused),
            "kills": [asdict(k) for k in self.kills],
            "reloads": self.reloads,
            "pressure_phases": self.phases,
            "hv": {"exit_status": self.exit_status, "resources": resources,
                   "samples": [asdict(s) for s in self.resources]},
            "event_log": {"files": log_files, "bytes": sum(f["bytes"] for f in log_files),
                          "rotated": len(log_files) > 1,
                          "rotation_events": sum(1 for e in events if "rotat" in str(e.get("event")))},
            "cleanup": self.cleanup_report,
        }
        snaps = sorted(glob.glob(str(self.work / "malloc.*")))
        if len(snaps) >= 2:
            from tests.soak.hv_traced import compare
            report["malloc_growth_after_warm_up"] = compare(snaps[0], snaps[-1])
        report["promises"] = analysis.promises(report)
        report["ok"] = all(p["ok"] for p in report["promises"].values())
        self.report_prefix.parent.mkdir(parents=True, exist_ok=True)
        self.report_prefix.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        self.report_prefix.with_suffix(".md").write_text(markdown(report))
        log(f"report: {self.report_prefix}.md / .json; promises "
            + ", ".join(f"{k}={'ok' if v['ok'] else 'FAILED'}" for k, v in report["promises"].items()))
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return report


def markdown(r: dict[str, Any]) -> str:
    t, res, fl = r["ticks"], r["hv"]["resources"], r["failures"]
    samples = r["hv"]["samples"]
    lines = [
        f"# Soak: {r['minutes']:g} minutes of `hv run` on 8 guests under changing real pressure",
        "",
        f"Started {r['started']}, seed {r['seed']}; reproduce with "
        f"`flock /tmp/hv-tests.lock scripts/soak.sh --minutes {r['minutes']:g} --seed {r['seed']}`.",
        f"Poll interval {r['poll_interval_s']:g} s, sampling period {r['sample_period_s']} s, "
        "hv's default thresholds (high 6, soft 4, hard 2, low 1 % of the host).",
        "",
        "## Promises",
        "",
        "| promise | kept | detail |",
        "|---|---|---|",
    ]
    for name, p in r["promises"].items():
        detail = json.dumps(p["detail"]) if not isinstance(p["detail"], str) else p["detail"]
        lines.append(f"| {name} | {'yes' if p['ok'] else '**NO**'} | {detail[:300]} |")
    lines += [
        "",
        "## Ticks",
        "",
        f"- ticks observed: {t['ticks']}; interval median {t['interval_median_s']} s, max {t['interval_max_s']} s",
        f"- late (interval over 2x the poll interval): {t['late']} ({t['late_excused']} while the host "
        f"itself stalled hv at least as long as the tick was late, {t['late_unexcused']} not)",
        f"- worst delay (interval minus the poll interval): {t['worst_delay_s']} s; worst not explained "
        f"by a host stall: {t['worst_unexcused_delay_s']} s",
        f"- the driver's own 10 Hz poller's worst gap: {r['host_stall']['driver_poller_worst_gap_s']} s",
    ]
    for x in t["late_list"][:20]:
        lines.append(f"  - at {time.strftime('%H:%M:%S', time.gmtime(x['at']))}: interval {x['interval_s']} s, "
                     f"host memory stall {x['host_mem_full_stall_s']} s, hv run-queue wait "
                     f"{x['hv_runqueue_wait_s']} s, {'excused' if x['excused'] else 'NOT excused'}")
    lines += ["", "## States and actions", "",
              "- time per state (s): " + ", ".join(f"{k} {v}" for k, v in r["states_s"].items()),
              "- actions: " + ", ".join(f"{k} {v}" for k, v in r["actions"].items()),
              f"- pauses: {r['pauses']['pauses']}, resumes {r['pauses']['resumes']}, longest pause "
              f"{r['pauses']['longest_pause_s']} s; paused by mistake: {r['pauses']['mistakes'] or 'none'}",
              f"- failed actions/collections: {fl['total']} {fl['by_event']}; not explained by a kill: "
              f"{fl['unexplained']}"]
    for e in fl["unexplained_list"][:10]:
        lines.append(f"  - {e.get('event')} {e.get('vm', '')}: {str(e.get('error', ''))[:160]}")
    lines += ["", "## Guests", "",
              f"- killed and relaunched: {len(r['kills'])}; lost: {r['guests']['lost'] or 'none'}",
              f"- OOM-killed or workload died (consoles): {r['guests']['console_problems'] or 'none'}",
              f"- left paused after hv stopped: {r['guests']['still_paused_after_stop'] or 'none'}"]
    for k in r["kills"]:
        back = f"{k['t_reattached'] - k['t_kill']:.1f} s" if k["t_reattached"] else "never"
        gone = f"{k['t_gone'] - k['t_kill']:.1f} s" if k["t_gone"] else "never"
        lines.append(f"  - {k['vm']}: hv saw it gone after {gone}, managed again after {back}")
    lines += [f"- SIGHUP reloads: {len(r['reloads'])}, "
              + ", ".join(f"{x['outcome']} in {x['took_s']} s" for x in r["reloads"])]
    lines += ["", "## hv's resources", ""]
    if res.get("judged"):
        lines += [
            f"- RSS (anonymous, resident + swapped): {res['rss_start_mib']} MiB after the warm-up "
            f"({res['warm_up_s']} s: a tour of every state), {res['rss_end_mib']} MiB at the end, max "
            f"{res['rss_max_mib']} MiB; growth (median of the last third minus the first third, "
            f"after the warm-up) {res['rss_growth_mib']} MiB",
            f"- file-backed RSS (mapped files, shared memory; not a heap leak, shown apart): "
            f"{res['file_rss_start_mib']} MiB after the warm-up, {res['file_rss_end_mib']} MiB at the end",
            "- over time (min: anonymous RSS + swap MiB / file RSS MiB / fds): " + ", ".join(
                f"{(s['t'] - samples[0]['t']) / 60:.1f}: {s['rss_bytes'] / MiB:.0f}/"
                f"{s['file_rss_bytes'] / MiB:.0f}/{s['fds']}"
                for s in samples[:: max(1, len(samples) // 12)]),
            f"- open fds: {res['fds_min']}-{res['fds_max']}, {res['fds_end']} at the end; growth "
            f"{res['fd_growth']}",
            f"- CPU: {res['cpu_pct_of_core']} % of a core (by third: {res['cpu_pct_by_third']})",
        ]
    else:
        lines.append(f"- not judged: {res.get('why')}")
    el = r["event_log"]
    lines += [f"- event log: {el['bytes'] / MiB:.1f} MiB in {len(el['files'])} file(s) "
              f"({res.get('log_mib_per_hour', '?')} MiB/hour); rotation: "
              + ("yes" if el["rotated"] or el["rotation_events"] else "none (one file, growing)")]
    if r.get("malloc_growth_after_warm_up"):
        m = r["malloc_growth_after_warm_up"]
        lines += ["", "## What grew after the warm-up (tracemalloc, --trace-malloc)", "",
                  f"Live memory Python traced (objects and numpy arrays): {m['traced_mib_first']} MiB "
                  f"after the warm-up, {m['traced_mib_last']} MiB at the end.", ""]
        lines += [f"- +{g['growth_kib']:.0f} KiB ({g['blocks_growth']:+d} blocks, {g['now_kib']:.0f} KiB "
                  f"live): {' <- '.join(g['where'])}" for g in m["sites"]]
    lines += ["", "## Pressure phases", "",
              ", ".join(f"{p['level_pct']} % {p['s']:.0f} s{' (chase)' if p['chase'] else ''}"
                        for p in r["pressure_phases"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--report", type=Path, default=None,
                    help="report path without suffix (default: soak-<N>min in the current directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (event log, consoles)")
    ap.add_argument("--trace-malloc", action="store_true",
                    help="run hv under tracemalloc and report what grew after the warm-up "
                         "(a diagnostic: it slows hv, so its ticks and CPU are not hv's)")
    ap.add_argument("--hv-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for `hv run` only (experiments, e.g. MALLOC_ARENA_MAX=2)")
    args = ap.parse_args(argv)
    if not args.minutes > 0:
        ap.error("--minutes must be > 0")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    report = args.report or Path(f"soak-{args.minutes:g}min")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    hv_env = dict(kv.split("=", 1) for kv in args.hv_env if "=" in kv)
    soak = Soak(args.minutes, seed, report, args.keep, hv_env, args.trace_malloc)
    log(f"seed {seed}, work directory {soak.work}")
    try:
        result = soak.run()
    except (RuntimeError, OSError) as exc:
        log(f"error: {exc}")
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
