"""``hv run``: the ESX allocation loop for every configured VM, in one asyncio loop.

Each tick (``host.poll_interval_s``):

1. **collect** — host free memory (``/proc/meminfo``) and, per VM, the balloon's
   actual size, the guest's statistics, the host memory of its RAM (resident and
   swapped, from smaps) and its run state.  A VM whose collection fails is left out
   of this tick (logged once, and once more when it recovers); a VM that exited is
   dropped.  Failing to read the host itself is fatal.
2. **decide** — the free-memory state (:class:`~hv.policy.StateTracker`; a forced
   state, for tests and drills, can only make it worse), and every VM's target by
   min-funding revocation with the idle memory tax
   (:func:`~hv.policy.compute_targets`) over the managed memory minus the VMs'
   overheads.
3. **act** — by state (:func:`~hv.policy.actions_for`): deflate balloons of VMs
   below target in any state (giving memory back is not reclamation); in soft and
   worse also inflate balloons of VMs above target; in hard and worse raise KSM's
   scan rate first (share before swap) and then page out random pages of VMs whose
   resident memory is above target; in low also pause those VMs, resuming them once
   they are at target or the state is hard or better.

Beside the ticks, one sampler task per VM measures its working set
(:mod:`hv.sampler`) every ``host.sample_period_s`` and feeds its
:class:`~hv.policy.WorkingSetEstimator`, persisted per VM in the state directory
(``vms/NAME/estimator.json``) so a restarted hv resumes what it knew.

Free memory of the managed pool: ``min(MemAvailable, managed - sum over VMs of
(resident + overhead))``; with the default ``managed`` (the whole host) the first
term rules, with a smaller pool the second does.

Stopping (SIGTERM, SIGINT, or a fatal error): every VM hv paused is resumed, KSM's
tunables are restored, estimators are saved, and balloons are **left where they
are**: restoring every VM to its max at once could overcommit the host the moment
hv stops watching, and a restarted hv starts from the current sizes anyway.
If hv is killed outright, the guardian process (:mod:`hv.guardian`) it spawned
does the resuming and the KSM restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from hv import paths
from hv.errors import ConfigError, HostError, HvError, UsageError, VMGone
from hv.eventlog import EventLog
from hv.guardian import GuardFile
from hv.host import native, proc, swap
from hv.host.ksm import Ksm
from hv.policy import (
    AdmissionControl,
    Config,
    MemState,
    StateTracker,
    VMConfig,
    VMDemand,
    WorkingSetEstimator,
    actions_for,
    compute_targets,
    load_config,
    overhead_bytes,
    share_before_swap,
    should_pause,
)
from hv.qemu import launch
from hv.qemu.vm import VM, GuestStats, VMState, balloon_floor, guest_need_bytes
from hv.sharing.governor import Governor
from hv.sharing.index import SharingIndex
from hv.sharing.scan import Scanner, Target
from hv.sampler import SampleResult, Sampler, SamplerUnavailable, check_can_sample, sampleable_addresses
from hv.units import MiB, PAGE_SIZE, format_size

__all__ = ["Options", "Daemon", "parse_state", "host_free_bytes", "policy_active_fraction",
           "balloon_goal", "hidden_estimate", "swap_pages_for"]

# A balloon target within 4 MiB of the actual size is reached: the guest driver works
# in 1 MiB steps and never lands exactly.
BALLOON_TOLERANCE_BYTES = 4 * MiB

# Resident memory within 4 MiB of target counts as "at target": guest RAM resident
# moves by a few hundred KiB between ticks from QEMU's own device accesses.
SWAP_SLACK_BYTES = 4 * MiB

# At most 64 MiB paged out per VM per tick: page-out writes to swap at disk speed
# (hundreds of MiB/s), so a 1 s tick stays a 1 s tick.
SWAP_MAX_PAGES_PER_TICK = 64 * MiB // PAGE_SIZE


# One QMP round trip to a live QEMU takes milliseconds; one that takes 10 s is a
# VM in trouble, whose tick is skipped rather than the whole loop stalled.
COLLECT_TIMEOUT_S = 10.0

# Connecting at start: a VM that does not answer in 5 s is refused.
ATTACH_TIMEOUT_S = 5.0


def parse_state(text: str) -> MemState:
    """``"high" | "soft" | "hard" | "low"`` to a :class:`MemState` (UsageError otherwise)."""
    try:
        return MemState[text.strip().upper()]
    except KeyError:
        raise UsageError(f"unknown state {text.strip()!r}: use high, soft, hard or low") from None


def host_free_bytes(mem_available: int, managed_bytes: int, vm_used_bytes: int) -> int:
    """Free memory of the managed pool (see module doc)."""
    return max(0, min(mem_available, managed_bytes - vm_used_bytes))


def policy_active_fraction(estimate: float, measured_pages: int, allocated_bytes: int) -> float:
    """The active fraction of a VM's *allocation*, from the sampler's fraction.

    The sampler measures a fraction of the sampleable pages (present, not zero-page,
    not KSM); the policy charges the whole allocation (the balloon's actual size), of
    which the rest (never touched, zero or shared) is idle.  An unmeasured VM
    (``measured_pages == 0``) keeps the estimate as is (1.0: all active).
    """
    if measured_pages <= 0 or allocated_bytes <= 0:
        return min(1.0, max(0.0, estimate))
    return min(1.0, max(0.0, estimate * measured_pages * PAGE_SIZE / allocated_bytes))


def balloon_goal(target_bytes: int, ram_bytes: int, stats: GuestStats, hidden_bytes: int) -> int:
    """The balloon size hv asks for: the target, but never below what the guest needs.

    The floor is :func:`~hv.qemu.vm.balloon_floor` and the guest's own use plus
    kernel-reserved memory (``hidden_bytes``, see :func:`hidden_estimate`) plus
    headroom (the rule of ``hv balloon``), so an inflating balloon never makes the
    guest's OOM killer pick its workload.
    """
    goal = max(target_bytes, balloon_floor(ram_bytes))
    need = guest_need_bytes(stats, hidden_bytes)
    if need is not None:
        goal = max(goal, need)
    return min(goal, ram_bytes)


def hidden_estimate(previous_bytes: int | None, actual_bytes: int,
                    last_actual_bytes: int | None, stats: GuestStats) -> int | None:
    """Memory the guest kernel reserved at boot (outside MemTotal), as best known.

    It is ``actual - MemTotal`` (without deflate-on-oom, ballooned pages leave
    MemTotal), but the guest's figures are up to one statistics interval old: read
    while the balloon inflates, a stale MemTotal makes the difference too small,
    which would let hv inflate past what the guest needs (measured here: a toucher
    OOM-killed).  So only readings taken while the balloon stood still count, and
    the largest one is kept (the reserve does not shrink).  ``None`` until known;
    hv inflates no balloon before then.
    """
    if stats.total_bytes is None or last_actual_bytes != actual_bytes:
        return previous_bytes
    return max(previous_bytes or 0, actual_bytes - stats.total_bytes)


def swap_pages_for(resident_bytes: int, target_bytes: int) -> int:
    """Pages to page out this tick for a VM whose resident memory is above target."""
    over = resident_bytes - target_bytes
    if over <= SWAP_SLACK_BYTES:
        return 0
    return min(SWAP_MAX_PAGES_PER_TICK, over // PAGE_SIZE)


@dataclass
class Options:
    """How ``hv run`` was asked to run."""

    config_path: Path
    log_path: Path | None = None
    once: bool = False
    force_state: MemState | None = None
    force_state_file: Path | None = None
    guardian: bool = True


@dataclass
class Reading:
    """One tick's collection for one VM."""

    balloon_bytes: int
    resident_bytes: int
    swap_bytes: int
    run_state: str
    guest: GuestStats


@dataclass
class ManagedVM:
    """One VM under management and what hv knows about it."""

    cfg: VMConfig
    vm: VM
    max_bytes: int
    estimator: WorkingSetEstimator
    estimator_file: Path
    pid: int
    measured_pages: int = 0  # sampleable pages at the last valid sample
    hidden_bytes: int | None = None  # guest kernel's boot reserve, see hidden_estimate()
    last_actual: int | None = None  # balloon actual at the previous collection
    reading: Reading | None = None
    failing: str | None = None
    target_bytes: int | None = None
    balloon_asked: int | None = None
    paused_by_hv: bool = False
    sampler_task: asyncio.Task[None] | None = None
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @property
    def name(self) -> str:
        return self.cfg.name


def status_file() -> Path:
    """The daemon's last tick, as JSON (see :meth:`Daemon._write_status`)."""
    return paths.state_dir() / "daemon" / "status.json"


def running_status() -> dict[str, Any] | None:
    """The snapshot of a running ``hv run``, or None if no daemon is running."""
    try:
        snapshot: dict[str, Any] = json.loads(status_file().read_text())
        alive = proc.alive(int(snapshot["pid"])) and isinstance(snapshot["vms"], dict)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none written yet, torn, or not ours
    return snapshot if alive else None


class Daemon:
    """The allocation loop.  ``await Daemon(options).run()``; raises HvError on fatal errors."""

    def __init__(self, options: Options, notify: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.notify = notify or (lambda line: None)
        self.dir = paths.state_dir() / "daemon"
        self.vms: list[ManagedVM] = []
        self.stop_event = asyncio.Event()
        self.log: EventLog | None = None
        self.guard = GuardFile(self.dir / "guard.json", hv_pid=os.getpid())
        self.ksm: Ksm | None = None
        self.ksm_error: str | None = None
        # Content-based sharing: hv's scan and the KSM governor own KSM while hv runs.
        self.governor: Governor | None = None
        self.scanner: Scanner | None = None
        self.index: SharingIndex | None = None
        self.share_now = asyncio.Event()
        self.share_task: asyncio.Task[None] | None = None
        self.swap_deferred_since: float | None = None
        self._bad_force_text = ""
        self.sampling = False
        self.config: Config | None = None
        self.tracker: StateTracker | None = None
        self.state = MemState.HIGH
        self._lock: IO[str] | None = None
        self._guardian: subprocess.Popen[bytes] | None = None
        self._guard_owned = False
        self.ticks = 0

    # -- start -------------------------------------------------------------------
    async def start(self) -> None:
        """Validate, attach, admit; everything that may refuse happens here."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        total = proc.meminfo()["MemTotal"]
        config = load_config(self.options.config_path, total)
        if not config.vms:
            raise ConfigError(f"{config.source}: no [vm.NAME] tables: nothing to manage")
        self.config = config
        self._undo_previous_run()
        self.log = EventLog(self.options.log_path or (self.dir / "events.jsonl"))
        try:
            for cfg in config.vms:
                self.vms.append(await self._attach(config, cfg))
            self._admit(config)
        except BaseException:
            await self._detach_all()
            raise
        self.tracker = StateTracker(config.host.managed_bytes, config.host.thresholds,
                                    config.host.hysteresis_pct)
        try:
            check_can_sample()
            self.sampling = True
        except SamplerUnavailable as exc:
            self.notify(f"warning: {exc}; every VM counts as fully active")
            self.log.write("sampler_unavailable", reason=str(exc))
        self.guard.save()
        self._guard_owned = True
        if self.options.guardian:
            self._spawn_guardian()
        self.log.write("start", pid=os.getpid(), config=config.source,
                       managed_bytes=config.host.managed_bytes, vms=[v.name for v in self.vms],
                       sampling=self.sampling, sample_pages=config.host.sample_pages,
                       sample_period_s=config.host.sample_period_s,
                       forced_state=str(self.options.force_state) if self.options.force_state else None)

    def _take_lock(self) -> None:
        lock = open(self.dir / "lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise HostError(f"another hv run holds {self.dir / 'lock'}") from None
        self._lock = lock

    def _undo_previous_run(self) -> None:
        """Resume VMs and restore KSM after a previous hv whose guardian did not."""
        if self.guard.path.exists():
            from hv.guardian import undo
            for line in undo(self.guard.path):
                self.notify(f"previous run: {line}")

    async def _attach(self, config: Config, cfg: VMConfig) -> ManagedVM:
        where = f"{config.source}: vm.{cfg.name}.socket"
        sock = cfg.socket
        if sock is None:
            try:
                _, sock = launch.socket_of(cfg.name)
            except HvError as exc:
                raise ConfigError(f"{config.source}: vm.{cfg.name}: no socket given and "
                                  f"no VM of that name in hv's run directory") from exc
        if not os.path.exists(sock):
            raise ConfigError(f"{where}: {sock} does not exist")
        vm = VM(cfg.name, sock)
        try:
            await asyncio.wait_for(vm.attach(), ATTACH_TIMEOUT_S)
        except asyncio.TimeoutError:
            await vm.detach()
            raise ConfigError(f"{where}: {sock} does not answer (no QMP greeting in "
                              f"{ATTACH_TIMEOUT_S:.0f} s)") from None
        except HvError as exc:
            raise ConfigError(f"{where}: {sock} does not answer: {exc}") from exc
        try:
            info = vm.info
            max_bytes = cfg.max_bytes if cfg.max_bytes is not None else info.ram_bytes
            if max_bytes > info.ram_bytes:
                raise ConfigError(f"{config.source}: vm.{cfg.name}.max: {format_size(max_bytes)} "
                                  f"is more than the VM's memory {format_size(info.ram_bytes)}")
            if info.balloon_path is None:
                raise ConfigError(f"{where}: the VM has no virtio-balloon device")
            await vm.enable_stats()
        except BaseException:
            await vm.detach()
            raise
        est_file = paths.state_dir() / "vms" / cfg.name / "estimator.json"
        estimator = WorkingSetEstimator()
        measured = 0
        if est_file.exists():
            try:
                data = json.loads(est_file.read_text())
                if data.get("pid") not in (None, info.pid):
                    # Another QEMU under the same name: what hv knew was about a VM
                    # that no longer exists.
                    self.notify(f"{cfg.name}: saved working-set estimate is of an earlier "
                                f"QEMU (pid {data.get('pid')}, now {info.pid}); starting afresh")
                else:
                    estimator = WorkingSetEstimator.from_dict(data["estimator"])
                    measured = int(data.get("measured_pages", 0))
            except (ValueError, KeyError, TypeError, HvError) as exc:
                self.notify(f"{cfg.name}: ignoring unusable {est_file}: {exc}")
        return ManagedVM(cfg, vm, max_bytes, estimator, est_file, info.pid, measured_pages=measured)

    def _admit(self, config: Config) -> None:
        # Swap hv's VMs may use: what is free plus what they already hold.
        _, swap_free = swap.totals()
        held = 0
        for m in self.vms:
            with contextlib.suppress(HvError):
                held += m.vm.host_usage().swap_bytes
        control = AdmissionControl(config.host.managed_bytes, swap_free + held)
        for m in self.vms:
            control.admit(m.name, m.cfg.min_bytes, m.max_bytes)

    def _spawn_guardian(self) -> None:
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "hv.guardian", str(os.getpid()), str(self.guard.path)],
            stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent))

    # -- run ---------------------------------------------------------------------
    async def run(self) -> None:
        """Start, loop until stopped, and always clean up."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        try:
            await self.start()
            assert self.config is not None and self.log is not None
            for m in self.vms:
                if self.log is not None and m.estimator.periods:
                    self.log.write("estimator_loaded", vm=m.name, **m.estimator.to_dict(),
                                   measured_pages=m.measured_pages)
            if self.sampling and not self.options.once:
                for m in self.vms:
                    m.sampler_task = asyncio.create_task(self._sample_loop(m))
            if self.config.host.share_interval_s > 0 and not self.options.once:
                await self._start_sharing()
            while True:
                await self.tick()
                if self.options.once or not self.vms:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(),
                                           self.config.host.poll_interval_s)
                if self.stop_event.is_set():
                    break
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def _forced(self) -> MemState | None:
        path = self.options.force_state_file
        if path is not None:
            try:
                text = path.read_text().strip()
            except OSError:
                text = ""
            if text:
                try:
                    return parse_state(text)
                except UsageError as exc:  # a typo in the file must not stop the daemon
                    if self.log is not None and text != self._bad_force_text:
                        self.log.write("force_state_ignored", error=str(exc))
                        self.notify(f"warning: {exc}; ignored")
                    self._bad_force_text = text
        return self.options.force_state

    async def tick(self) -> None:
        """One collect-decide-act cycle over every VM."""
        assert self.config is not None and self.tracker is not None and self.log is not None
        host = self.config.host
        results = await asyncio.gather(*(self._collect(m) for m in self.vms))
        for m, ok in zip(list(self.vms), results):
            if ok is None:  # gone
                await self._drop(m)
        live = [m for m in self.vms if m.reading is not None and m.failing is None]
        try:
            mem_available = proc.meminfo()["MemAvailable"]
        except (OSError, KeyError, ValueError) as exc:
            raise HostError(f"cannot read host free memory from /proc/meminfo: {exc}") from exc
        used = sum((m.reading.resident_bytes if m.reading else m.max_bytes)
                   + overhead_bytes(m.max_bytes) for m in self.vms)
        free = host_free_bytes(mem_available, host.managed_bytes, used)
        real = self.tracker.update(free)
        forced = self._forced()
        state = max(real, forced) if forced is not None else real
        if state != self.state:
            self.log.write("state", state=str(state), previous=str(self.state),
                           real_state=str(real), free_bytes=free)
            self.state = state

        # Targets: available = managed minus every VM's overhead, minus what the VMs
        # left out this tick hold.
        available = host.managed_bytes - sum(overhead_bytes(m.max_bytes) for m in self.vms)
        for m in self.vms:
            if m not in live:
                available -= m.reading.balloon_bytes if m.reading else m.max_bytes
        demands = []
        for m in live:
            assert m.reading is not None
            f = policy_active_fraction(m.estimator.active_fraction, m.measured_pages,
                                       m.reading.balloon_bytes)
            demands.append(VMDemand(m.name, m.cfg.shares, m.cfg.min_bytes, m.max_bytes,
                                    min(m.reading.balloon_bytes, m.max_bytes), f))
        targets = compute_targets(demands, available, host.tax_rate)
        for m in live:
            m.target_bytes = targets[m.name]

        defer_swap = self._sharing_advice(state, free)
        for m in live:
            try:
                await self._act(m, state, defer_swap)
            except VMGone as exc:  # it died between collecting and acting: forget it
                self.log.write("vm_gone", vm=m.name, error=str(exc))
                self.notify(f"{m.name}: gone ({exc}); no longer managed")
                await self._drop(m)
        live = [m for m in live if m in self.vms]
        for m in live:
            assert m.reading is not None
            est = m.estimator
            self.log.write(
                "tick", vm=m.name, tick=self.ticks, state=str(state), real_state=str(real),
                free_bytes=free, target_bytes=m.target_bytes,
                balloon_bytes=m.reading.balloon_bytes, resident_bytes=m.reading.resident_bytes,
                swap_bytes=m.reading.swap_bytes, run_state=m.reading.run_state,
                paused_by_hv=m.paused_by_hv,
                active={"fraction": est.active_fraction, "slow": est.slow, "fast": est.fast,
                        "current": est.current, "periods": est.periods,
                        "measured_pages": m.measured_pages,
                        "of_allocation": policy_active_fraction(
                            est.active_fraction, m.measured_pages, m.reading.balloon_bytes)})
        self._write_status(state, free)
        self.ticks += 1

    def _write_status(self, state: MemState, free: int) -> None:
        """What this tick saw, for `hv status` while the daemon holds the QMP sockets."""
        vms = {}
        for m in self.vms:
            r = m.reading
            vms[m.name] = {
                "socket": m.vm.socket_path, "pid": m.pid, "max_bytes": m.max_bytes,
                "target_bytes": m.target_bytes, "paused_by_hv": m.paused_by_hv,
                "active_fraction": m.estimator.active_fraction,
                "balloon_bytes": r.balloon_bytes if r else None,
                "host_resident_bytes": r.resident_bytes if r else None,
                "host_swap_bytes": r.swap_bytes if r else None,
                "run_state": r.run_state if r else None,
                "guest": r.guest.as_dict() if r else None}
        snapshot = {"pid": os.getpid(), "time": time.time(), "state": str(state),
                    "free_bytes": free, "vms": vms}
        paths.write_json_atomic(status_file(), snapshot)

    async def _collect(self, m: ManagedVM) -> bool | None:
        """Fill ``m.reading``; False if this tick is skipped, None if the VM is gone."""
        assert self.log is not None

        async def read() -> Reading:
            vm = m.vm
            actual = await vm.balloon_actual()
            stats = await vm.guest_stats(wait_s=0)
            usage = await asyncio.to_thread(vm.host_usage)
            run_state = await vm.status()
            return Reading(actual, usage.rss_bytes, usage.swap_bytes, run_state, stats)

        try:
            reading = await asyncio.wait_for(read(), COLLECT_TIMEOUT_S)
            m.hidden_bytes = hidden_estimate(m.hidden_bytes, reading.balloon_bytes,
                                             m.last_actual, reading.guest)
            m.last_actual = reading.balloon_bytes
            m.reading = reading
        except VMGone as exc:
            self.log.write("vm_gone", vm=m.name, error=str(exc))
            self.notify(f"{m.name}: gone ({exc}); no longer managed")
            return None
        except (HvError, asyncio.TimeoutError) as exc:
            why = str(exc) or "timed out"
            if m.failing is None:  # a persistent failure is logged once
                self.log.write("collect_failed", vm=m.name, error=why)
                self.notify(f"{m.name}: cannot collect ({why}); skipping it until it answers")
            m.failing = why
            return False
        if m.failing is not None:
            self.log.write("collect_recovered", vm=m.name, error=m.failing)
            m.failing = None
        return True

    async def _drop(self, m: ManagedVM) -> None:
        if m.sampler_task is not None:
            m.sampler_task.cancel()
        if m.paused_by_hv:
            self.guard.paused.pop(m.name, None)
            self.guard.save()
        self.vms.remove(m)
        await m.vm.detach()

    async def _start_sharing(self) -> None:
        """Turn KSM on under the governor (its settings saved first, undone on stop)."""
        assert self.log is not None
        try:
            self.ksm = Ksm()
            self.guard.ksm_raised = True
            self.guard.save()  # record before changing, so the guardian undoes it
            saved = await asyncio.to_thread(self.ksm.save)
            self.governor = Governor(self.ksm)
            await asyncio.to_thread(self.governor.start)
        except HvError as exc:
            self.ksm_error = str(exc)
            self.log.write("ksm_unavailable", error=str(exc))
            self.notify(f"warning: page sharing off: {exc}")
            await self._ksm_restore()
            self.governor = None
            return
        self.log.write("ksm_raised", saved=saved, now=await asyncio.to_thread(self.ksm.tunables))
        self.scanner = Scanner([], replace_foreign=True)
        self.share_task = asyncio.create_task(self._share_loop())

    async def _share_loop(self) -> None:
        """Scan every VM, rebuild the sharing table, let the governor set KSM's rate."""
        assert self.config is not None and self.log is not None
        assert self.scanner is not None and self.governor is not None
        interval = self.config.host.share_interval_s
        failing: str | None = None
        while True:
            try:
                self.scanner.targets = [Target.from_info(m.vm.info) for m in self.vms
                                        if m.failing is None and m.vm.state is VMState.ATTACHED]
                self.index = await asyncio.to_thread(self.scanner.scan_all)
                decision = await asyncio.to_thread(self.governor.step, self.index)
                failing = None
                self.log.write(
                    "share", mode=decision.mode.value, reason=decision.reason,
                    pages_to_scan=decision.setting.pages_to_scan,
                    sleep_millisecs=decision.setting.sleep_millisecs,
                    potential_pages=self.index.potential_savings_pages,
                    realized_pages=self.index.realized_savings_pages,
                    backlog_pages=self.index.backlog_pages,
                    scan_cpu_s=round(self.scanner.scan_cpu_s, 3))
            except Exception as exc:  # noqa: BLE001 - one bad round must not end sharing
                # Typically a VM that went away mid-scan (the tick drops it); anything
                # else is logged too, and the next round tries again.
                if failing != str(exc):
                    self.log.write("share_failed", error=str(exc) or repr(exc))
                failing = str(exc)
            self.share_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.share_now.wait(), interval)

    def _sharing_advice(self, state: MemState, free: int) -> bool:
        """Share before swap: push KSM now; True if swapping should wait for it."""
        assert self.tracker is not None and self.log is not None
        if self.governor is None or self.index is None:
            return False
        now = time.monotonic()
        deferred_for = now - self.swap_deferred_since if self.swap_deferred_since else 0.0
        advice = share_before_swap(state, self.index.backlog_pages,
                                   self.tracker.shortfall_bytes(free) // PAGE_SIZE, deferred_for)
        if advice.raise_ksm_rate and not self.share_now.is_set():
            self.share_now.set()  # rescan now: the governor raises the rate from the backlog
        if advice.defer_swap:
            if self.swap_deferred_since is None:
                self.swap_deferred_since = now
                self.log.write("swap_deferred", backlog_pages=self.index.backlog_pages,
                               state=str(state))
            return True
        if self.swap_deferred_since is not None and state < MemState.HARD:
            self.swap_deferred_since = None
        return False

    async def _ksm_restore(self) -> None:
        if self.share_task is not None:
            self.share_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.share_task
            self.share_task = None
        if self.scanner is not None:
            self.scanner.close()
            self.scanner = None
        if not self.guard.ksm_raised:
            return
        try:
            ksm = self.ksm or Ksm()
            await asyncio.to_thread(ksm.restore)
            if self.log is not None:
                self.log.write("ksm_restored", now=await asyncio.to_thread(ksm.tunables))
        except HvError as exc:
            if self.log is not None:
                self.log.write("ksm_restore_failed", error=str(exc))
        self.guard.ksm_raised = False
        self.guard.save()

    async def _act(self, m: ManagedVM, state: MemState, defer_swap: bool = False) -> None:
        """Balloon, swap and pause one VM according to the state."""
        assert self.log is not None and m.reading is not None and m.target_bytes is not None
        actions = actions_for(state)
        r, target = m.reading, m.target_bytes
        try:
            goal = balloon_goal(target, m.vm.info.ram_bytes, r.guest, m.hidden_bytes or 0)
            grow = goal > r.balloon_bytes + BALLOON_TOLERANCE_BYTES
            shrink = (actions.balloon and m.hidden_bytes is not None
                      and goal < r.balloon_bytes - BALLOON_TOLERANCE_BYTES)
            if (grow or shrink) and m.balloon_asked != goal:
                await m.vm.set_balloon(goal, force=True)
                m.balloon_asked = goal
                self.log.write("balloon", vm=m.name, goal_bytes=goal, target_bytes=target,
                               actual_bytes=r.balloon_bytes, state=str(state))
            if actions.swap and not defer_swap:
                n = swap_pages_for(r.resident_bytes, target)
                if n:
                    asked, out = await asyncio.to_thread(self._page_out, m, n)
                    self.log.write("swap", vm=m.name, pages=asked, invalidated=out,
                                   resident_bytes=r.resident_bytes, target_bytes=target)
            pause = should_pause(state, r.resident_bytes, target, SWAP_SLACK_BYTES)
            if pause and not m.paused_by_hv:
                self.guard.paused[m.name] = m.vm.socket_path
                self.guard.save()  # record before pausing, so the guardian resumes it
                await m.vm.pause()
                m.paused_by_hv = True
                self.log.write("pause", vm=m.name, resident_bytes=r.resident_bytes,
                               target_bytes=target, state=str(state))
            elif not pause and m.paused_by_hv:
                await self._resume(m, why=str(state))
        except VMGone:
            raise
        except HvError as exc:
            self.log.write("act_failed", vm=m.name, error=str(exc))

    def _page_out(self, m: ManagedVM, n: int) -> tuple[int, int]:
        info = m.vm.info
        addrs, _ = sampleable_addresses(info.pid, [(r.hva, r.size) for r in info.ram])
        n = min(n, len(addrs))
        if n == 0:
            return 0, 0
        chosen = np.sort(m.rng.choice(addrs, size=n, replace=False))
        return n, native.pageout(info.pid, chosen).invalidated

    async def _resume(self, m: ManagedVM, why: str) -> None:
        assert self.log is not None
        await m.vm.resume()
        m.paused_by_hv = False
        self.guard.paused.pop(m.name, None)
        self.guard.save()
        self.log.write("resume", vm=m.name, why=why)

    # -- sampling ------------------------------------------------------------------
    async def _sample_loop(self, m: ManagedVM) -> None:
        assert self.config is not None and self.log is not None
        host = self.config.host
        info = m.vm.info
        sampler = Sampler(info.pid, [(r.hva, r.size) for r in info.ram], host.sample_pages, m.rng)
        failing: str | None = None
        while True:
            try:
                res: SampleResult = await sampler.period(host.sample_period_s)
            except native.ProcessGone:
                return  # the tick notices and drops the VM
            except HostError as exc:  # e.g. swap full: try again next period
                if failing is None:
                    self.log.write("sample_failed", vm=m.name, error=str(exc))
                failing = str(exc)
                await asyncio.sleep(host.sample_period_s)
                continue
            except Exception as exc:  # a bug: stop sampling this VM, say so, keep managing
                self.log.write("sampler_stopped", vm=m.name, error=repr(exc))
                self.notify(f"{m.name}: working-set sampler stopped: {exc!r}")
                return
            failing = None
            m.estimator.update(res.touched, res.sampled)
            if res.sampled:
                m.measured_pages = res.sampleable
            self._save_estimator(m)
            self.log.write("sample", vm=m.name, touched=res.touched, sampled=res.sampled,
                           dropped=res.dropped, sampleable=res.sampleable, present=res.present,
                           fraction=res.fraction, slow=m.estimator.slow, fast=m.estimator.fast,
                           active=m.estimator.active_fraction)

    def _save_estimator(self, m: ManagedVM) -> None:
        paths.write_json_atomic(m.estimator_file, {"estimator": m.estimator.to_dict(),
                                                   "pid": m.pid, "measured_pages": m.measured_pages})

    # -- stop ----------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Leave every VM running and unpaused, KSM restored, estimators saved."""
        if self._lock is None:
            return  # never started: nothing of ours to undo (another hv may own the files)
        for m in self.vms:
            if m.sampler_task is not None:
                m.sampler_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await m.sampler_task
        for m in self.vms:
            if m.paused_by_hv:
                try:
                    await self._resume(m, why="hv stopping")
                except HvError as exc:
                    self.notify(f"{m.name}: cannot resume: {exc}")
            if m.estimator.periods:
                with contextlib.suppress(OSError):
                    self._save_estimator(m)
        await self._ksm_restore()
        await self._detach_all()
        status_file().unlink(missing_ok=True)
        if self._guard_owned and self.guard.empty:
            # What is left in a non-empty file (a VM hv could not resume) is for the
            # guardian or the next hv to undo.
            self.guard.path.unlink(missing_ok=True)
        if self.log is not None:
            self.log.write("stop", ticks=self.ticks)
            self.log.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def _detach_all(self) -> None:
        for m in self.vms:
            await m.vm.detach()

