"""Hypervisor swap frees host memory: what MADV_PAGEOUT leaves in the swap cache is
released by per-node reclaim (:mod:`hv.host.reclaim`), on the real host kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.guardian import GuardFile
from hv.host import native, reclaim
from hv.host.proc import meminfo
from hv.units import MiB, PAGE_SIZE
from tests.functional.hvrun import swap_fixture

pytestmark = pytest.mark.skipif(not reclaim.nodes(),
                                reason="the kernel has no per-node proactive reclaim")

TOUCHED_MIB = 128

# A process holding TOUCHED_MIB of distinct anonymous pages, which prints where.
HOLDER = f"""
import ctypes, mmap, sys
m = mmap.mmap(-1, {TOUCHED_MIB} << 20)
for i in range(0, len(m), 4096):
    m[i:i + 8] = i.to_bytes(8, "little")
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def host_swap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from swap_fixture(tmp_path_factory)


@pytest.fixture
def holder() -> Iterator[tuple[int, int]]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        yield p.pid, int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()


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
