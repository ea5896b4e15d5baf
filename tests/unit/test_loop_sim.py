"""A deterministic simulation of ``hv run``'s loop: the real Daemon, fake VMs, a fake host.

The seams (the only things replaced):

- ``hv.daemon.loop.VM`` — :class:`FakeVM`, a handle on a :class:`FakeGuest` that
  stands for one QEMU and its guest: balloon, resident and swapped host memory, run
  state, balloon statistics (honest, stale or impossible), and whether it answers
  (``hung``) or exists (``alive``).  Every QMP command is recorded in ``calls``;
- ``hv.host.proc.meminfo`` — :class:`FakeHost`: MemTotal is fixed, MemAvailable is what
  other host processes and the guests' resident memory leave;
- ``hv.daemon.act.page_out`` — moves the guest's resident memory to swap and records it;
- ``hv.host.proc.vcpu_runqueue_wait_s``, ``hv.host.swap.totals`` (admission),
  ``hv.daemon.loop.check_can_sample`` (no sampler: active fractions are set on the
  estimators directly);
- the wall clock :mod:`hv.daemon.collect` stamps guest reports with advances one
  second per simulated tick, so each tick's report is a new one.

A balloon request takes effect at once: inflating by N bytes takes N bytes of the
guest's resident memory back to the host; deflating gives the guest room it has not
touched yet (resident memory does not grow).  Ticks are driven one by one with
``await daemon.tick()``; the poll interval is 50 ms, so a hung VM costs a tick at
most 50 ms and no test needs long.  Nothing waits on a real sleep for a condition:
every wait is a bounded number of ticks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hv.daemon import act as act_mod
from hv.daemon import attach as attach_mod
from hv.daemon import collect as collect_mod
from hv.daemon import loop as loop_mod
from hv.daemon.loop import Daemon, Options
from hv.daemon.managed import ManagedVM
from hv.errors import VMGone
from hv.eventlog import read_events
from hv.host import proc, swap
from hv.host.proc import RangeUsage
from hv.policy import reclaim as reclaim_mod
from hv.policy import MemState
from hv.qemu.vm import GuestStats, RamRange, VMInfo, VMState
from hv.sampler import SamplerUnavailable
from hv.units import GiB, MiB, PAGE_SIZE

pytestmark = pytest.mark.timeout(30)

# The simulated host: 8 GiB, default thresholds (6/4/2/1 % of MemTotal, 0.5 % hysteresis).
HOST_BYTES = 8 * GiB
HIGH_BYTES = int(HOST_BYTES * 0.06)
SOFT_BYTES = int(HOST_BYTES * 0.04)
HARD_BYTES = int(HOST_BYTES * 0.02)
LOW_BYTES = int(HOST_BYTES * 0.01)
HYSTERESIS_BYTES = int(HOST_BYTES * 0.005)

POLL_INTERVAL_S = 0.4  # jobs of responsive fakes finish in ms; the half-poll deadline only binds hung ones (generous under load)
REATTACH_WAIT_S = 2 * POLL_INTERVAL_S  # one failed attempt's pause, plus one attempt
IDLE_FRACTION = 0.05  # an idle VM's active fraction
ACTING = ("balloon", "stop", "cont")  # the QMP commands that change a VM


# -- the fake world ---------------------------------------------------------------------
@dataclass
class FakeGuest:
    """One simulated QEMU and its guest."""

    name: str
    socket: str
    pid: int
    ram_bytes: int
    resident_bytes: int
    used_bytes: int = 256 * MiB  # the guest's own use: MemTotal - MemAvailable
    hidden_bytes: int = 40 * MiB  # the guest kernel's boot reserve, outside MemTotal
    report: str = "honest"  # "honest" | "stale" | "zero_total" | "free_above_total"
    run_state: str = "running"
    balloon_bytes: int = 0  # the balloon's actual size (0: the whole RAM, set below)
    swap_bytes: int = 0
    alive: bool = True
    hung: bool = False
    merge: bool = True  # its RAM backend's merge property (open to KSM)
    calls: list[tuple[str, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.balloon_bytes = self.balloon_bytes or self.ram_bytes

    def stats(self) -> GuestStats:
        total = self.balloon_bytes - self.hidden_bytes
        available = total - self.used_bytes
        free, age_s = available, 0.25
        if self.report == "stale":
            age_s = 30.0
        elif self.report == "zero_total":
            total = 0
        elif self.report == "free_above_total":
            free = total + GiB
        return GuestStats(total, free, available, None, None, None, None, None, age_s)

    def inflate_to(self, goal_bytes: int) -> None:
        if goal_bytes < self.balloon_bytes:
            self.resident_bytes = max(0, self.resident_bytes - (self.balloon_bytes - goal_bytes))
        self.balloon_bytes = goal_bytes

    def acted(self) -> list[tuple[str, int | None]]:
        return [c for c in self.calls if c[0] in ACTING]


class FakeVM:
    """What the daemon holds for a VM (``hv.qemu.vm.VM``'s methods), on a FakeGuest."""

    def __init__(self, host: FakeHost, name: str, socket_path: str) -> None:
        self.name = name
        self.socket_path = socket_path
        self.state = VMState.DETACHED
        self.guest = host.guests[socket_path]
        self._info: VMInfo | None = None
        host.handles.append(self)

    async def _qmp(self, command: str, value: int | None = None) -> None:
        g = self.guest
        if not g.alive or self.state is VMState.GONE:
            self.state = VMState.GONE
            raise VMGone(self.name, "QEMU exited")
        if g.hung:
            await asyncio.Event().wait()  # never answers
        g.calls.append((command, value))

    async def attach(self) -> VMInfo:
        await self._qmp("attach")
        g = self.guest
        self.state = VMState.ATTACHED
        self._info = VMInfo(self.name, self.socket_path, g.pid, "kvm", g.ram_bytes,
                            (RamRange("pc.ram", 0x7F0000000000, g.ram_bytes),),
                            "/machine/peripheral-anon/device[0]", False)
        return self._info

    async def detach(self) -> None:
        if self.guest.hung and self.guest.alive:
            await asyncio.Event().wait()  # even closing the connection hangs
        if self.state is VMState.ATTACHED:
            self.state = VMState.DETACHED

    @property
    def info(self) -> VMInfo:
        assert self._info is not None, "not attached"
        return self._info

    async def enable_stats(self, interval_s: int = 2) -> None:
        await self._qmp("enable-stats")

    async def balloon_actual(self) -> int:
        await self._qmp("query-balloon")
        return self.guest.balloon_bytes

    async def guest_stats(self, wait_s: float = 0, max_age_s: float | None = None) -> GuestStats:
        await self._qmp("guest-stats")
        return self.guest.stats()

    async def status(self) -> str:
        await self._qmp("query-status")
        return self.guest.run_state

    async def set_balloon(self, target_bytes: int, *, force: bool = False) -> None:
        await self._qmp("balloon", target_bytes)
        self.guest.inflate_to(target_bytes)

    async def pause(self) -> None:
        await self._qmp("stop")
        self.guest.run_state = "paused"

    async def merge(self) -> bool:
        await self._qmp("qom-get merge")
        return self.guest.merge

    async def set_merge(self, on: bool) -> str:
        await self._qmp("qom-set merge", int(on))
        self.guest.merge = on
        return "/objects/pc.ram"

    async def resume(self) -> None:
        await self._qmp("cont")
        self.guest.run_state = "running"

    def host_usage(self) -> RangeUsage:
        g = self.guest
        if not g.alive:
            raise VMGone(self.name, "QEMU exited")
        return RangeUsage(g.resident_bytes, g.swap_bytes, 0)


class FakeHost:
    """MemTotal, MemAvailable and the guests; a simulated wall clock for guest reports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.guests: dict[str, FakeGuest] = {}
        self.handles: list[FakeVM] = []
        self.other_used_bytes = 0  # host memory of everything but the guests' RAM
        self.wall_s = 1_700_000_000.0
        self.paged_out: list[tuple[str, int]] = []
        self._pids = iter(range(4000, 5000))

    def guest(self, name: str, ram_bytes: int = 2 * GiB, resident_bytes: int = 1900 * MiB,
              **kw: Any) -> FakeGuest:
        sock = self.root / f"{name}.sock"
        sock.touch()  # the daemon checks that the socket exists
        g = FakeGuest(name, str(sock), next(self._pids), ram_bytes, resident_bytes, **kw)
        self.guests[str(sock)] = g
        return g

    def handle(self, name: str, socket_path: str) -> FakeVM:
        return FakeVM(self, name, socket_path)

    def available_bytes(self) -> int:
        held = sum(g.resident_bytes for g in self.guests.values() if g.alive)
        return max(0, HOST_BYTES - self.other_used_bytes - held)

    def set_available(self, available_bytes: int) -> None:
        """Let other host processes take (or free) memory until MemAvailable is this."""
        self.other_used_bytes += self.available_bytes() - available_bytes

    def meminfo(self) -> dict[str, int]:
        return {"MemTotal": HOST_BYTES, "MemAvailable": self.available_bytes()}

    def page_out(self, m: ManagedVM, n: int) -> tuple[int, int]:
        g = self.guests[m.vm.socket_path]
        out = min(n * PAGE_SIZE, g.resident_bytes)
        g.resident_bytes -= out
        g.swap_bytes += out
        self.paged_out.append((m.name, n))
        return n, out // PAGE_SIZE


class Sim:
    """A test's world: the fake host, the config file, the daemon's event log."""

    def __init__(self, root: Path, host: FakeHost) -> None:
        self.root = root
        self.host = host
        self.config_path = root / "hv.toml"
        self.log_path = root / "events.jsonl"

    def write_config(self, vms: dict[str, str], host: str = "") -> None:
        """``vms``: name -> the body of its table (``min``, ``max``, ``shares``)."""
        # idle_collect_s = 0: every VM read every tick, so the tests count ticks; the
        # idle cadence has a test of its own.
        lines = ["[host]", f"poll_interval_s = {POLL_INTERVAL_S}", "share_interval_s = 0"]
        lines += [host] if "idle_collect_s" in host else ["idle_collect_s = 0", host]
        for name, body in vms.items():
            lines += [f"[vm.{name}]", f'socket = "{name}.sock"', body]
        self.config_path.write_text("\n".join(lines) + "\n")

    def daemon(self) -> Daemon:
        return Daemon(Options(self.config_path, log_path=self.log_path, guardian=False))

    async def tick(self, d: Daemon, n: int = 1) -> None:
        for _ in range(n):
            self.host.wall_s += 1.0
            await d.tick()

    def events(self, kind: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [e for e in read_events(self.log_path, kind)
                if all(e.get(k) == v for k, v in match.items())]

    def last_tick(self, vm: str) -> dict[str, Any]:
        return self.events("tick", vm=vm)[-1]


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sim]:
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("HV_STATE_DIR", str(state))
    host = FakeHost(tmp_path)

    def no_sampler() -> None:
        raise SamplerUnavailable("simulation: no sampler")

    monkeypatch.setattr(attach_mod, "VM", host.handle)
    monkeypatch.setattr(loop_mod, "check_can_sample", no_sampler)
    monkeypatch.setattr(loop_mod, "REATTACH_INTERVAL_S", POLL_INTERVAL_S)
    monkeypatch.setattr(proc, "meminfo", host.meminfo)
    monkeypatch.setattr(proc, "vcpu_runqueue_wait_s", lambda pid, *a, **kw: 0.0)
    monkeypatch.setattr(swap, "totals", lambda: (16 * GiB, 16 * GiB))
    monkeypatch.setattr(act_mod, "page_out", host.page_out)
    monkeypatch.setattr(collect_mod, "time",
                        SimpleNamespace(time=lambda: host.wall_s, monotonic=time.monotonic))
    yield Sim(tmp_path, host)


def run(sim: Sim, scenario: Callable[[Daemon], Awaitable[None]]) -> Daemon:
    """Start a daemon on the config, run ``scenario``, and always shut it down."""

    async def go() -> Daemon:
        d = sim.daemon()
        await d.start()
        try:
            await scenario(d)
        finally:
            await d.shutdown()
        return d

    return asyncio.run(go())


def managed(d: Daemon, name: str) -> ManagedVM:
    return next(m for m in d.vms if m.name == name)


def set_active(d: Daemon, name: str, fraction: float) -> None:
    """Give a VM the active fraction a sampler would have measured."""
    managed(d, name).estimator.update(round(fraction * 100), 100)


# Warm-up in high: the boot reserve is the median of three reports taken with the
# balloon still, so a guest's need is known from the fourth tick on.
WARMUP_TICKS = 4


# -- 1. natural pressure ------------------------------------------------------------------
def test_natural_pressure_balloons_idle_vms_and_frees_memory(sim: Sim) -> None:
    h = sim.host
    idle1, idle2 = h.guest("idle1"), h.guest("idle2")
    busy = h.guest("busy", used_bytes=1700 * MiB)
    sim.write_config({n: 'min = "512M"' for n in ("idle1", "idle2", "busy")})
    h.set_available(1 * GiB)
    busy_resident = busy.resident_bytes

    async def scenario(d: Daemon) -> None:
        set_active(d, "idle1", IDLE_FRACTION)
        set_active(d, "idle2", IDLE_FRACTION)
        await sim.tick(d, WARMUP_TICKS)
        assert d.state is MemState.HIGH
        assert not sim.events("balloon"), "nothing to do in high with every balloon at max"

        # Another host process takes memory: 3 % free, below soft (4 %), above hard.
        h.set_available(int(HOST_BYTES * 0.03))
        await sim.tick(d)
        assert d.state is MemState.SOFT
        first = {n: sim.last_tick(n) for n in ("idle1", "idle2", "busy")}
        # The active VM's target covers what it holds; the idle ones pay the shortfall.
        assert first["busy"]["target_bytes"] >= busy_resident
        for n in ("idle1", "idle2"):
            assert first[n]["target_bytes"] < first[n]["resident_bytes"]
            inflate = sim.events("balloon", vm=n)
            assert inflate and inflate[0]["goal_bytes"] < inflate[0]["actual_bytes"]
        shortfall = HIGH_BYTES - first["busy"]["free_bytes"]
        assert sum(first[n]["resident_bytes"] - first[n]["target_bytes"]
                   for n in ("idle1", "idle2")) >= shortfall - PAGE_SIZE

        # The idle guests gave back at least the shortfall (more: the pool also makes
        # room for the active VM to grow to its max): free memory is back above high.
        await sim.tick(d, 3)
        assert h.available_bytes() >= HIGH_BYTES + HYSTERESIS_BYTES
        assert d.state is MemState.HIGH
        for n, g in (("idle1", idle1), ("idle2", idle2)):
            assert g.resident_bytes < 1900 * MiB
            assert g.resident_bytes <= sim.last_tick(n)["target_bytes"] + 4 * MiB
        assert busy.resident_bytes == busy_resident and not busy.acted()
        assert not sim.events("swap") and not sim.events("pause")
        # Back in high, the idle VMs stay where they are (their targets hold them).
        acted = [len(g.acted()) for g in (idle1, idle2)]
        await sim.tick(d, 3)
        assert [len(g.acted()) for g in (idle1, idle2)] == acted

    run(sim, scenario)
    states = [e["state"] for e in sim.events("state")]
    assert states == ["soft", "high"]


# -- 2. stale or lying guest statistics ------------------------------------------------------
def test_untrusted_reports_neither_shrink_a_balloon_nor_touch_neighbours(sim: Sim) -> None:
    h = sim.host
    reports = {"twin": "honest", "stale": "stale", "zero": "zero_total",
               "liar": "free_above_total"}
    for n, report in reports.items():
        h.guest(n, resident_bytes=1400 * MiB, report=report)
    busy = h.guest("busy", resident_bytes=1 * GiB, used_bytes=900 * MiB)
    sim.write_config({n: 'min = "512M"' for n in [*reports, "busy"]})
    h.set_available(1 * GiB)

    async def scenario(d: Daemon) -> None:
        for n in reports:
            set_active(d, n, IDLE_FRACTION)
        await sim.tick(d, WARMUP_TICKS)
        rejected = {e["vm"]: e["reason"] for e in sim.events("guest_report_rejected")}
        assert set(rejected) == {"stale", "zero", "liar"}
        assert "old" in rejected["stale"] and "MemTotal is 0" in rejected["zero"]
        assert "free" in rejected["liar"]
        assert len(sim.events("guest_report_rejected")) == 3, "each logged once"

        h.set_available(int(HOST_BYTES * 0.03))  # soft
        await sim.tick(d)
        assert d.state is MemState.SOFT
        targets = {n: sim.last_tick(n)["target_bytes"] for n in reports}
        assert len(set(targets.values())) == 1, f"same VM, same target whatever it reports: {targets}"
        assert sim.last_tick("busy")["target_bytes"] >= busy.resident_bytes
        for n in ("stale", "zero", "liar"):
            assert not [c for c in h.guests[str(sim.root / f"{n}.sock")].acted()
                        if c[0] == "balloon"], f"{n}: no balloon from an untrusted report"
        twin = sim.events("balloon", vm="twin")
        assert twin and twin[0]["goal_bytes"] < twin[0]["actual_bytes"]
        await sim.tick(d, 2)
        assert not sim.events("swap") and not sim.events("pause")

        # Hard, then low: swap and pause hit only VMs above their targets.
        for level in (int(HOST_BYTES * 0.015), int(HOST_BYTES * 0.005)):
            h.set_available(level)
            await sim.tick(d, 3)
        states = [e["state"] for e in sim.events("state")]
        assert "hard" in states and "low" in states
        assert sim.events("swap") and sim.events("pause")
        for e in sim.events("swap") + sim.events("pause"):
            assert e["resident_bytes"] > e["target_bytes"], e
        assert not [e for e in sim.events("swap") + sim.events("pause") if e["vm"] == "busy"]
        assert not busy.acted() and not [p for p in h.paged_out if p[0] == "busy"]

    run(sim, scenario)


@pytest.mark.parametrize("reclaim", ["balloon+swap", "balloon"])
def test_reclaim_by_balloon_only_never_pages_out(sim: Sim, monkeypatch: pytest.MonkeyPatch,
                                                 reclaim: str) -> None:
    """``reclaim = "balloon"``: a VM whose balloon cannot shrink (stale reports) is not
    paged out in soft, hard or low; the honest one is still ballooned; low still pauses.
    The default pages it out (soft: its balloon is stuck; hard and low: above target)."""
    monkeypatch.setattr(reclaim_mod, "BALLOON_STUCK_S", 0.0)  # stuck from its first tick
    h = sim.host
    stuck = h.guest("stuck", report="stale")
    h.guest("twin")
    sim.write_config({"stuck": 'min = "512M"', "twin": 'min = "512M"'}, f'reclaim = "{reclaim}"')
    h.set_available(1 * GiB)

    async def scenario(d: Daemon) -> None:
        for n in ("stuck", "twin"):
            set_active(d, n, IDLE_FRACTION)
        await sim.tick(d, WARMUP_TICKS)
        for level in (int(HOST_BYTES * 0.03), int(HOST_BYTES * 0.015), int(HOST_BYTES * 0.005)):
            for _ in range(2):  # a host process takes whatever hv frees
                h.set_available(level)  # soft, hard, low
                await sim.tick(d)
        assert [e["state"] for e in sim.events("state")] == ["soft", "hard", "low"]
        twin = sim.events("balloon", vm="twin")
        assert twin and twin[0]["goal_bytes"] < twin[0]["actual_bytes"]
        assert sim.last_tick("stuck")["resident_bytes"] > sim.last_tick("stuck")["target_bytes"]
        assert sim.events("pause", vm="stuck") and stuck.run_state == "paused"

    run(sim, scenario)
    assert sim.events("start")[0]["reclaim"] == reclaim
    swapped = {e["why"] for e in sim.events("swap", vm="stuck")}
    if reclaim == "balloon":
        assert not sim.events("swap") and not h.paged_out
    else:
        assert {"balloon cannot reach target", "hard", "low"} <= swapped, swapped


# -- 3. max in every state ------------------------------------------------------------------
@pytest.mark.parametrize("state,available_pct", [
    (MemState.HIGH, 20.0), (MemState.SOFT, 3.0), (MemState.HARD, 1.5), (MemState.LOW, 0.5)])
def test_max_is_enforced_in_every_state(sim: Sim, state: MemState, available_pct: float) -> None:
    h = sim.host
    capped = h.guest("capped")  # a 2 GiB guest whose balloon is at 2 GiB
    h.guest("other", resident_bytes=1 * GiB)
    sim.write_config({"capped": 'min = "512M"\nmax = "1G"', "other": 'min = "512M"'})
    h.set_available(int(HOST_BYTES * available_pct / 100))

    async def scenario(d: Daemon) -> None:
        await sim.tick(d)  # the first tick: the guest's need is not known yet
        assert d.state is state
        first = sim.events("balloon", vm="capped")
        assert first and first[0]["goal_bytes"] == 1 * GiB and first[0]["state"] == str(state)
        assert capped.balloon_bytes == 1 * GiB

    run(sim, scenario)


# -- 4. paused by an admin -------------------------------------------------------------------
def test_a_vm_paused_by_someone_else_is_left_alone(sim: Sim) -> None:
    h = sim.host
    admin = h.guest("admin", run_state="paused")
    mine = h.guest("mine")
    sim.write_config({"admin": 'min = "512M"', "mine": 'min = "512M"'})
    h.set_available(int(HOST_BYTES * 0.005))  # low

    async def scenario(d: Daemon) -> None:
        set_active(d, "admin", IDLE_FRACTION)
        set_active(d, "mine", IDLE_FRACTION)
        await sim.tick(d, 3)
        assert d.state is MemState.LOW
        # hv paused the VM above target it runs; the admin's VM is above target too,
        # and nothing is done to it.
        assert sim.events("pause", vm="mine") and managed(d, "mine").paused_by_hv
        assert d.guard.paused == {"mine": mine.socket}
        assert admin.acted() == [] and not [p for p in h.paged_out if p[0] == "admin"]

        # An admin resumes the VM hv paused: it is theirs.
        mine.run_state = "running"
        h.set_available(int(HOST_BYTES * 0.035))  # hard: hv would resume what it paused
        await sim.tick(d)
        assert sim.events("resumed_by_other", vm="mine")
        assert not managed(d, "mine").paused_by_hv and "mine" not in d.guard.paused
        assert ("cont", None) not in mine.calls
        # ... and when they pause it again, hv never resumes it: not in high, not at stop.
        mine.run_state = "paused"
        h.set_available(1 * GiB)
        await sim.tick(d, 3)
        assert d.state is MemState.HIGH

    run(sim, scenario)
    assert ("cont", None) not in h.guests[str(sim.root / "mine.sock")].calls
    assert admin.acted() == [] and admin.run_state == "paused"
    assert not sim.events("resume")


def test_the_memory_of_a_vm_paused_by_someone_else_is_not_counted_on(sim: Sim) -> None:
    """hv does nothing to a VM an admin paused, so its neighbours make up the shortfall."""
    h = sim.host
    admin = h.guest("admin", run_state="paused")
    idle = h.guest("idle")
    h.guest("busy", resident_bytes=1 * GiB, used_bytes=900 * MiB)
    sim.write_config({n: 'min = "512M"' for n in ("admin", "idle", "busy")})
    h.set_available(1 * GiB)

    async def scenario(d: Daemon) -> None:
        set_active(d, "admin", IDLE_FRACTION)
        set_active(d, "idle", IDLE_FRACTION)
        await sim.tick(d, WARMUP_TICKS)
        h.set_available(int(HOST_BYTES * 0.03))  # soft
        await sim.tick(d, 6)
        assert h.available_bytes() >= HIGH_BYTES, (
            f"free {h.available_bytes() // MiB} MiB, idle holds {idle.resident_bytes // MiB} MiB "
            f"(target {sim.last_tick('idle')['target_bytes'] // MiB} MiB)")
        assert admin.acted() == []

    run(sim, scenario)


def test_a_vm_hv_paused_and_an_admin_resumed_in_low_is_not_paused_again(sim: Sim) -> None:
    h = sim.host
    # A stale report: the balloon does not shrink, so only swap (64 MiB a tick) brings
    # the VM toward its target, and it stays above target for the whole test.
    mine = h.guest("mine", report="stale")
    h.guest("busy")
    sim.write_config({"mine": 'min = "512M"', "busy": 'min = "512M"'})
    h.set_available(int(HOST_BYTES * 0.005))  # low

    async def scenario(d: Daemon) -> None:
        set_active(d, "mine", IDLE_FRACTION)
        await sim.tick(d, 2)
        assert sim.events("pause", vm="mine") and mine.run_state == "paused"
        mine.run_state = "running"  # the admin's "cont"
        for _ in range(3):  # a host process takes whatever hv frees
            h.set_available(int(HOST_BYTES * 0.005))
            await sim.tick(d)
        assert d.state is MemState.LOW
        assert sim.last_tick("mine")["resident_bytes"] > sim.last_tick("mine")["target_bytes"]
        assert sim.events("resumed_by_other", vm="mine")
        assert mine.run_state == "running", "hv paused again a VM an admin resumed"
        assert len(sim.events("pause", vm="mine")) == 1 and "mine" not in d.guard.paused
        assert sim.events("swap", vm="mine")[-1]["why"] == "low"  # still swapped
        # Once the state has left low, a new low episode may pause it again.
        h.set_available(1 * GiB)
        await sim.tick(d)
        h.set_available(int(HOST_BYTES * 0.005))
        await sim.tick(d)
        assert d.state is MemState.LOW and mine.run_state == "paused"
        assert len(sim.events("pause", vm="mine")) == 2

    run(sim, scenario)


# -- 5. a hung VM -------------------------------------------------------------------------------
@pytest.mark.parametrize("paused_by_hv", [False, True])
def test_a_hung_vm_delays_nobody_and_stop_is_quick(sim: Sim, paused_by_hv: bool) -> None:
    h = sim.host
    hung = h.guest("hung")
    h.guest("a")
    b = h.guest("b", resident_bytes=1000 * MiB, balloon_bytes=1 * GiB)  # at its max
    sim.write_config({"hung": 'min = "512M"', "a": 'min = "512M"', "b": 'min = "512M"\nmax = "1G"'})
    h.set_available(int(HOST_BYTES * (0.005 if paused_by_hv else 0.2)))
    stop_s: list[float] = []

    async def scenario(d: Daemon) -> None:
        set_active(d, "hung", IDLE_FRACTION)
        if paused_by_hv:
            await sim.tick(d)
            assert managed(d, "hung").paused_by_hv
            h.set_available(int(HOST_BYTES * 0.2))
        b.inflate_to(2 * GiB)  # the guest let its balloon go: hv must bring it back to max
        start_tick = d.ticks
        hung.hung = True
        for _ in range(5):
            t0 = time.monotonic()
            await sim.tick(d)
            assert time.monotonic() - t0 < POLL_INTERVAL_S + 0.5, "a tick waits half a poll per phase"
        # Every other VM was collected and acted on in each of those ticks.
        for n in ("a", "b"):
            assert [e["tick"] for e in sim.events("tick", vm=n)][-5:] == list(range(start_tick, start_tick + 5))
        assert [e for e in sim.events("balloon", vm="b") if e["goal_bytes"] == 1 * GiB
                and e["actual_bytes"] == 2 * GiB], "b brought to max despite the hung VM"
        assert not [e for e in sim.events("tick", vm="hung") if e["tick"] > start_tick]
        t0 = time.monotonic()
        await d.shutdown()
        stop_s.append(time.monotonic() - t0)

    run(sim, scenario)
    assert stop_s[0] < 2.0, f"shutdown took {stop_s[0]:.2f} s with a hung VM"
    assert sim.events("stop")


# -- 6. a dying VM --------------------------------------------------------------------------------
def test_a_vm_that_exits_is_dropped_and_reattached_when_back(sim: Sim) -> None:
    h = sim.host
    dying = h.guest("dying")
    h.guest("a")
    sim.write_config({"dying": 'min = "512M"', "a": 'min = "512M"'})
    h.set_available(1 * GiB)

    async def scenario(d: Daemon) -> None:
        await sim.tick(d, 2)
        dying.alive = False
        await sim.tick(d)
        assert sim.events("vm_gone", vm="dying")
        assert [m.name for m in d.vms] == ["a"] and "dying" in d.waiting
        await sim.tick(d, 3)  # hv keeps running; a is still managed
        assert sim.last_tick("a")["tick"] == d.ticks - 1

        dying.alive, dying.pid = True, dying.pid + 1000  # a new QEMU on the same socket
        deadline = time.monotonic() + 10 * REATTACH_WAIT_S
        while not sim.events("vm_reattached") and time.monotonic() < deadline:
            await sim.tick(d)
            await asyncio.sleep(POLL_INTERVAL_S / 4)  # re-attach attempts pace themselves
        back = sim.events("vm_reattached", vm="dying")
        assert back and back[0]["pid"] == dying.pid
        assert "dying" not in d.waiting and managed(d, "dying").pid == dying.pid
        await sim.tick(d)
        assert sim.last_tick("dying")["tick"] == d.ticks - 1
        assert len(sim.events("vm_gone")) == 1

    run(sim, scenario)


# -- 7. reload ------------------------------------------------------------------------------------
def test_reload_adds_removes_changes_and_refuses_a_bad_config(sim: Sim) -> None:
    h = sim.host
    for n in ("a", "b", "c", "d"):
        h.guest(n, resident_bytes=1 * GiB)
    sim.write_config({"a": 'min = "512M"', "b": 'min = "512M"'})
    h.set_available(2 * GiB)

    async def scenario(d: Daemon) -> None:
        await sim.tick(d)
        sim.write_config({"a": 'min = "512M"\nshares = 3000', "c": 'min = "512M"'})
        await d.reload()
        reload = sim.events("reload")[-1]
        assert reload["added"] == ["c"] and reload["removed"] == ["b"]
        assert sorted(m.name for m in d.vms) == ["a", "c"]
        assert managed(d, "a").cfg.shares == 3000
        b_handles = [v for v in h.handles if v.name == "b"]
        assert all(v.state is not VMState.ATTACHED for v in b_handles)
        await sim.tick(d)
        assert sim.last_tick("c")["tick"] == d.ticks - 1
        assert not [e for e in sim.events("tick", vm="b") if e["tick"] == d.ticks - 1]

        before = d.config
        # A new VM that fits, and one whose min no admission can give: refused whole.
        sim.write_config({"a": 'min = "512M"', "c": 'min = "512M"', "d": 'min = "512M"',
                          "huge": 'min = "7G"'})
        h.guest("huge", ram_bytes=8 * GiB)
        await d.reload()
        refused = sim.events("reload_refused")
        assert refused and "huge" in refused[-1]["error"]
        assert d.config is before and sorted(m.name for m in d.vms) == ["a", "c"]
        assert managed(d, "a").cfg.shares == 3000
        assert all(v.state is not VMState.ATTACHED for v in h.handles if v.name in ("d", "huge"))
        # A file that does not parse is refused the same way.
        sim.config_path.write_text("[host]\npoll_interval_s = -1\n")
        await d.reload()
        assert len(sim.events("reload_refused")) == 2 and d.config is before
        await sim.tick(d)
        assert {e["vm"] for e in sim.events("tick") if e["tick"] == d.ticks - 1} == {"a", "c"}

    run(sim, scenario)


def test_event_log_is_json_lines(sim: Sim) -> None:
    """The simulation's log is the real one: every line parses and names its event."""
    sim.host.guest("a")
    sim.write_config({"a": 'min = "512M"'})
    sim.host.set_available(1 * GiB)

    async def scenario(d: Daemon) -> None:
        await sim.tick(d, 2)

    run(sim, scenario)
    lines = sim.log_path.read_text().splitlines()
    assert all("event" in json.loads(line) for line in lines)
    assert [e["event"] for e in sim.events()][:2] == ["sampler_unavailable", "start"]


# -- 8. the idle cadence ---------------------------------------------------------------------------
def test_an_idle_host_reads_its_vms_rarely_and_all_at_once_under_pressure(sim: Sim) -> None:
    h = sim.host
    guests = [h.guest(n, resident_bytes=1 * GiB) for n in ("a", "b")]
    sim.write_config({"a": 'min = "512M"', "b": 'min = "512M"'}, host="idle_collect_s = 20")
    h.set_available(4 * GiB)

    async def scenario(d: Daemon) -> None:
        await sim.tick(d)  # the first tick reads every VM
        assert all(g.calls for g in guests)
        # Until hv knows what each guest needs (its boot reserve from three reports, then
        # two that agree), every VM is read every tick: pressure may come at any moment.
        ticks = 1
        while any(managed(d, g.name).need_bytes is None for g in guests):
            calls = [len(g.calls) for g in guests]
            await sim.tick(d)
            ticks += 1
            assert all(len(g.calls) > c for g, c in zip(guests, calls)), f"tick {ticks}"
            assert ticks <= 8, "the need never settled"
        calls = [len(g.calls) for g in guests]
        await sim.tick(d, 5)  # high, nothing to do: nobody is asked anything
        assert [len(g.calls) for g in guests] == calls
        assert len(sim.events("tick")) == 2 * ticks
        h.set_available(int(SOFT_BYTES * 0.75))  # real pressure: soft
        await sim.tick(d)
        assert d.state is MemState.SOFT
        assert all(len(g.calls) > c for g, c in zip(guests, calls)), "read at once"
        assert len(sim.events("tick")) == 2 * ticks + 2

    run(sim, scenario)


# -- KSM opt-out (issue 9) ------------------------------------------------------------------
def test_ksm_opt_out_by_config_and_by_the_admin(sim: Sim) -> None:
    """``ksm = false`` takes a VM out at the first tick; the admin's record takes another
    out and back in, live; a VM whose merging someone else turned off stays off."""
    from hv.sharing import optout

    h = sim.host
    tenant, other, theirs = h.guest("tenant"), h.guest("other"), h.guest("theirs")
    theirs.merge = False  # its QEMU was started with merge=off
    sim.write_config({"tenant": 'min = "512M"\nksm = false', "other": 'min = "512M"',
                      "theirs": 'min = "512M"'})

    async def scenario(d: Daemon) -> None:
        await sim.tick(d)
        assert not tenant.merge and other.merge and not theirs.merge
        assert [e["vm"] for e in sim.events("ksm_opt_out")] == ["tenant"]
        assert [t.name for t in d._share_targets()] == ["other"]
        optout.set_admin_choice("other", False)
        await sim.tick(d)
        assert not other.merge and managed(d, "other").merge_off_by_hv
        optout.set_admin_choice("other", True)
        await sim.tick(d)
        assert other.merge and [e["vm"] for e in sim.events("ksm_opt_in")] == ["other"]
        await sim.tick(d, 3)
        assert not theirs.merge and ("qom-set merge", 1) not in theirs.calls
        assert tenant.calls.count(("qom-set merge", 0)) == 1  # once, not every tick

    run(sim, scenario)
