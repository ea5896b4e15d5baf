"""Hypervisor swap frees host memory: what MADV_PAGEOUT leaves in the swap cache is
released by per-node reclaim (:mod:`hv.host.reclaim`), on the real host kernel."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hv.guardian import GuardFile
from hv.host import native, reclaim
from hv.host.proc import meminfo
from hv.sampler import page_out_random
from hv.units import MiB, PAGE_SIZE
from tests.functional.hvrun import swap_fixture

pytestmark = pytest.mark.skipif(not reclaim.nodes(),
                                reason="the kernel has no per-node proactive reclaim")

TOUCHED_MIB = 128

# A process holding argv[1] MiB of distinct anonymous pages, which prints where; with
# "read", it then reads them at random for ever (a guest using its memory).
HOLDER = """
import ctypes, mmap, random, sys
m = mmap.mmap(-1, int(sys.argv[1]) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(m), 4096):
    m[i:i + 8] = i.to_bytes(8, "little")
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
if sys.argv[2] == "read":
    pages, s = len(m) // 4096, 0
    while True:
        s += m[random.randrange(pages) * 4096]
sys.stdin.read()
"""


@contextlib.contextmanager
def holding(mib: int, mode: str = "idle") -> Iterator[tuple[int, int]]:
    """(pid, address) of a HOLDER process, killed at the end."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(mib), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        yield p.pid, int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()


def vmswap_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSwap:"))


@pytest.fixture(scope="module")
def host_swap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from swap_fixture(tmp_path_factory)


@pytest.fixture
def holder() -> Iterator[tuple[int, int]]:
    with holding(TOUCHED_MIB) as h:
        yield h


def test_release_frees_what_pageout_left_in_the_swap_cache(
        host_swap: None, holder: tuple[int, int]) -> None:
    pid, addr = holder
    ratio = Path(reclaim.MIN_UNMAPPED_RATIO).read_text().strip()
    out = native.pageout(pid, [addr + i * PAGE_SIZE for i in range(TOUCHED_MIB * MiB // PAGE_SIZE)])
    paged = out.invalidated * PAGE_SIZE
    assert paged >= 0.9 * TOUCHED_MIB * MiB, "the holder's pages should go to swap"
    cached = meminfo()["SwapCached"]
    # What the kernel leaves: written to swap, still in memory.
    assert cached >= 0.9 * paged, f"SwapCached {cached / MiB:.0f} MiB after paging out"
    used = meminfo()["SwapTotal"] - meminfo()["SwapFree"]

    remembered: list[dict[str, str]] = []
    r = reclaim.release(paged, remembered.append)

    assert r.problem is None
    assert r.freed_bytes >= 0.8 * paged, f"freed {r.freed_bytes / MiB:.0f} of {paged / MiB:.0f} MiB"
    assert meminfo()["SwapCached"] <= cached - 0.8 * paged
    # The pages freed are the ones paged out: little else went to swap with them.
    more = meminfo()["SwapTotal"] - meminfo()["SwapFree"] - used
    assert more <= 0.25 * paged, f"{more / MiB:.0f} MiB more swapped by the release"
    # The tunable is back, and was recorded while lowered.
    assert Path(reclaim.MIN_UNMAPPED_RATIO).read_text().strip() == ratio
    if ratio != "0" and Path(reclaim.ZONE_RECLAIM_MODE).read_text().strip() == "0":
        assert remembered == [{reclaim.MIN_UNMAPPED_RATIO: ratio}, {}]


def test_release_leaves_an_idle_neighbour_alone(host_swap: None) -> None:
    """A process that reads its memory back while it is paged out keeps the pages just
    written off the tail of the inactive list, where the kernel reclaims; one request
    for all that was paged out then swapped the idle neighbour's pages instead
    (measured here: 100 and 110 MiB of it for 310 MiB paged out).  The release stops at the
    first step that writes pages no page-out chose, and says what it wrote."""
    rounds, chunk = 10, 32 * MiB
    with holding(256) as (neighbour, _), holding(256, "read") as (pid, addr):
        rng = np.random.default_rng(1)
        paged = freed = collateral = 0
        time.sleep(1)  # the reader under way
        for _ in range(rounds):
            _, out = page_out_random(pid, [(addr, 256 * MiB)], chunk // PAGE_SIZE, rng)
            r = reclaim.release(out * PAGE_SIZE, lambda _: None)
            assert r.problem is None
            paged += out * PAGE_SIZE
            freed += r.freed_bytes
            collateral += r.collateral_bytes
            time.sleep(0.5)  # a tick's pace: the reader takes back what it uses
        swapped = vmswap_bytes(neighbour)
    print(f"paged out {paged / MiB:.0f} MiB, freed {freed / MiB:.0f}, collateral "
          f"{collateral / MiB:.1f}, the neighbour's swap {swapped / MiB:.1f} MiB")
    assert paged >= rounds * chunk // 2, "the reader's pages should go to swap"
    # Stopping early frees no less: what is not at the tail the kernel would not free.
    assert freed >= paged // 4, f"freed {freed / MiB:.0f} of {paged / MiB:.0f} MiB paged out"
    assert swapped <= paged // 10, (
        f"the idle neighbour got {swapped / MiB:.0f} MiB swapped for {paged / MiB:.0f} MiB paged out")
    # What the neighbour lost, the releases counted (other pages can be swapped too).
    assert collateral >= swapped - 1 * MiB


def test_guardian_puts_back_a_tunable_hv_died_holding(tmp_path: Path) -> None:
    path = Path(reclaim.MIN_UNMAPPED_RATIO)
    original = path.read_text().strip()
    lowered = "0" if original != "0" else "1"
    guard = GuardFile(tmp_path / "guard.json")
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        guard.remember_sysctls({str(path): original})  # what release() records ...
        path.write_text(lowered)                        # ... before it lowers the ratio
        done = subprocess.run([sys.executable, "-m", "hv.guardian", str(dead.pid),
                               str(guard.path)], capture_output=True, text=True, timeout=60,
                              env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])})
        assert done.returncode == 0, done.stderr
        assert path.read_text().strip() == original
        assert f"restored {path}={original}" in done.stderr
        assert not guard.path.exists()
    finally:
        path.write_text(original)


def test_doctor_says_paged_out_memory_is_freed() -> None:
    from hv.host import doctor

    check = next(c for c in doctor.run_checks() if c.name == "node_reclaim")
    assert check.verdict == "ok", check.reason
