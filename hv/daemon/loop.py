"""``hv run``'s loop and lifecycle: start, tick, reload, re-attach, stop.

Each tick (``host.poll_interval_s``):

1. **free memory and the state** (:class:`~hv.policy.StateTracker`; a forced state,
   for drills, can only make it worse), read every poll.
2. **collect** (:mod:`hv.daemon.collect`) — every due VM's collection runs as its own
   job; the tick waits for them at most half a poll interval, so a slow or hung QEMU
   delays nobody else by more than that, and is simply left out until it answers.  In
   the high state a VM that needs nothing is due every ``host.idle_collect_s`` only
   (most of hv's cost on an idle host); in any worse state every VM is read every poll.
3. **decide** — the **pool** the VMs share,
   which is what they hold now plus free memory above the high threshold and its
   hysteresis (:func:`~hv.policy.reclaim.pool_bytes`), so targets shrink as soon as
   free memory falls and reclamation brings the host back to high; every VM's target
   by min-funding revocation with the idle memory tax (:func:`~hv.policy.compute_targets`).
4. **act** (:mod:`hv.daemon.act`) — each newly read VM's actions run as its own job too.

Beside the ticks: one sampler task per VM (:mod:`hv.daemon.sampling`) and the KSM
service (:mod:`hv.daemon.sharing`).

Lifecycle.  Everything that may refuse happens at start (bad config, a VM that does
not answer, admission).  Later, a VM whose QEMU exits is dropped and waited for: one
that comes back under the same name or socket is re-attached (and admitted again).
SIGHUP reloads the configuration with the same validation as at start; a bad one is
refused in one line and the old one stays.  SIGTERM/SIGINT stop within about two
seconds: every VM hv paused is resumed, KSM's tunables are restored, estimators are
saved, and balloons are **left where they are** (restoring every VM to its max at
once could overcommit the host the moment hv stops watching).  If hv is killed
outright, the guardian process (:mod:`hv.guardian`) resumes and restores instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hv import paths
from hv.daemon import status
from hv.daemon.act import act, forget_pause, resume
from hv.daemon.attach import STOP_TIMEOUT_S, admit, attach, detach, entries, max_of
from hv.daemon.collect import host_available_bytes, collect
from hv.daemon.domains import (
    Discovery,
    config_key,
    discovered_config,
    effective,
    metadata_now,
)
from hv.daemon.managed import Context, ManagedVM
from hv.daemon.merge import set_merge
from hv.daemon.sampling import sample_loop, save_estimator
from hv.daemon.sharing import SharingService
from hv.errors import (
    AdmissionError,
    ConfigError,
    HostError,
    HvError,
    UsageError,
    VMGone,
    VMNotFound,
)
from hv.eventlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES, EventLog
from hv.guardian import GuardFile
from hv.host import proc, tuners
from hv.host.notify import Notifier
from hv.policy import (
    Config,
    MemState,
    StateTracker,
    VMConfig,
    VMDemand,
    compute_targets,
    load_config,
    overhead_bytes,
)
from hv.policy.reclaim import (
    BALLOON_TOLERANCE_BYTES,
    policy_active_fraction,
    pool_bytes,
    pool_free_bytes,
)
from hv.libvirt import Domain, uri_of
from hv.qemu.vm import VMState
from hv.sampler import SamplerUnavailable, check_can_sample
from hv.sharing import optout
from hv.sharing.scan import Target

__all__ = ["Options", "Daemon", "parse_state"]

# A VM that went away is looked for again every 2 s: a restarted QEMU is back in
# seconds, and a look is one stat() of its socket.
REATTACH_INTERVAL_S = 2.0

# Closing a healthy connection takes milliseconds: even when a hung QEMU's resume used
# the whole stop timeout, the other connections get this long to close.
CLOSE_MIN_S = 0.2


def parse_state(text: str) -> MemState:
    """``"high" | "soft" | "hard" | "low"`` to a :class:`MemState` (UsageError otherwise)."""
    try:
        return MemState[text.strip().upper()]
    except KeyError:
        raise UsageError(f"unknown state {text.strip()!r}: use high, soft, hard or low") from None


@dataclass
class Options:
    """How ``hv run`` was asked to run."""

    config_path: Path
    log_path: Path | None = None
    once: bool = False
    force_state: MemState | None = None
    force_state_file: Path | None = None
    guardian: bool = True
    log_max_bytes: int = DEFAULT_MAX_BYTES  # the event log rotates past this size
    log_keep: int = DEFAULT_KEEP  # rotated event-log files kept
    allow_tuners: bool = False  # only warn when ksmtuned or momd runs


class Daemon:
    """The allocation loop.  ``await Daemon(options).run()``; raises HvError on fatal errors."""

    def __init__(self, options: Options, notify: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.notify = notify or (lambda line: None)
        self.systemd = Notifier(warn=self.notify)  # sd_notify; inert outside systemd
        self._systemd_status = ""
        self.dir = paths.state_dir() / "daemon"
        self.vms: list[ManagedVM] = []
        self.waiting: dict[str, VMConfig] = {}  # configured VMs whose QEMU went away
        self._reattaching: dict[str, asyncio.Task[None]] = {}
        self._reattach_problem: dict[str, str] = {}
        self.stop_event = asyncio.Event()
        self.reload_event = asyncio.Event()
        self.ctx: Context | None = None
        self.guard = GuardFile(self.dir / "guard.json", hv_pid=os.getpid())
        self.sharing: SharingService | None = None
        self._bad_force_text = ""
        self.sampling = False
        self.config: Config | None = None
        self.tracker: StateTracker | None = None
        self.state = MemState.HIGH
        self._lock: IO[str] | None = None
        self._guardian: subprocess.Popen[bytes] | None = None
        self._guard_owned = False
        self.ticks = 0
        self._pool = 0  # the pool at the last decision
        self._status_problem: str | None = None  # why status.json cannot be written
        self._kept_pause: dict[str, int] = {}  # VM -> pid hv paused, connection lost
        self._opt_choices: dict[str, bool] = {}  # the admin's hv share --opt-out/--opt-in
        self._opt_mtime: float | None = None
        # -- for the published status (issue 9) --
        self.on_publish: list[Callable[[dict[str, Any]], None]] = []
        self.admission_refusals = 0  # VMs refused at re-attach or reload
        self._tick_started = time.monotonic()
        self._tick_s = self._tick_s_total = 0.0
        self.discovery = Discovery()
        self._discovering: asyncio.Task[None] | None = None
        self._samplers_started = False

    @property
    def log(self) -> EventLog:
        assert self.ctx is not None
        return self.ctx.log

    # -- start -------------------------------------------------------------------
    async def start(self) -> None:
        """Validate, attach, admit; everything that may refuse happens here."""
        paths.private_dir(self.dir)
        self._take_lock()
        config = self._load_config()
        self.config = config
        self._check_tuners()
        self._undo_previous_run()
        log = EventLog(self.options.log_path or (self.dir / "events.jsonl"),
                       self.options.log_max_bytes, self.options.log_keep,
                       on_error=lambda exc: self.notify(
                           f"warning: cannot write the event log: {exc}; counting lost events"))
        self.ctx = Context(log, self.guard, self.notify)
        try:
            for cfg in config.vms:
                try:
                    self.vms.append(await attach(config, cfg, self.vms, self.ctx, self.notify))
                except (VMGone, VMNotFound) as exc:
                    self._wait_for(cfg, exc)
            admit(config, entries(self.vms))
            if config.libvirt.manage_all:
                await self._discover()
        except BaseException:
            await detach(self.vms)
            raise
        self.tracker = self._tracker(config)
        try:
            check_can_sample()
            self.sampling = True
        except SamplerUnavailable as exc:
            self.notify(f"warning: {exc}; every VM counts as fully active")
            log.write("sampler_unavailable", reason=str(exc))
        self.guard.save()
        self._guard_owned = True
        if self.options.guardian:
            self._spawn_guardian()
        log.write("start", pid=os.getpid(), config=config.source,
                  managed_bytes=config.host.managed_bytes, vms=[v.name for v in self.vms],
                  sampling=self.sampling, sample_pages=config.host.sample_pages,
                  sample_period_s=config.host.sample_period_s, reclaim=config.host.reclaim,
                  forced_state=str(self.options.force_state) if self.options.force_state else None)

    def _load_config(self) -> Config:
        config = load_config(self.options.config_path, proc.meminfo()["MemTotal"])
        if not config.vms and not config.libvirt.manage_all:
            raise ConfigError(f"{config.source}: no [vm.NAME] tables (and no [libvirt] "
                              "manage = \"all\"): nothing to manage")
        return config

    @staticmethod
    def _tracker(config: Config, state: MemState = MemState.HIGH) -> StateTracker:
        return StateTracker(config.host.managed_bytes, config.host.thresholds,
                            config.host.hysteresis_pct, initial=state)

    def _check_tuners(self) -> None:
        """Refuse to start beside ksmtuned or momd (or, when allowed, say they run)."""
        others = tuners.running_tuners()
        if not others:
            return
        what = tuners.describe(others)
        if not self.options.allow_tuners:
            raise HostError(f"other memory tuners run and would fight hv over KSM and balloons: "
                            f"{what}; stop them, or pass --allow-other-tuners")
        self.notify(f"warning: other memory tuners run (--allow-other-tuners): {what}")

    def _take_lock(self) -> None:
        lock = os.fdopen(paths.open_private(self.dir / "lock", os.O_RDWR), "r+")
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

    def _wait_for(self, cfg: VMConfig, why: HvError) -> None:
        """A configured VM that is not running: managed once its QEMU is there."""
        self.waiting[cfg.name] = cfg
        self.log.write("vm_waiting", vm=cfg.name, reason=str(why))
        self.notify(f"{cfg.name}: not running ({why}); managed once it starts")

    def _spawn_guardian(self) -> None:
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "hv.guardian", str(os.getpid()), str(self.guard.path)],
            stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent.parent))

    def _start_sampler(self, m: ManagedVM) -> None:
        if self.sampling and not self.options.once:
            assert self.ctx is not None
            m.sampler_task = asyncio.create_task(
                sample_loop(self.ctx, m, lambda: self._host_config().host))

    def _host_config(self) -> Config:
        assert self.config is not None
        return self.config

    def _share_targets(self) -> list[Target]:
        return [Target.from_info(m.vm.info) for m in self.vms
                if m.failing is None and m.gone is None and m.vm.state is VMState.ATTACHED
                and m.merge is not False]  # an opted-out VM is no part of the estimates

    # -- run ---------------------------------------------------------------------
    async def run(self) -> None:
        """Start, loop until stopped, and always clean up."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_event.set)
        try:
            await self.start()
            assert self.config is not None and self.ctx is not None
            for m in self.vms:
                if m.estimator.periods:
                    self.log.write("estimator_loaded", vm=m.name, **m.estimator.to_dict(),
                                   measured_pages=m.measured_pages)
                self._start_sampler(m)
            self._samplers_started = True
            if self.config.host.share_interval_s > 0 and not self.options.once:
                self.sharing = SharingService(
                    self.ctx, lambda: self._host_config().host.share_interval_s,
                    self._share_targets)
                await self.sharing.start()
            self._check_watchdog()
            while not self.stop_event.is_set():
                await self.tick()
                self._tell_systemd()
                if self.options.once:
                    break
                waits = [asyncio.ensure_future(e.wait())
                         for e in (self.stop_event, self.reload_event)]
                await asyncio.wait(waits, timeout=self.config.host.poll_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if self.reload_event.is_set() and not self.stop_event.is_set():
                    self.reload_event.clear()
                    self.systemd.reloading()
                    await self.reload()
                    self.systemd.ready(self._systemd_status)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.systemd.stopping()
            await self.shutdown()

    def _check_watchdog(self) -> None:
        """A watchdog shorter than two polls would kill a healthy hv between its ticks."""
        assert self.config is not None
        half = self.systemd.watchdog_s
        if half is not None and half <= self.config.host.poll_interval_s:
            self.notify(f"warning: systemd's WatchdogSec ({2 * half:g} s) is not more than "
                        f"twice host.poll_interval_s ({self.config.host.poll_interval_s:g} s): "
                        "raise WatchdogSec")

    def _tell_systemd(self) -> None:
        """After a complete tick: READY=1 the first time, then WATCHDOG=1 (at half the
        watchdog's timeout) and the state as STATUS= when it changes."""
        text = f"{self.state}: {len(self.vms)} VMs managed" + (
            f", {len(self.waiting)} gone" if self.waiting else "")
        if self.ticks == 1:
            self.log.write("ready", systemd=self.systemd.enabled)  # logged before it is said
            self.systemd.ready(text)
        elif text != self._systemd_status:
            self.systemd.status(text)
        self._systemd_status = text
        self.systemd.watchdog()

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
                    if text != self._bad_force_text:
                        self.log.write("force_state_ignored", error=str(exc))
                        self.notify(f"warning: {exc}; ignored")
                    self._bad_force_text = text
        return self.options.force_state

    async def _wait_jobs(self, jobs: list[asyncio.Task[None]], timeout_s: float) -> None:
        """Wait for this phase's jobs only: waiting for a hung QEMU's job from an earlier
        tick too would cost every tick the whole wait, slowing every VM's ticks."""
        pending = [j for j in jobs if not j.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for m in list(self.vms):
            if m.gone is not None:
                await self._drop(m, m.gone)

    def _merge_jobs(self) -> list[asyncio.Task[None]]:
        """KSM opt-out: a job for each VM whose RAM must go out of sharing or back in
        (config ``ksm``, the admin's record reread when it changes)."""
        assert self.ctx is not None
        mtime = optout.record_mtime()
        if mtime != self._opt_mtime:
            try:
                self._opt_choices = optout.admin_choices()
                self._opt_mtime = mtime
            except HvError as exc:
                self.log.write("opt_out_unreadable", error=str(exc))
                self._opt_mtime = mtime  # logged once per change of the file
        jobs = []
        for m in self.vms:
            if m.merge is None or m.busy:
                continue
            want = optout.wanted(m.cfg.ksm, self._opt_choices.get(m.name), m.merge,
                                 m.merge_off_by_hv)
            if want is not None:
                m.job = asyncio.create_task(set_merge(self.ctx, m, want, self._left_sharing))
                jobs.append(m.job)
        return jobs

    def _left_sharing(self) -> None:
        if self.sharing is not None:
            self.sharing.sweep()

    def _due(self, m: ManagedVM, now_s: float) -> bool:
        """Whether ``m`` is read this tick: always while anything may need doing (a worse
        state than high, a balloon on its way, a VM hv paused, no reading yet) or while
        its guest reports but hv does not know its need yet, else every
        ``host.idle_collect_s``.

        The need takes a few distinct reports (the boot reserve, then two that agree the
        use stopped growing): read only every 10 s, a VM attached under a host that then
        fell to hard could not be ballooned for 40 s, and was paged out instead (CI).
        """
        r = m.reading
        if r is None or m.failing is not None or self.state > MemState.HIGH or m.paused_by_hv:
            return True
        if m.need_bytes is None and m.report_problem is None:
            return True
        if m.balloon_asked is not None and abs(r.balloon_bytes - m.balloon_asked) > BALLOON_TOLERANCE_BYTES:
            return True
        return now_s >= m.next_collect_s

    def _free(self) -> int:
        """Free memory of the pool, from the host and what the VMs hold.

        A VM never read yet counts its overhead only: what it holds is in the host's
        MemAvailable already, and counting its max would put an overcommitted host in
        low (and pause VMs) on a guess.
        """
        assert self.config is not None
        host = self.config.host
        used = sum((m.reading.resident_bytes if m.reading else 0)
                   + overhead_bytes(m.max_bytes) for m in self.vms)
        return pool_free_bytes(host_available_bytes(), host.managed_bytes, used)

    def _update_state(self) -> tuple[MemState, MemState, int]:
        """Read free memory, move the state; (state, real state, free bytes)."""
        assert self.tracker is not None
        free = self._free()
        real = self.tracker.update(free)
        forced = self._forced()
        state = max(real, forced) if forced is not None else real
        if state != self.state:
            self.log.write("state", state=str(state), previous=str(self.state),
                           real_state=str(real), free_bytes=free)
            self.state = state
        return state, real, free

    async def tick(self) -> None:
        """One cycle: free memory and the state; collect the VMs that are due; decide; act."""
        assert self.config is not None and self.tracker is not None and self.ctx is not None
        host = self.config.host
        started = self._tick_started = time.monotonic()
        half = host.poll_interval_s / 2

        # 1. free memory (every poll) and the state, so a worse state makes every VM due
        # in this very tick.  Until every VM has been read once, what they hold is not
        # known: then the state waits for this tick's collection.
        known = all(m.reading is not None for m in self.vms)
        if known:
            state, real, free = self._update_state()
        # 2. collect: each due VM's own job; a VM still busy from before is not asked again.
        jobs: list[asyncio.Task[None]] = self._merge_jobs()
        for m in self.vms:
            if not m.busy and self._due(m, started):
                m.job = asyncio.create_task(collect(self.ctx, m))
                jobs.append(m.job)
        await self._wait_jobs(jobs, half)
        self._reattach()
        if self.config.libvirt.manage_all and (self._discovering is None
                                               or self._discovering.done()):
            self._discovering = asyncio.create_task(self._discover(self.ticks))
        if not known:
            state, real, free = self._update_state()
        new = [m for m in self.vms if m.reading is not None and m.failing is None
               and m.reading.at_s > m.decided_s]
        if not new:  # nothing new to decide on (an idle host between its reads)
            self._publish(state, free, self._pool)
            self.ticks += 1
            return

        # 3. decide, over every VM with a recent reading.
        free = self._free()
        oldest = started - host.idle_collect_s - 3 * host.poll_interval_s
        fresh = [m for m in self.vms if m.reading is not None and m.failing is None
                 and m.reading.at_s >= oldest]
        held = {m.name: m.reading.resident_bytes if m.reading else m.max_bytes for m in self.vms}
        overheads = sum(overhead_bytes(m.max_bytes) for m in self.vms)
        held_fresh = sum(held[m.name] for m in fresh)
        bound = host.managed_bytes - overheads - (sum(held.values()) - held_fresh)
        pool = self._pool = pool_bytes(held_fresh, free, self.tracker.free_goal_bytes(), bound)
        demands = []
        for m in fresh:
            assert m.reading is not None
            allocated = min(m.reading.resident_bytes, m.max_bytes)
            f = policy_active_fraction(m.estimator.active_fraction, m.measured_pages, allocated)
            demands.append(VMDemand(m.name, m.cfg.shares, m.cfg.min_bytes, m.max_bytes,
                                    allocated, f))
        targets = compute_targets(demands, pool, host.tax_rate)
        for m in fresh:
            m.target_bytes = targets[m.name]

        # 4. act: each newly read VM's job (not one busy with a job from before).
        defer_swap = False
        if self.sharing is not None:
            defer_swap = await self.sharing.advise(state, self.tracker.shortfall_bytes(free))
        jobs = []
        for m in new:
            assert m.reading is not None
            m.decided_s = m.reading.at_s
            m.next_collect_s = m.reading.at_s + host.idle_collect_s
            if not m.busy and m in fresh:
                m.job = asyncio.create_task(act(self.ctx, m, state, defer_swap,
                                                  host.hypervisor_swap))
                jobs.append(m.job)
        await self._wait_jobs(jobs, host.poll_interval_s if self.options.once else half)

        self._record(state, real, free, pool, [m for m in new if m in self.vms])
        self.ticks += 1

    def _record(self, state: MemState, real: MemState, free: int, pool: int,
                fresh: list[ManagedVM]) -> None:
        """The tick's event-log lines and the published status."""
        for m in fresh:
            assert m.reading is not None
            est = m.estimator
            self.log.write(
                "tick", vm=m.name, tick=self.ticks, state=str(state), real_state=str(real),
                free_bytes=free, pool_bytes=pool, target_bytes=m.target_bytes,
                balloon_bytes=m.reading.balloon_bytes, resident_bytes=m.reading.resident_bytes,
                swap_bytes=m.reading.swap_bytes, run_state=m.reading.run_state,
                paused_by_hv=m.paused_by_hv, need_bytes=m.need_bytes,
                active={"fraction": est.active_fraction, "slow": est.slow, "fast": est.fast,
                        "current": est.current, "periods": est.periods,
                        "measured_pages": m.measured_pages,
                        "of_allocation": policy_active_fraction(
                            est.active_fraction, m.measured_pages,
                            min(m.reading.resident_bytes, m.max_bytes))})
        self._publish(state, free, pool)

    def _publish(self, state: MemState, free: int, pool: int) -> None:
        """The published status: every tick, so readers see a live daemon (VMs or none);
        then every ``on_publish`` hook gets the snapshot (the metrics server's)."""
        # -- published status and its readers (issue 9: metrics, dashboard, hv top) --
        self._tick_s = time.monotonic() - self._tick_started
        self._tick_s_total += self._tick_s
        ksm = self.sharing.observe() if self.sharing is not None else None
        shared = ksm["vms"] if ksm else {}
        try:
            snapshot = status.publish(
                state=str(state), free_bytes=free, pool_bytes=pool, tick=self.ticks + 1,
                tick_seconds=self._tick_s, tick_seconds_total=self._tick_s_total,
                admission_refusals=self.admission_refusals, ksm=ksm,
                vms={m.name: status.vm_row(m, shared.get(m.name)) for m in self.vms})
            self._status_problem = None
        except HostError as exc:  # a full disk: said once, the last good status stays
            if self._status_problem is None:
                self.log.write("status_write_failed", error=str(exc))
                self.notify(f"warning: {exc}; `hv status` shows an older tick meanwhile")
            self._status_problem = str(exc)
            return
        for hook in self.on_publish:
            hook(snapshot)

    # -- VMs that go and come back -------------------------------------------------
    async def _drop(self, m: ManagedVM, why: str) -> None:
        """Stop managing ``m`` (its QEMU exited); wait for it to come back."""
        self.log.write("vm_gone", vm=m.name, error=why)
        self.notify(f"{m.name}: gone ({why}); waiting for it to come back")
        if m.paused_by_hv and proc.alive(m.pid):
            # Only the connection was lost: the QEMU is still paused by hv.  Its guard
            # record stays (the guardian resumes it if hv stops first) and a re-attach
            # to the same process takes it back.
            self._kept_pause[m.name] = m.pid
            m.paused_by_hv = False
        await self._forget(m)
        if self.config is not None and any(c.name == m.name for c in self.config.vms):
            self.waiting[m.name] = m.cfg

    async def _forget(self, m: ManagedVM) -> None:
        if m.sampler_task is not None:
            m.sampler_task.cancel()
        if m.job is not None and not m.job.done():
            m.job.cancel()
        if m.paused_by_hv and self.ctx is not None:
            forget_pause(self.ctx, m)
        if m in self.vms:
            self.vms.remove(m)
        await detach([m])

    def _reattach(self) -> None:
        """Look for waiting VMs; attach (and admit) those whose QEMU is back."""
        for name, cfg in list(self.waiting.items()):
            task = self._reattaching.get(name)
            if task is None or task.done():
                self._reattaching[name] = asyncio.create_task(self._try_reattach(cfg))

    async def _try_reattach(self, cfg: VMConfig) -> None:
        config = self._host_config()
        try:
            m = await attach(config, cfg, self.vms, self.ctx, self.notify)
        except HvError as exc:
            self._reattach_problem_once(cfg.name, str(exc), quiet=True)
            await asyncio.sleep(REATTACH_INTERVAL_S)
            return
        try:
            admit(config, entries([*self.vms, m]))
        except AdmissionError as exc:
            self.admission_refusals += 1
            await detach([m])
            self._reattach_problem_once(cfg.name, str(exc))
            await asyncio.sleep(REATTACH_INTERVAL_S)
            return
        if self.waiting.pop(cfg.name, None) is None:  # removed by a reload meanwhile
            await detach([m])
            return
        self._reattach_problem.pop(cfg.name, None)
        self.vms.append(m)
        if self._kept_pause.pop(m.name, None) == m.pid:
            m.paused_by_hv = True  # paused by hv before the connection was lost
        elif m.name in self.guard.paused:
            forget_pause(self._context(), m)  # another QEMU now: not hv's to resume
        self._start_sampler(m)
        self.log.write("vm_reattached", vm=m.name, pid=m.pid, socket=m.vm.socket_path)
        self.notify(f"{m.name}: back (pid {m.pid}); managed again")

    def _reattach_problem_once(self, name: str, problem: str, quiet: bool = False) -> None:
        if self._reattach_problem.get(name) != problem:
            self._reattach_problem[name] = problem
            if not quiet:
                self.log.write("reattach_refused", vm=name, error=problem)
                self.notify(f"{name}: back but not managed: {problem}")

    # -- libvirt domains that come and go (manage = "all") ---------------------------
    async def _discover(self, tick: int = 0) -> None:
        """Attach every running domain not managed yet (listed in tick ``tick``); said
        once per domain refused."""
        config = self._host_config()
        try:
            active = await self.discovery.active(uri_of(config.libvirt.uri))
        except HvError as exc:
            if self.discovery.failing != str(exc):
                self.discovery.failing = str(exc)
                self.log.write("discovery_failed", error=str(exc))
                self.notify(f"libvirt: cannot list domains ({exc}); trying again each tick")
            return
        if self.discovery.failing is not None:
            self.log.write("discovery_recovered", error=self.discovery.failing)
            self.discovery.failing = None
        taken = {c.libvirt for c in config.vms if c.libvirt is not None}
        taken |= {m.vm.ref.domain for m in self.vms if isinstance(m.vm, Domain)}
        names = {c.name for c in config.vms} | {m.name for m in self.vms}
        await asyncio.gather(*(self._add_domain(config, d, tick)
                               for d in self.discovery.new(active, taken, names)))

    async def _add_domain(self, config: Config, domain: str, tick: int) -> None:
        try:
            m = await attach(config, discovered_config(domain), self.vms, self.ctx, self.notify)
        except HvError as exc:
            self._refuse_domain(domain, str(exc))
            return
        try:
            admit(config, entries([*self.vms, m]))
        except AdmissionError as exc:
            await detach([m])
            self._refuse_domain(domain, str(exc))
            return
        m.discovered = True
        self.vms.append(m)
        if self._samplers_started:  # at start, run() starts every VM's sampler
            self._start_sampler(m)
        self.log.write("vm_added", vm=m.name, pid=m.pid, socket=m.vm.socket_path,
                       found_tick=tick, policy_source=m.policy_source)
        self.notify(f"{m.name}: libvirt domain found (pid {m.pid}); managed")

    def _refuse_domain(self, domain: str, why: str) -> None:
        self.discovery.refused[domain] = why
        self.log.write("domain_refused", vm=domain, error=why)
        self.notify(f"{domain}: libvirt domain not managed: {why}")

    # -- reload --------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: the new configuration, validated as at start; a bad one changes nothing."""
        assert self.config is not None
        added: list[ManagedVM] = []
        try:
            new = self._load_config()
            current = {m.name: m for m in self.vms}
            known = {**{n: m.cfg for n, m in current.items()}, **self.waiting}
            wanted = {c.name: c for c in new.vms}
            if new.libvirt.manage_all:  # found domains stay unless a [vm] takes the name
                for m in current.values():
                    if m.discovered and isinstance(m.vm, Domain):
                        wanted.setdefault(m.name, discovered_config(m.vm.ref.domain))
            replaced = {n for n, c in wanted.items()
                        if n in known and self._socket_key(c) != self._socket_key(known[n])}
            keep = [m for n, m in current.items() if n in wanted and n not in replaced]
            absent: list[tuple[VMConfig, HvError]] = []
            for name, cfg in wanted.items():
                if name not in known or name in replaced:
                    try:
                        added.append(await attach(new, cfg, keep + added, self.ctx, self.notify))
                    except (VMGone, VMNotFound) as exc:
                        absent.append((cfg, exc))
            xmls = {m.name: await metadata_now(m.vm) for m in keep}
            merged = {m.name: effective(wanted[m.name], m.vm, xmls[m.name]) for m in keep}
            limits = {m.name: max_of(new, merged[m.name][0], m.vm) for m in keep}
            admit(new, [(merged[m.name][0], m.vm, limits[m.name]) for m in keep]
                        + entries(added))
        except HvError as exc:
            self.admission_refusals += isinstance(exc, AdmissionError)
            await detach(added)
            self.log.write("reload_refused", error=str(exc))
            self.notify(f"reload refused, the running configuration stays: {exc}")
            return
        removed = [m for m in self.vms if m.name not in wanted or m.name in replaced]
        for m in removed:
            if m.paused_by_hv:
                with contextlib.suppress(HvError, asyncio.TimeoutError):
                    await asyncio.wait_for(resume(self._context(), m, why="removed from config"),
                                           STOP_TIMEOUT_S)
            await self._forget(m)
        for m in keep:
            m.cfg, m.max_bytes = merged[m.name][0], limits[m.name]
            m.policy_source = merged[m.name][1]
            if isinstance(m.vm, Domain) and xmls[m.name] is not None:
                m.vm.xml = xmls[m.name]
        self.waiting = {n: c for n, c in self.waiting.items() if n in wanted and n not in replaced}
        for m in added:
            self.vms.append(m)
            self._start_sampler(m)
        for cfg, why in absent:
            self._wait_for(cfg, why)
        old_host, self.config = self.config.host, new
        if (new.host.managed_bytes, new.host.thresholds, new.host.hysteresis_pct) != (
                old_host.managed_bytes, old_host.thresholds, old_host.hysteresis_pct):
            self.tracker = self._tracker(new, self.tracker.state if self.tracker else MemState.HIGH)
        self.log.write("reload", config=new.source, added=[m.name for m in added],
                       removed=[m.name for m in removed], vms=[m.name for m in self.vms])
        self.notify(f"configuration reloaded: {len(self.vms)} VMs managed")

    def _context(self) -> Context:
        assert self.ctx is not None
        return self.ctx

    def _socket_key(self, cfg: VMConfig) -> str:
        if cfg.libvirt is not None:
            return config_key(self._host_config(), cfg)
        return os.path.realpath(cfg.socket) if cfg.socket is not None else f"name:{cfg.name}"

    # -- stop ----------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Leave every VM running and unpaused, KSM restored, estimators saved."""
        if self._lock is None:
            return  # never started: nothing of ours to undo (another hv may own the files)
        tasks = [t for t in self._reattaching.values() if not t.done()]
        if self._discovering is not None and not self._discovering.done():
            tasks.append(self._discovering)
        for m in self.vms:
            tasks += [t for t in (m.sampler_task, m.job) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), STOP_TIMEOUT_S)
        stop_by = time.monotonic() + STOP_TIMEOUT_S  # resuming and closing, together
        if self.ctx is not None:
            paused = [m for m in self.vms if m.paused_by_hv]
            results = await asyncio.gather(
                *(asyncio.wait_for(resume(self.ctx, m, why="hv stopping"), STOP_TIMEOUT_S)
                  for m in paused), return_exceptions=True)
            for m, res in zip(paused, results):
                if isinstance(res, BaseException):
                    self.notify(f"{m.name}: cannot resume ({res or 'no answer'}); "
                                "the guardian will try")
        for m in self.vms:
            if m.estimator.periods:
                with contextlib.suppress(OSError):
                    save_estimator(m)
        if self.sharing is not None:
            await self.sharing.stop()
        await asyncio.to_thread(self.discovery.close)
        await detach(self.vms, max(CLOSE_MIN_S, stop_by - time.monotonic()))
        status.status_file().unlink(missing_ok=True)
        if self._guard_owned and self.guard.empty:
            # What is left in a non-empty file (a VM hv could not resume) is for the
            # guardian or the next hv to undo.
            self.guard.path.unlink(missing_ok=True)
        if self.ctx is not None:
            self.log.write("stop", ticks=self.ticks)
            self.log.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
