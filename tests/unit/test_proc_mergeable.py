"""Which mappings are open to KSM (``mg`` in smaps), read from this very process, and
the guest-RAM holes cut out of them (``hv.sharing.scan._minus``)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from hv.errors import HostError
from hv.host import proc
from hv.sharing.scan import _minus

MADV_MERGEABLE = 12  # asm-generic/mman-common.h
SIZE = 1 << 20


def test_a_private_mapping_becomes_mergeable_after_madvise() -> None:
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert not proc.mergeable(os.getpid(), addr)
    assert (addr, SIZE) not in proc.mergeable_ranges(os.getpid())
    assert libc.madvise(addr, SIZE, MADV_MERGEABLE) == 0, os.strerror(ctypes.get_errno())
    assert proc.mergeable(os.getpid(), addr)
    assert (addr, SIZE) in proc.mergeable_ranges(os.getpid())
    with pytest.raises(HostError, match="no mapping at 0x8"):
        proc.mergeable(os.getpid(), 8)


def test_minus_cuts_holes_out_of_a_range() -> None:
    assert _minus(0, 100, []) == [(0, 100)]
    assert _minus(0, 100, [(20, 30), (50, 60)]) == [(0, 20), (30, 20), (60, 40)]
    assert _minus(0, 100, [(0, 100)]) == []
    assert _minus(0, 100, [(200, 300), (-50, -10)]) == [(0, 100)]
    assert _minus(10, 20, [(0, 15)]) == [(15, 5)]
