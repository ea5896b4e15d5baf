"""The typed wrapper over hv._native: hashing, argument checks, errors, flags.

These run against the test process itself (no victim, no root needed except
where noted); the functional tests in tests/functional/test_scanner.py cover
other processes, swap, KSM and QEMU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

import numpy as np
import pytest
import xxhash

from hv.errors import HostError, NativeError
from hv.host import native
from hv.host.native import PageFlags
from hv.units import PAGE_SIZE


def test_hash_pages_equals_the_xxhash_package() -> None:
    buf = np.random.default_rng(3).integers(0, 256, size=64 * PAGE_SIZE, dtype=np.uint8)
    buf[5 * PAGE_SIZE:6 * PAGE_SIZE] = 0
    got = native.hash_pages(buf)
    raw = buf.tobytes()
    want = [xxhash.xxh3_64_intdigest(raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(64)]
    assert [int(h) for h in got] == want


def test_hash_pages_equals_the_system_xxh3_64bits() -> None:
    """The scanner hashes through libxxhash's XXH3_64bits_dispatch (AVX2/AVX-512 where
    the CPU has them); XXH3's output does not depend on the vector path, so every page
    hashes exactly as the system library's plain XXH3_64bits (the baseline build)."""
    name = ctypes.util.find_library("xxhash")
    assert name is not None, "libxxhash not found, yet the extension links it (scripts/setup.sh installs it)"
    lib = ctypes.CDLL(name)
    lib.XXH3_64bits.restype = ctypes.c_uint64
    lib.XXH3_64bits.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    rng = np.random.default_rng(4)
    buf = rng.integers(0, 256, size=256 * PAGE_SIZE, dtype=np.uint8)
    buf[0:PAGE_SIZE] = 0
    buf[PAGE_SIZE:2 * PAGE_SIZE] = 0xFF
    buf[2 * PAGE_SIZE:3 * PAGE_SIZE] = np.arange(PAGE_SIZE) % 251
    got = native.hash_pages(buf)
    base = buf.ctypes.data
    want = [lib.XXH3_64bits(base + i * PAGE_SIZE, PAGE_SIZE) for i in range(256)]
    assert [int(h) for h in got] == want


def test_page_flags_are_distinct_bits() -> None:
    values = [int(f) for f in PageFlags]
    assert len(set(values)) == len(values)
    assert all(v and v & (v - 1) == 0 for v in values)
    # present() packs its bits into a uint8.
    assert int(PageFlags.PRESENT | PageFlags.SWAPPED | PageFlags.EXCLUSIVE) < 256


def test_memcpy_seconds_is_positive() -> None:
    assert native.memcpy_seconds(1 << 20, 4) > 0


def test_unaligned_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="page aligned"):
        native.scan(os.getpid(), [(PAGE_SIZE + 1, PAGE_SIZE)])
    with pytest.raises(ValueError, match="page aligned"):
        native.scan(os.getpid(), [(PAGE_SIZE, 100)])


def test_output_arrays_are_checked() -> None:
    with pytest.raises(ValueError, match="hashes"):
        native.scan(os.getpid(), [(PAGE_SIZE, PAGE_SIZE)], hashes=np.zeros(1, dtype=np.uint32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flags"):
        native.scan(os.getpid(), [(PAGE_SIZE, PAGE_SIZE)], flags=np.zeros(2, dtype=np.uint16))


def test_errors_carry_errno() -> None:
    with pytest.raises(native.ProcessGone) as gone:
        native.present(2**22 + 12345, [PAGE_SIZE])  # above pid_max's default: never a process
    assert isinstance(gone.value, NativeError) and isinstance(gone.value, HostError)
    assert gone.value.errno == errno.ESRCH
    # Kernel space is not a user range: pagemap refuses it.
    with pytest.raises(NativeError):
        native.scan(os.getpid(), [(0xFFFF_8000_0000_0000, PAGE_SIZE)])


def test_scan_of_this_process_fills_supplied_arrays() -> None:
    n = 16
    m = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(m, dtype=np.uint8)
    base = int(view.ctypes.data)
    for i in range(0, n, 2):  # even pages written, odd pages never touched
        view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = i + 1
    hashes = np.full(n, 99, dtype=np.uint64)
    flags = np.full(n, 0xFFFF, dtype=np.uint16)
    pfns = np.full(n, 99, dtype=np.uint64)
    res = native.scan(os.getpid(), [(base, n * PAGE_SIZE)], hashes=hashes, flags=flags, pfns=pfns)
    assert res.hashes is hashes and res.flags is flags and res.pfns is pfns
    assert res.read == n // 2 and res.present == n // 2
    for i in range(n):
        if i % 2:
            assert flags[i] == 0 and hashes[i] == 0 and pfns[i] == 0
        else:
            assert hashes[i] == xxhash.xxh3_64_intdigest(bytes([i + 1]) * PAGE_SIZE)
    assert not native.scan(os.getpid(), [(base, n * PAGE_SIZE)], read_content=False).has(PageFlags.READ).any()
    del view
    m.close()


def test_present_of_a_kernel_address_is_not_process_gone() -> None:
    with pytest.raises(NativeError) as err:
        native.present(os.getpid(), [0xFFFF_8000_0000_0000])
    assert not isinstance(err.value, native.ProcessGone)
    assert err.value.errno == errno.EINVAL


def test_readv_and_pread_scans_agree() -> None:
    """Exclusive anonymous pages go through process_vm_readv; pread_only reads them all
    through /proc/PID/mem; hashes and flags are the same either way."""
    n = 64
    m = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(m, dtype=np.uint8)
    base = int(view.ctypes.data)
    view[:] = np.random.default_rng(4).integers(0, 256, size=n * PAGE_SIZE, dtype=np.uint8)
    view[3 * PAGE_SIZE:4 * PAGE_SIZE] = 0
    ranges = [(base, n * PAGE_SIZE)]
    fast = native.scan(os.getpid(), ranges, batch_bytes=16 * PAGE_SIZE)
    slow = native.scan(os.getpid(), ranges, pread_only=True)
    assert np.array_equal(fast.hashes, slow.hashes) and np.array_equal(fast.flags, slow.flags)
    assert fast.read == slow.read == n and fast.zero == slow.zero == 1
    assert fast.bytes_read == slow.bytes_read == n * PAGE_SIZE
    assert fast.bytes_readv == n * PAGE_SIZE and fast.readvs == n // 16 and fast.readv_declined == 0
    assert fast.readv_huge == 0  # 4 KiB pages: kpageflags, not PAGEMAP_SCAN, cleared them
    assert slow.bytes_readv == 0 and slow.readvs == 0 and slow.preads >= 1
    raw = view.tobytes()
    assert int(fast.hashes[5]) == xxhash.xxh3_64_intdigest(raw[5 * PAGE_SIZE:6 * PAGE_SIZE])
    del view
    m.close()


def test_huge_page_is_cleared_for_readv_by_pagemap_scan() -> None:
    """Exclusive pages of a transparent huge page mapped by a PMD are never KSM pages:
    one PAGEMAP_SCAN call clears them for process_vm_readv instead of 512 kpageflags
    entries; hashes and flags are those of a pread-only scan."""
    huge = 2 * 1024 * 1024
    n = huge // PAGE_SIZE
    m = mmap.mmap(-1, 2 * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(m, dtype=np.uint8)
    offset = -int(view.ctypes.data) % huge
    m.madvise(mmap.MADV_HUGEPAGE, offset, huge)
    view[offset:offset + huge] = np.random.default_rng(5).integers(0, 256, size=huge, dtype=np.uint8)
    base = int(view.ctypes.data) + offset
    ranges = [(base, huge)]
    try:
        # THP is on here (hv's guests rely on it too): a missing huge page fails loudly.
        assert native.scan(os.getpid(), ranges, read_content=False, all_frame_flags=True).has(
            PageFlags.THP).all(), "no transparent huge page for a MADV_HUGEPAGE range"
        fast = native.scan(os.getpid(), ranges)
        slow = native.scan(os.getpid(), ranges, pread_only=True)
        assert np.array_equal(fast.hashes, slow.hashes) and np.array_equal(fast.flags, slow.flags)
        assert fast.read == n and fast.bytes_readv == huge and slow.readv_huge == 0
        kernel = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
        if kernel >= (6, 7):  # PAGEMAP_SCAN
            assert fast.readv_huge == n
    finally:
        del view
        m.close()


def test_pages_shared_after_fork_are_read_with_pread() -> None:
    """A page COW-shared with a child is not exclusive: never pinned (that would unshare it)."""
    n = 8
    m = mmap.mmap(-1, n * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(m, dtype=np.uint8)
    view[:] = 7
    base = int(view.ctypes.data)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        res = native.scan(os.getpid(), [(base, n * PAGE_SIZE)])
        assert not res.has(PageFlags.EXCLUSIVE).any()
        assert res.read == n and res.bytes_readv == 0 and res.readvs == 0
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(child, 0)
    del view
    m.close()
