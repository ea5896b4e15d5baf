"""VM time from run-state and run-queue observations (hv.policy.vmtime), and sampling
periods that count it (hv.sampler.Sampler.period, with the page work faked)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.errors import VMGone
from hv.host import proc
from hv.policy.vmtime import MAX_INTERVAL_S, VMClock
from hv.sampler import MAX_STRETCH, MIN_VM_FRACTION, SampleResult, Sampler


def feed(clock: VMClock, *obs: tuple[float, bool, float]) -> float:
    for wall_s, running, wait_s in obs:
        clock.observe(wall_s, running, wait_s)
    return clock.seconds


def test_nothing_counts_before_two_observations() -> None:
    clock = VMClock()
    assert clock.seconds == 0.0 and clock.running is None
    clock.observe(100.0, True, 0.0)
    assert clock.seconds == 0.0 and clock.observations == 1 and clock.running is True


def test_a_running_vm_with_a_cpu_of_its_own_counts_wall_time() -> None:
    assert feed(VMClock(), (0.0, True, 5.0), (1.0, True, 5.0), (3.0, True, 5.0)) == pytest.approx(3.0)


def test_a_paused_vm_counts_nothing() -> None:
    assert feed(VMClock(), *[(float(t), False, 0.0) for t in range(20)]) == 0.0


def test_an_interval_counts_only_if_running_at_both_ends() -> None:
    clock = VMClock()
    # running -> paused (1 s lost), paused -> paused, paused -> running (1 s lost), running -> running.
    feed(clock, (0.0, True, 0.0), (1.0, False, 0.0), (2.0, False, 0.0), (3.0, True, 0.0),
         (4.5, True, 0.0))
    assert clock.seconds == pytest.approx(1.5)


def test_run_queue_wait_is_taken_off() -> None:
    # Half of each second spent runnable but waiting for a host CPU.
    obs = [(float(t), True, 0.5 * t) for t in range(11)]
    assert feed(VMClock(), *obs) == pytest.approx(5.0)


def test_wait_growth_is_clamped_to_the_interval() -> None:
    # The mean over vCPU threads jumped by more than the interval (a thread set change).
    assert feed(VMClock(), (0.0, True, 0.0), (1.0, True, 7.0), (2.0, True, 7.0)) == pytest.approx(1.0)


def test_a_falling_wait_counts_as_no_wait() -> None:
    # A vCPU thread exited and the mean went down: the interval counts whole.
    assert feed(VMClock(), (0.0, True, 3.0), (2.0, True, 1.0)) == pytest.approx(2.0)


def test_a_gap_too_long_to_vouch_for_does_not_count() -> None:
    clock = VMClock()
    feed(clock, (0.0, True, 0.0), (MAX_INTERVAL_S + 1, True, 0.0), (MAX_INTERVAL_S + 2, True, 0.0))
    assert clock.seconds == pytest.approx(1.0)
    assert feed(VMClock(max_interval_s=100), (0.0, True, 0.0), (50.0, True, 0.0)) == 50.0


def test_bad_observations_are_refused() -> None:
    clock = VMClock()
    clock.observe(10.0, True, 0.0)
    with pytest.raises(ValueError):
        clock.observe(9.0, True, 0.0)
    with pytest.raises(ValueError):
        clock.observe(11.0, True, -1.0)
    with pytest.raises(ValueError):
        VMClock(max_interval_s=0)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.floats(0, 40), st.booleans(), st.floats(0, 50)), max_size=40))
def test_vm_time_never_exceeds_wall_time_and_never_falls(
        steps: list[tuple[float, bool, float]]) -> None:
    clock = VMClock()
    wall_s = 0.0
    wait_s = 0.0
    previous = 0.0
    for dt, running, dwait in steps:
        wall_s += dt
        wait_s = max(0.0, wait_s + dwait - 10)  # may fall, as a changing thread set can
        clock.observe(wall_s, running, wait_s)
        assert previous <= clock.seconds <= wall_s + 1e-9
        previous = clock.seconds


# -- Sampler.period on VM time (the page work faked: no guest needed) ---------------

class FakeSampler(Sampler):
    """Sampler whose page work is a script: touched-so-far grows by one per poll."""

    def __init__(self) -> None:
        super().__init__(pid=0, ranges=[], sample_pages=10)
        self.polls = 0

    def begin(self) -> int:
        self._sample = np.zeros(10, dtype=np.uint64)
        return 10

    def touched_so_far(self) -> int:
        self.polls += 1
        return min(self.polls, 10)

    def end(self) -> SampleResult:
        touched = self.touched_so_far()
        self._sample = None
        return SampleResult(touched=touched, sampled=10, dropped=0, sampleable=100, present=200)


PERIOD_S = 0.2


def run_period(vm_rate: float | None, partial: list[tuple[int, int]] | None = None) -> SampleResult:
    """One period of a VM that runs ``vm_rate`` seconds per wall second (None: wall time)."""
    sampler = FakeSampler()
    start_s = time.monotonic()
    clock = None if vm_rate is None else (lambda: vm_rate * (time.monotonic() - start_s))
    on_partial = None if partial is None else (lambda t, n: partial.append((t, n)))
    return asyncio.run(sampler.period(PERIOD_S, vm_clock=clock, on_partial=on_partial))


def test_wall_time_period_as_before() -> None:
    res = run_period(None)
    assert res.discarded is None and res.fraction is not None
    assert res.wall_s is not None and res.vm_s == res.wall_s
    assert PERIOD_S <= res.wall_s < PERIOD_S * 1.5 + 0.5


def test_a_vm_running_half_the_time_stretches_its_period() -> None:
    res = run_period(0.5)
    assert res.discarded is None and res.fraction is not None
    assert res.vm_s is not None and res.wall_s is not None
    assert res.vm_s >= PERIOD_S and res.wall_s >= 2 * PERIOD_S


def test_a_paused_vm_stretches_to_the_cap_and_is_discarded() -> None:
    res = run_period(0.0)
    assert res.discarded is not None and "paused" in res.discarded
    assert res.fraction is None and res.vm_s == 0.0
    assert res.wall_s is not None and res.wall_s >= MAX_STRETCH * PERIOD_S


def test_a_vm_that_ran_half_a_period_by_the_cap_is_kept() -> None:
    res = run_period(0.8 / MAX_STRETCH)  # 0.8 periods of VM time by the cap
    assert res.discarded is None and res.fraction is not None
    assert res.vm_s is not None and MIN_VM_FRACTION * PERIOD_S <= res.vm_s < PERIOD_S


def test_partial_counts_arrive_at_each_poll_and_only_grow() -> None:
    partial: list[tuple[int, int]] = []
    res = run_period(None, partial)
    assert len(partial) >= 5  # polls every period/10
    assert [t for t, _ in partial] == sorted(t for t, _ in partial)
    assert {n for _, n in partial} == {10}
    assert res.touched >= partial[-1][0]


def test_a_cancelled_period_leaves_the_sampler_ready_for_the_next() -> None:
    sampler = FakeSampler()

    async def go() -> None:
        task = asyncio.create_task(sampler.period(10.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert not sampler.running


# -- the run-queue wait of vCPU threads, read from this host's real /proc ------------

PR_SET_NAME = 15  # linux/prctl.h


def run_delay_s(pid: int, tid: int) -> float:
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


@pytest.fixture
def vcpu_named_thread() -> Iterator[int]:
    """A thread of this process named as QEMU names a vCPU thread; yields its tid."""
    named = threading.Event()
    done = threading.Event()
    tid: list[int] = []

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(PR_SET_NAME, b"CPU 0/TCG", 0, 0, 0) == 0
        tid.append(threading.get_native_id())
        named.set()
        done.wait()

    t = threading.Thread(target=body)
    t.start()
    try:
        assert named.wait(10)
        yield tid[0]
    finally:
        done.set()
        t.join()


def test_vcpu_threads_are_found_by_name(vcpu_named_thread: int) -> None:
    pid = os.getpid()
    assert proc.vcpu_threads(pid) == [vcpu_named_thread]
    # A blocked thread's wait does not grow: the mean of one thread is its own.
    assert proc.vcpu_runqueue_wait_s(pid) == pytest.approx(run_delay_s(pid, vcpu_named_thread))
    assert proc.vcpu_runqueue_wait_s(pid, tids=[pid]) == pytest.approx(run_delay_s(pid, pid), abs=0.05)


def test_unnamed_threads_fall_back_to_the_sum_over_non_main_threads() -> None:
    # python -c: a main thread plus two sleeping helpers, none named as a vCPU.
    child = subprocess.Popen([
        "python3", "-c",
        "import threading,time\n"
        "ts=[threading.Thread(target=time.sleep,args=(30,)) for _ in range(2)]\n"
        "[t.start() for t in ts]\nprint(flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        pid = child.pid
        assert proc.vcpu_threads(pid) == []
        helpers = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        assert len(helpers) == 2
        expected = sum(run_delay_s(pid, t) for t in helpers)
        assert proc.vcpu_runqueue_wait_s(pid) == pytest.approx(expected)
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_is_vm_gone() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(VMGone):
        proc.vcpu_runqueue_wait_s(child.pid, "vm1")
    with pytest.raises(VMGone):
        proc.vcpu_threads(child.pid)
