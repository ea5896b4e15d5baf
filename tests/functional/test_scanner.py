"""The native scanner against real processes: a victim spawned here, and a real QEMU.

The victim maps a region without huge pages and fills it with known content:
unique pages, duplicates, pages written and zeroed again, pages only read (they
map the shared zero page) and pages never touched.  Expected hashes are computed
from the same content here, with the ``xxhash`` package, not from the scanner.
Presence is checked by reading /proc/PID/pagemap directly, not through hv.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from hv.host import native
from hv.host.native import PageFlags
from hv.units import MiB, PAGE_SIZE
from tests.conftest import kill_pid, wait_for


SEED = 7
UNIQUE, DUP, ZERO_WRITTEN, ZERO_MAPPED, UNTOUCHED = 64, 32, 16, 16, 32
PATTERNS = 4  # the DUP pages repeat this many patterns
PAGES = UNIQUE + DUP + ZERO_WRITTEN + ZERO_MAPPED + UNTOUCHED
FIRST_DUP = UNIQUE
FIRST_ZW = FIRST_DUP + DUP
FIRST_ZM = FIRST_ZW + ZERO_WRITTEN
FIRST_UT = FIRST_ZM + ZERO_MAPPED

# argv: pages seed fill_mib mergeable(0/1) churn(0/1)
VICTIM = r"""
import ctypes, json, mmap, random, sys
pages, seed, fill_mib, mergeable, churn = (int(a) for a in sys.argv[1:6])
UNIQUE, DUP, ZW, ZM, PATTERNS = 64, 32, 16, 16, 4
m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
if mergeable:
    m.madvise(mmap.MADV_MERGEABLE)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
rng = random.Random(seed)
for i in range(UNIQUE):
    m[i * 4096:(i + 1) * 4096] = rng.randbytes(4096)
for i in range(UNIQUE, UNIQUE + DUP):
    m[i * 4096:(i + 1) * 4096] = bytes([0x40 + i % PATTERNS]) * 4096
for i in range(UNIQUE + DUP, UNIQUE + DUP + ZW):
    m[i * 4096] = 1
    m[i * 4096] = 0
for i in range(UNIQUE + DUP + ZW, UNIQUE + DUP + ZW + ZM):
    _ = m[i * 4096]
big = None
if fill_mib:
    big = mmap.mmap(-1, fill_mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = rng.randbytes(1 << 20)
    for off in range(0, fill_mib << 20, 1 << 20):
        big[off:off + (1 << 20)] = chunk
info = {"base": base, "pages": pages}
if big is not None:
    info["big"] = ctypes.addressof(ctypes.c_char.from_buffer(big))
    info["big_len"] = fill_mib << 20
if churn:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    n = 1024
    addr = libc.mmap(None, n * 4096, 3, 0x22, -1, 0)
    info["churn"] = addr
    info["churn_len"] = n * 4096
    print(json.dumps(info), flush=True)
    while True:  # unmap and map again, touching every page, until killed
        libc.munmap(addr, n * 4096)
        libc.mmap(addr, n * 4096, 3, 0x32, -1, 0)  # MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED
        ctypes.memset(addr, 0x5A, n * 4096)
print(json.dumps(info), flush=True)
sys.stdin.readline()
"""


class Victim:
    """A child process with known memory; killed at teardown."""

    def __init__(self, *, fill_mib: int = 0, mergeable: bool = False, churn: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", VICTIM, str(PAGES), str(SEED), str(fill_mib),
             str(int(mergeable)), str(int(churn))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"victim failed to start (exit {self.proc.returncode})")
        self.info: dict[str, int] = json.loads(line)
        self.pid = self.proc.pid
        self.base = self.info["base"]
        self.range = (self.base, PAGES * PAGE_SIZE)

    def addr(self, page: int) -> int:
        return self.base + page * PAGE_SIZE

    def kill(self) -> None:
        kill_pid(self.pid)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def victims() -> Iterator[list[Victim]]:
    spawned: list[Victim] = []
    yield spawned
    for v in spawned:
        v.kill()


@pytest.fixture
def victim(victims: list[Victim]) -> Victim:
    v = Victim()
    victims.append(v)
    return v


def expected_content() -> list[bytes]:
    """The victim's page contents (untouched and zero-mapped pages read as zeros)."""
    rng = random.Random(SEED)
    pages = [rng.randbytes(PAGE_SIZE) for _ in range(UNIQUE)]
    pages += [bytes([0x40 + i % PATTERNS]) * PAGE_SIZE for i in range(FIRST_DUP, FIRST_ZW)]
    pages += [bytes(PAGE_SIZE)] * (ZERO_WRITTEN + ZERO_MAPPED + UNTOUCHED)
    return pages


def pagemap(pid: int, start: int, length: int) -> np.ndarray:
    """Raw pagemap entries, read independently of hv."""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        data = os.pread(f.fileno(), length // PAGE_SIZE * 8, start // PAGE_SIZE * 8)
    return np.frombuffer(data, dtype=np.uint64)


def present_mask(pid: int, start: int, length: int) -> np.ndarray:
    return (pagemap(pid, start, length) >> np.uint64(63)) == 1


def test_hashes_equal_xxh3_of_the_content(victim: Victim) -> None:
    res = native.scan(victim.pid, [victim.range])
    content = expected_content()
    read = np.flatnonzero(res.has(PageFlags.READ))
    assert list(read) == list(range(FIRST_ZM)), "unique, duplicate and zero-written pages are read"
    for i in read:
        assert int(res.hashes[i]) == xxhash.xxh3_64_intdigest(content[i]), f"page {i}"
    # Duplicates hash alike; unique pages do not.
    dup_hashes = {int(res.hashes[i]) for i in range(FIRST_DUP, FIRST_ZW)}
    assert len(dup_hashes) == PATTERNS
    assert len({int(h) for h in res.hashes[:UNIQUE]}) == UNIQUE


def test_flags_and_counts_by_kind_of_page(victim: Victim) -> None:
    res = native.scan(victim.pid, [victim.range], all_frame_flags=True)
    f = res.flags
    assert res.pages == PAGES
    assert res.present == FIRST_UT
    assert res.read == FIRST_ZM
    assert res.zero == ZERO_WRITTEN + ZERO_MAPPED
    assert res.zero_page == ZERO_MAPPED
    assert res.ksm == 0 and res.swapped == 0 and res.vanished == 0 and res.noflags == 0
    for i in range(FIRST_ZW):
        assert PageFlags(int(f[i])) & (PageFlags.PRESENT | PageFlags.READ | PageFlags.ZERO) == \
            PageFlags.PRESENT | PageFlags.READ
    for i in range(FIRST_ZW, FIRST_ZM):
        assert PageFlags(int(f[i])) & (PageFlags.READ | PageFlags.ZERO | PageFlags.ZERO_PAGE) == \
            PageFlags.READ | PageFlags.ZERO
    zero_page = res.flags[FIRST_ZM:FIRST_UT]
    assert all(PageFlags(int(x)) & PageFlags.ZERO_PAGE for x in zero_page)
    assert not any(PageFlags(int(x)) & PageFlags.READ for x in zero_page), "the zero page is not read"
    assert len({int(p) for p in res.pfns[FIRST_ZM:FIRST_UT]}) == 1, "all map one zero-page frame"
    assert not res.flags[FIRST_UT:].any() and not res.hashes[FIRST_UT:].any()
    assert not res.pfns[FIRST_UT:].any()
    assert res.pfns[:FIRST_ZM].all()
    # The default (frame flags for shared pages only) finds the same zero pages.
    quick = native.scan(victim.pid, [victim.range])
    assert quick.zero_page == ZERO_MAPPED and np.array_equal(quick.hashes, res.hashes)


def test_scan_faults_nothing_in(victim: Victim) -> None:
    before = present_mask(victim.pid, *victim.range)
    assert before.sum() == FIRST_UT
    for _ in range(3):
        native.scan(victim.pid, [victim.range])
    after = present_mask(victim.pid, *victim.range)
    assert np.array_equal(before, after)
    assert not after[FIRST_UT:].any(), "untouched pages stay untouched"


def test_several_ranges_concatenate(victim: Victim) -> None:
    whole = native.scan(victim.pid, [victim.range])
    split = FIRST_ZW * PAGE_SIZE
    parts = native.scan(victim.pid, [(victim.base + split, PAGES * PAGE_SIZE - split),
                                     (victim.base, split)])
    assert np.array_equal(parts.hashes, np.concatenate([whole.hashes[FIRST_ZW:], whole.hashes[:FIRST_ZW]]))
    assert parts.read == whole.read


def test_present_matches_pagemap(victim: Victim) -> None:
    addrs = [victim.addr(i) for i in range(PAGES)]
    random.Random(1).shuffle(addrs)
    got = native.present(victim.pid, addrs)
    truth = present_mask(victim.pid, *victim.range)
    for a, g in zip(addrs, got):
        assert bool(g & PageFlags.PRESENT) == bool(truth[(a - victim.base) // PAGE_SIZE])
    # Sorted addresses take the coalesced path; same answer.
    sorted_got = native.present(victim.pid, sorted(addrs))
    assert np.array_equal((sorted_got & PageFlags.PRESENT) != 0, truth)


def test_a_pid_that_does_not_exist(victim: Victim) -> None:
    victim.kill()
    for call in (lambda: native.scan(victim.pid, [victim.range]),
                 lambda: native.present(victim.pid, [victim.base]),
                 lambda: native.pageout(victim.pid, [victim.base])):
        with pytest.raises(native.ProcessGone) as info:
            call()
        assert info.value.errno == errno.ESRCH
        assert str(victim.pid) in str(info.value)


def test_a_process_exiting_mid_scan(victims: list[Victim]) -> None:
    v = Victim(fill_mib=256)
    victims.append(v)
    big = (v.info["big"], v.info["big_len"])
    outcome: list[BaseException | None] = []
    scans = [0]

    def scan_until_error() -> None:
        try:
            while True:
                native.scan(v.pid, [big])
                scans[0] += 1
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    t = threading.Thread(target=scan_until_error)
    t.start()
    wait_for(lambda: scans[0] >= 1, 30, "a first complete scan")
    os.kill(v.pid, 9)  # lands in the middle of a scan most of the time
    t.join(30)
    assert not t.is_alive()
    assert isinstance(outcome[0], native.ProcessGone), outcome


def test_pages_unmapped_during_the_scan_are_not_errors(victims: list[Victim]) -> None:
    v = Victim(churn=True)
    victims.append(v)
    churn = (v.info["churn"], v.info["churn_len"])
    vanished = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        res = native.scan(v.pid, [churn])
        vanished += res.vanished
        read = res.has(PageFlags.READ)
        gone = res.has(PageFlags.VANISHED)
        assert not (read & gone).any()
        assert not ((read | gone) & ~res.has(PageFlags.PRESENT)).any()
        assert res.read + res.vanished <= res.present
    # How often a page vanishes between pagemap and pread is up to the scheduler;
    # the contract tested is that it never fails the scan.
    print(f"vanished pages seen: {vanished}")


# --- page-out (needs host swap) -------------------------------------------------


@pytest.fixture
def swap(tmp_path: Path) -> Iterator[Path]:
    """A 256 MiB swap file for the test; swapped off and removed at teardown."""
    if not shutil.which("mkswap") or not shutil.which("swapon"):
        pytest.fail("mkswap/swapon not installed: run scripts/setup.sh")
    path = Path("/var/tmp") / f"hvtest-{os.getpid()}-{tmp_path.name}.swap"
    subprocess.run(["fallocate", "-l", str(256 * MiB), str(path)], check=True)
    try:
        path.chmod(0o600)
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        subprocess.run(["swapon", str(path)], check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["swapoff", str(path)], check=True, capture_output=True)
    finally:
        path.unlink(missing_ok=True)
    with open("/proc/swaps") as f:
        assert str(path) not in f.read(), "the test's swap file is still active"


def test_pageout_makes_pages_not_present(victim: Victim, swap: Path) -> None:
    targets = [victim.addr(i) for i in range(0, UNIQUE, 2)]
    res = native.pageout(victim.pid, targets)
    assert res.advised_bytes == len(targets) * PAGE_SIZE
    assert not res.still_present.any(), "anonymous pages go to swap"
    truth = present_mask(victim.pid, *victim.range)
    assert not truth[0:UNIQUE:2].any() and truth[1:UNIQUE:2].all()
    # A scan sees them swapped and does not bring them back.
    scan = native.scan(victim.pid, [victim.range])
    assert scan.swapped == len(targets)
    assert np.array_equal(present_mask(victim.pid, *victim.range), truth)
    # Zero-page mappings cannot be invalidated: they stay present and are reported.
    zero = [victim.addr(i) for i in range(FIRST_ZM, FIRST_UT)]
    res = native.pageout(victim.pid, zero)
    assert res.still_present.all() and res.invalidated == 0


def test_pageout_across_many_iovecs(victims: list[Victim], swap: Path) -> None:
    v = Victim(fill_mib=16)
    victims.append(v)
    # Every other page: 2048 separate iovecs, more than one IOV_MAX batch.
    addrs = v.info["big"] + PAGE_SIZE * np.arange(0, v.info["big_len"] // PAGE_SIZE, 2, dtype=np.uint64)
    res = native.pageout(v.pid, addrs)
    assert res.advised_bytes == len(addrs) * PAGE_SIZE
    # Page-out is best effort: a page the kernel holds at that moment (a huge page being
    # split or migrated) stays.  What matters is that all batches were advised and that
    # what is reported still present really is.
    assert res.invalidated >= len(addrs) * 0.99, res.invalidated
    now = (native.present(v.pid, addrs) & np.uint8(int(native.PageFlags.PRESENT))) != 0
    assert np.array_equal(now, res.still_present)


# --- KSM (optional: needs /sys/kernel/mm/ksm) ---------------------------------

KSM = Path("/sys/kernel/mm/ksm")


@pytest.fixture
def ksm_running() -> Iterator[None]:
    """KSM scanning fast for the test; the previous settings are restored."""
    if not (KSM / "run").exists():
        pytest.fail("no KSM in this kernel")
    names = ("run", "pages_to_scan", "sleep_millisecs")
    old = {n: (KSM / n).read_text().strip() for n in names}
    try:
        (KSM / "pages_to_scan").write_text("5000")
        (KSM / "sleep_millisecs").write_text("10")
        (KSM / "run").write_text("1")
        yield
    finally:
        for n in ("pages_to_scan", "sleep_millisecs", "run"):
            (KSM / n).write_text(old[n])


def ksm_merging_pages(pid: int) -> int:
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "ksm_merging_pages":
            return int(value)
    raise AssertionError("no ksm_merging_pages in ksm_stat")


def test_ksm_pages_are_known_by_frame_and_not_unmerged(victims: list[Victim], ksm_running: None) -> None:
    v = Victim(mergeable=True)
    victims.append(v)
    dup = (v.addr(FIRST_DUP), DUP * PAGE_SIZE)
    res = wait_for(lambda: (r := native.scan(v.pid, [dup])).ksm == DUP and r, 60,
                   "KSM to merge the duplicate pages")
    assert res.read == 0, "KSM pages are not read"
    assert len({int(p) for p in res.pfns}) == PATTERNS, "one shared frame per pattern"
    merging = ksm_merging_pages(v.pid)
    for _ in range(5):
        native.scan(v.pid, [v.range])
    assert ksm_merging_pages(v.pid) == merging, "scanning does not unmerge"
    after = native.scan(v.pid, [dup])
    assert after.ksm == DUP and np.array_equal(after.pfns, res.pfns)
    # Shared frames cannot be paged out by one sharer: pageout reports them.
    # (Without swap the kernel keeps every anonymous page; either way they stay.)
    out = native.pageout(v.pid, [v.addr(i) for i in range(FIRST_DUP, FIRST_ZW)])
    assert out.still_present.all()


# --- a real QEMU guest ---------------------------------------------------------


class Qemu:
    """A stopped (-S) 128 MiB TCG guest with mergeable RAM and a QMP socket."""

    def __init__(self, tmp: Path) -> None:
        self.sock = tmp / "qmp.sock"
        self.log = tmp / "qemu.log"
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "128",
             "-object", "memory-backend-ram,id=ram0,size=128M,merge=on",
             "-machine", "pc,memory-backend=ram0", "-display", "none", "-nodefaults", "-S",
             "-qmp", f"unix:{self.sock},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None, 30, "QEMU's QMP socket")
        if self.proc.poll() is not None:
            raise AssertionError(f"qemu exited: {self.log.read_text(errors='replace')}")

    def hmp(self, *commands: str) -> list[str]:
        from qemu.qmp import QMPClient

        async def go() -> list[str]:
            qmp = QMPClient("hv-test")
            await qmp.connect(str(self.sock))
            try:
                out: list[str] = []
                for c in commands:
                    if c in ("stop", "cont"):
                        await qmp.execute(c)
                        out.append("")
                    else:
                        res: Any = await qmp.execute("human-monitor-command", {"command-line": c})
                        out.append(str(res))
                return out
            finally:
                await qmp.disconnect()
        return asyncio.run(go())

    def ram_range(self) -> tuple[int, int]:
        (text,) = self.hmp("gpa2hva 0")
        # "Host virtual address for 0x0 (ram0) is 0x7f..."
        return int(text.split()[-1], 16), 128 * MiB


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 not installed: run scripts/setup.sh")
    q = Qemu(tmp_path)
    try:
        yield q
    finally:
        kill_pid(q.proc.pid)
        q.proc.wait(10)


@pytest.mark.guest
def test_scan_of_a_qemu_guest(qemu: Qemu) -> None:
    start, length = qemu.ram_range()
    pid = qemu.proc.pid
    assert not present_mask(pid, start, length).any(), "-S: no guest page touched yet"
    # Let the firmware write guest RAM, then freeze it so its content holds still.
    qemu.hmp("cont")
    wait_for(lambda: present_mask(pid, start, length).any(), 30, "the firmware to write guest RAM")
    qemu.hmp("stop")
    before = present_mask(pid, start, length)
    res = native.scan(pid, [(start, length)])
    after = present_mask(pid, start, length)
    assert np.array_equal(before, after), "scanning faulted guest pages in"
    assert res.pages == length // PAGE_SIZE and res.present == int(before.sum())
    assert res.read > 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for i in np.flatnonzero(res.has(PageFlags.READ))[:2000]:
            data = os.pread(mem.fileno(), PAGE_SIZE, start + int(i) * PAGE_SIZE)
            assert int(res.hashes[i]) == xxhash.xxh3_64_intdigest(data), f"guest page {i}"
    assert np.array_equal(present_mask(pid, start, length), before)


# --- the process_vm_readv fast path against KSM, on real guests ----------------

KSM_HOG_MIB = 48  # per guest, identical in every guest (fill=shared): 12,288 pages to merge
KSM_HOG_PAGES = KSM_HOG_MIB * 256
KSM_MERGE_TIMEOUT_S = 180  # TCG, 2 cores shared: 2 guests merge in ~20-60 s at 5000 pages / 10 ms


def ksm_counter(name: str) -> int:
    return int((KSM / name).read_text())


def ksm_full_passes(n: int, timeout_s: float = 60) -> None:
    """Wait until ksmd has completed ``n`` more full scans (it notices unmerged pages then)."""
    start = ksm_counter("full_scans")
    wait_for(lambda: ksm_counter("full_scans") >= start + n, timeout_s, f"{n} full KSM scans",
             interval_s=0.05)


def ksm_frames(pid: int, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Per page: the KSM frame it maps, else 0 (pagemap and kpageflags only: nothing pinned)."""
    res = native.scan(pid, ranges, read_content=False, all_frame_flags=True)
    frames: np.ndarray = np.where(res.has(PageFlags.KSM), res.pfns, np.uint64(0))
    return frames


def set_paused(guest: dict[str, Any], paused: bool) -> None:
    from hv.qemu.vm import VM

    async def go() -> None:
        async with VM(guest["name"], guest["socket"]) as vm:
            await (vm.pause() if paused else vm.resume())
    asyncio.run(go())


def pin_read(pid: int, addr: int, length: int) -> None:
    """process_vm_readv of [addr, addr + length), as a reader that ignores KSM would."""
    libc = ctypes.CDLL(None, use_errno=True)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    buf = ctypes.create_string_buffer(length)
    local, remote = IoVec(ctypes.addressof(buf), length), IoVec(addr, length)
    if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != length:
        raise OSError(ctypes.get_errno(), f"process_vm_readv {addr:#x}+{length:#x}")


@pytest.mark.guest
def test_readv_scans_leave_ksm_merges_of_real_guests(guests: Any, ksm_running: None) -> None:
    """hv's scan reads guest pages with process_vm_readv and KSM's pages_sharing holds.

    Two guests hold the same 48 MiB (page i identical in both); KSM merges them.  Then:
    1. guests running, ksmd running fast: three scans of each guest, then two full KSM
       passes (ksmd counts an unmerged page only when it next looks at it):
       pages_sharing and each guest's ksm_merging_pages within a small tolerance;
    2. guests paused: the frames mapping KSM pages are read (pagemap + kpageflags,
       nothing pinned) before and after a scan: exactly the same;
    3. controls, so neither check is vacuous: pinning 256 of those KSM pages with
       process_vm_readv, as a reader ignoring KSM would, unmerges every one of them
       (check 2 sees it), and pinning every present page of both guests drops
       pages_sharing far beyond check 1's tolerance.
    """
    launched = [guests.launch(name, mem="256M", workload="hog", hog_mib=KSM_HOG_MIB, fill="shared")
                for name in ("ksma", "ksmb")]
    for g in launched:
        guests.wait_event(g, "hog_touched", timeout_s=120)
    ranges = [[(r.hva, r.size) for r in g["info"].ram] for g in launched]
    pids = [g["pid"] for g in launched]

    wait_for(lambda: all(ksm_merging_pages(pid) >= KSM_HOG_PAGES for pid in pids),
             KSM_MERGE_TIMEOUT_S, "KSM to merge the guests' shared pages", interval_s=1.0)
    ksm_full_passes(2)

    # 1. Live: guests and ksmd running.
    sharing_before = ksm_counter("pages_sharing")
    merging_before = [ksm_merging_pages(pid) for pid in pids]
    readv_bytes = huge_pages = 0
    for _ in range(3):
        for pid, r in zip(pids, ranges):
            res = native.scan(pid, r)
            assert res.ksm >= KSM_HOG_PAGES, "the merged pages are known by frame, not read"
            readv_bytes += res.bytes_readv
            huge_pages += res.readv_huge
    assert readv_bytes > 0, "the scans used process_vm_readv"
    ksm_full_passes(2)
    sharing_after = ksm_counter("pages_sharing")
    merging_after = [ksm_merging_pages(pid) for pid in pids]
    print(f"\nlive: pages_sharing {sharing_before} -> {sharing_after}; ksm_merging_pages "
          f"{merging_before} -> {merging_after}; {readv_bytes >> 20} MiB read by process_vm_readv, "
          f"{huge_pages * PAGE_SIZE >> 20} MiB of it in huge pages cleared by PAGEMAP_SCAN")
    # The guests' kernels write a few pages meanwhile (a write unmerges its page): the
    # tolerance is for them, a hundredth of what one unmerging scan would drop.
    tolerance = max(64, sharing_before // 100)
    assert sharing_after >= sharing_before - tolerance, "scans with process_vm_readv unmerged pages"
    for m_before, m_after in zip(merging_before, merging_after):
        assert m_after >= m_before - tolerance

    # 2. Guests paused, ksmd stopped (run=0 keeps the merged pages): not one KSM
    #    mapping changes.
    for g in launched:
        set_paused(g, True)
    try:
        (KSM / "run").write_text("0")
        frames_before = [ksm_frames(pid, r) for pid, r in zip(pids, ranges)]
        scans = [native.scan(pid, r) for pid, r in zip(pids, ranges)]
        frames_after = [ksm_frames(pid, r) for pid, r in zip(pids, ranges)]
        (KSM / "run").write_text("1")
        assert all(s.bytes_readv > 0 for s in scans)
        for f_before, f_after in zip(frames_before, frames_after):
            assert int((f_before != 0).sum()) >= KSM_HOG_PAGES
            lost = int(((f_before != 0) & (f_after != f_before)).sum())
            gained = int(((f_before == 0) & (f_after != 0)).sum())
            assert lost == 0 and gained == 0, f"{lost} KSM mappings lost, {gained} gained"
        print(f"paused: {[int((f != 0).sum()) for f in frames_before]} KSM-mapped pages before "
              f"and after, identical; read by process_vm_readv "
              f"{[s.bytes_readv // PAGE_SIZE for s in scans]} pages")

        # 3. Controls: what the checks above see of a reader that pins KSM pages.
        #    a. 256 KSM pages of one guest: the frames show every one unmerged at once.
        start, length = ranges[0][0]
        idx = np.flatnonzero(frames_after[0][:length // PAGE_SIZE])[:256]
        for i in idx:
            pin_read(pids[0], start + int(i) * PAGE_SIZE, PAGE_SIZE)
        unmerged = int((ksm_frames(pids[0], ranges[0])[idx] != frames_after[0][idx]).sum())
        assert unmerged == 256
        #    b. every present page of both guests (design.md's measurement): pages_sharing
        #       after the same two full passes as in 1.  (ksmd counts an unmerge when it
        #       next visits the page and merges it again in the same visit where it can,
        #       so the counter understates it; still it falls far beyond the tolerance.)
        ksm_full_passes(2)
        sharing_paused = ksm_counter("pages_sharing")
        for pid, r in zip(pids, ranges):
            for st, ln in r:
                present = np.flatnonzero(present_mask(pid, st, ln))
                for run in np.split(present, np.flatnonzero(np.diff(present) != 1) + 1):
                    pin_read(pid, st + int(run[0]) * PAGE_SIZE, len(run) * PAGE_SIZE)
        ksm_full_passes(2)
        sharing_pinned = ksm_counter("pages_sharing")
        print(f"control: pinning 256 KSM pages unmerged {unmerged}; pinning every present page: "
              f"pages_sharing {sharing_paused} -> {sharing_pinned} after 2 full passes")
        # The check in 1 fails at a drop of one tolerance: a reader that unmerges must
        # drop the counter past that (ksmd re-merging in the same visit makes the drop
        # vary from run to run: 321 pages of 18779 in one, far more in others).
        assert sharing_pinned < sharing_paused - tolerance, "the pages_sharing check is blind"
    finally:
        for g in launched:
            set_paused(g, False)
