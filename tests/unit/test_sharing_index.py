"""The sharing index and the page-state files, on synthetic arrays (no guests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hv.errors import StateFileError
from hv.host.native import PageFlags, ScanResult
from hv.sharing import state as st
from hv.sharing.index import VmPages, build_index
from hv.sharing.state import ZERO_HASH, Identity, Snapshot

P = int(PageFlags.PRESENT)
R = int(PageFlags.PRESENT | PageFlags.READ)
K = int(PageFlags.PRESENT | PageFlags.KSM)
Z = int(PageFlags.PRESENT | PageFlags.READ | PageFlags.ZERO)
ZP = int(PageFlags.PRESENT | PageFlags.ZERO_PAGE | PageFlags.ZERO)


def snap(name: str, hashes: list[int], flags: list[int], stable: list[int],
         pfns: list[int] | None = None) -> VmPages:
    n = len(hashes)
    ident = Identity(name, f"/x/{name}.sock", "pc.ram", n * 4096, n)
    return VmPages(name, Snapshot(ident, np.array(hashes, dtype=np.uint64),
                                  np.array(pfns or [0] * n, dtype=np.uint64),
                                  np.array(flags, dtype=np.uint16),
                                  np.array(stable, dtype=np.uint16), 2, 1, 0.0))


def test_inter_and_intra_vm_duplicates_and_fair_savings() -> None:
    # a: pages 11, 11 (intra), 22, 33 (hint); b: 22, 44 (hint), not present
    a = snap("a", [11, 11, 22, 33], [R, R, R, R], [1, 1, 1, 1])
    b = snap("b", [22, 44, 0], [R, R, 0], [1, 1, 0])
    idx = build_index([a, b])
    va, vb = idx.vms
    assert (va.present, va.stable_dups, va.inter_vm_dups, va.hints) == (4, 3, 1, 1)
    assert (vb.present, vb.stable_dups, vb.inter_vm_dups, vb.hints) == (2, 1, 1, 1)
    assert idx.groups == 2 and idx.inter_vm_groups == 1
    assert idx.potential_savings_pages == 2  # one per group of two
    assert va.potential_savings_pages == pytest.approx(1.5)  # 0.5 + 0.5 + 0.5
    assert vb.potential_savings_pages == pytest.approx(0.5)
    assert idx.realized_savings_pages == 0 and idx.backlog_pages == 2


def test_volatile_pages_are_not_candidates() -> None:
    # equal hashes, but one of them changed since the last scan (stable 0)
    a = snap("a", [5, 5, 5], [R, R, R], [1, 0, 3])
    idx = build_index([a])
    (va,) = idx.vms
    assert (va.stable_dups, va.volatile, va.hints) == (2, 1, 0)
    assert idx.potential_savings_pages == 1


def test_zero_page_mappings_are_neither_potential_nor_realized() -> None:
    # two zero pages with frames of their own, one read-before-written zero-page mapping
    a = snap("a", [ZERO_HASH, ZERO_HASH, 0, 9], [Z, Z, ZP, R], [0, 1, 0, 1])
    idx = build_index([a])
    (va,) = idx.vms
    assert (va.zero, va.zero_page, va.zero_mapped, va.stable_dups, va.hints) == (2, 1, 1, 0, 1)
    assert idx.potential_savings_pages == 2 and idx.zero_mapped == 1
    assert idx.merged_savings_pages == 0 and idx.realized_savings_pages == 0


def test_ksm_zero_pages_and_bookkeeping_follow_the_kernels_profit() -> None:
    # 3 zero-page mappings of which ksm_stat says 2 are KSM's; KSM frame 100 mapped by
    # a:3, a:4 and b:0 (saves 2); 128 rmap items = 2 pages of bookkeeping (64 B each).
    a = VmPages("a", snap("a", [0, 0, 0, 0, 0], [ZP, ZP, ZP, K, K], [0] * 5,
                          [0, 0, 0, 100, 100]).snapshot,
                {"ksm_zero_pages": 2, "ksm_rmap_items": 64, "ksm_merging_pages": 2})
    b = VmPages("b", snap("b", [0], [K], [0], [100]).snapshot,
                {"ksm_zero_pages": 0, "ksm_rmap_items": 64, "ksm_merging_pages": 1})
    idx = build_index([a, b])
    va, vb = idx.vms
    assert (va.zero, va.zero_mapped) == (2, 1)  # KSM's two had frames before the merge
    assert idx.merged_savings_pages == 2 + 2
    # general_profit = (pages_sharing 2 + ksm_zero_pages 2) * 4096 - 128 * 64
    assert idx.realized_savings_pages == 4 - 2
    # ksm_process_profit = (ksm_merging_pages + ksm_zero_pages) * 4096 - rmap_items * 64
    assert va.ksm_profit_pages == pytest.approx(2 + 2 - 1)
    assert vb.ksm_profit_pages == pytest.approx(1 - 1)
    assert va.realized_savings_pages + vb.realized_savings_pages == pytest.approx(2, abs=0.11)
    assert idx.backlog_pages == max(0, idx.potential_savings_pages - 4)


def test_ksm_pages_group_by_frame_without_their_hash() -> None:
    # KSM frame 100 mapped by a:0, a:1 and b:0 (hashes unknown: never read);
    # frame 200 mapped by b:1 and a:2, whose hash 77 hv saw before the merge, so the
    # unmerged b:2 with hash 77 joins that group.
    a = snap("a", [0, 0, 77], [K, K, K], [0, 0, 0], [100, 100, 200])
    b = snap("b", [0, 0, 77], [K, K, R], [0, 0, 2], [100, 200, 300])
    idx = build_index([a, b])
    va, vb = idx.vms
    assert va.ksm_pages == 3 and vb.ksm_pages == 2
    assert va.stable_dups == 3 and vb.stable_dups == 3
    assert idx.groups == 2 and idx.inter_vm_groups == 2
    assert idx.realized_savings_pages == 3  # (3-1) + (2-1)
    assert idx.potential_savings_pages == 4  # (3-1) + (3-1)
    assert idx.backlog_pages == 1
    assert va.realized_savings_pages + vb.realized_savings_pages == pytest.approx(3, abs=0.11)


def test_ksm_pages_outside_guest_ram_count_in_the_profits_not_in_guest_ram() -> None:
    # KSM frame 500 (a ROM page) mapped outside guest RAM by a and b, and frame 100
    # mapped by a:0 in guest RAM and by b's video memory outside it.
    a = VmPages("a", snap("a", [0, 11], [K, R], [0, 1], [100, 0]).snapshot,
                {"ksm_zero_pages": 0, "ksm_rmap_items": 0, "ksm_merging_pages": 2},
                np.array([500], dtype=np.uint64))
    b = VmPages("b", snap("b", [11], [R], [1], [0]).snapshot,
                {"ksm_zero_pages": 0, "ksm_rmap_items": 0, "ksm_merging_pages": 2},
                np.array([500, 100], dtype=np.uint64))
    idx = build_index([a, b])
    va, vb = idx.vms
    # Guest RAM is counted as before: a's one KSM page, one stable duplicate (11).
    assert (va.present, va.ksm_pages, vb.present, vb.ksm_pages) == (2, 1, 1, 0)
    assert (va.ksm_outside_pages, vb.ksm_outside_pages) == (1, 2)
    assert idx.groups == 1 and idx.potential_savings_pages == 1
    # Frame 100 has two mappings (a's RAM, b's video memory), frame 500 two: 2 saved.
    # Merged savings (guest RAM only): a's half of frame 100; the rest is outside.
    assert va.merged_savings_pages == pytest.approx(0.5) and vb.merged_savings_pages == 0
    assert va.outside_savings_pages == pytest.approx(0.5)
    assert vb.outside_savings_pages == pytest.approx(1.0)
    assert idx.merged_savings_pages == 0  # a's half page, rounded (half to even)
    assert idx.realized_savings_pages == 2  # pages_sharing: what general_profit counts
    assert idx.backlog_pages == 1
    # Per VM, as ksm_process_profit: every page mapping a KSM frame, in RAM or not.
    assert (va.ksm_profit_pages, vb.ksm_profit_pages) == (2, 2)


def test_ksm_zero_pages_outside_guest_ram_are_the_rest_of_the_kernels_count() -> None:
    # Guest RAM maps the zero page twice, its QEMU's video memory 3 times; the kernel
    # counts 5 KSM zero pages for the VM: all of them.
    stat = {"ksm_zero_pages": 5, "ksm_rmap_items": 0, "ksm_merging_pages": 0}
    a = VmPages("a", snap("a", [0, 0, 7], [ZP, ZP, R], [0, 0, 1]).snapshot, stat,
                np.zeros(0, dtype=np.uint64), 3)
    idx = build_index([a])
    (va,) = idx.vms
    assert va.zero_mapped == 0 and va.merged_savings_pages == 2  # guest RAM's own
    assert va.outside_savings_pages == 3
    assert va.realized_savings_pages == 5 and va.ksm_profit_pages == 5  # the kernel's
    assert idx.merged_savings_pages == 2 and idx.realized_savings_pages == 5
    assert idx.backlog_pages == 0
    # Fewer zero-page mappings in all than the kernel's count: only those.
    b = VmPages("b", a.snapshot, stat, np.zeros(0, dtype=np.uint64), 1)
    assert build_index([b]).realized_savings_pages == 3
    # Outside first: a count of 4 is the 4 outside; guest RAM's two are read faults'.
    c = VmPages("c", a.snapshot, {**stat, "ksm_zero_pages": 4}, np.zeros(0, dtype=np.uint64), 4)
    (vc,) = (idx_c := build_index([c])).vms
    assert (vc.zero_mapped, vc.merged_savings_pages, vc.outside_savings_pages) == (2, 0, 4)
    assert idx_c.realized_savings_pages == 4 and idx_c.backlog_pages == 0


def test_empty_and_large_inputs() -> None:
    assert build_index([]).vms == ()
    rng = np.random.default_rng(1)
    n = 200_000
    h = rng.integers(1, 1000, n, dtype=np.uint64)
    idx = build_index([snap("a", h.tolist(), [R] * n, [1] * n)])
    assert idx.potential_savings_pages == n - np.unique(h).size


# -- state files ---------------------------------------------------------------
def ident(pages: int = 8, vm: str = "g1") -> Identity:
    return Identity(vm, f"/run/hv/{vm}/qmp.sock", "pc.ram", pages * 4096, pages)


def scan_result(hashes: list[int], flags: list[int], pfns: list[int] | None = None) -> ScanResult:
    n = len(hashes)
    return ScanResult(np.array(hashes, dtype=np.uint64), np.array(flags, dtype=np.uint16),
                      np.array(pfns or [0] * n, dtype=np.uint64), n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                      0, 0, 0)


def test_update_counts_stable_scans_and_resets_on_change(tmp_path: Path) -> None:
    path = tmp_path / "g1.pages"
    with st.create(path, ident(4)) as s:
        st.update(s, scan_result([1, 2, 3, 0], [R, R, R, 0]), pid=10)
        assert s.stable.tolist() == [0, 0, 0, 0]
        st.update(s, scan_result([1, 2, 9, 0], [R, R, R, 0]), pid=10)
        assert s.stable.tolist() == [1, 1, 0, 0]
        # page 0 merged by KSM: not read, keeps its hash and stays stable
        st.update(s, scan_result([0, 2, 9, 0], [K, R, R, 0], [50, 0, 0, 0]), pid=10)
        assert s.stable.tolist() == [2, 2, 1, 0] and int(s.hashes[0]) == 1
        assert s.scans == 3 and s.pid == 10 and s.seq % 2 == 0
        # another QEMU (restarted VM): nothing carries over
        st.update(s, scan_result([1, 2, 9, 0], [R, R, R, 0]), pid=11)
        assert s.stable.tolist() == [0, 0, 0, 0]
    # readable from a fresh open (another process would do the same)
    with st.open_state(path, ident(4), writable=False) as again:
        snap_ = again.snapshot()
        assert snap_.hashes.tolist() == [1, 2, 9, 0] and snap_.scans == 4


def test_truncated_foreign_and_garbage_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "g1.pages"
    st.create(path, ident(8)).close()
    other = tmp_path / "keep.pages"
    st.create(other, ident(8, "g2")).close()
    with pytest.raises(StateFileError, match="belongs to another VM.*vm 'g1'"):
        st.open_state(path, ident(8, "g3"))
    with pytest.raises(StateFileError, match="belongs to another VM.*ram_bytes"):
        st.open_state(path, Identity("g1", "/run/hv/g1/qmp.sock", "pc.ram", 16 * 4096, 16))
    size = path.stat().st_size
    os.truncate(path, size - 3)
    with pytest.raises(StateFileError, match="truncated"):
        st.open_state(path, ident(8))
    os.truncate(path, 100)
    with pytest.raises(StateFileError, match="truncated"):
        st.open_state(path, ident(8))
    path.write_bytes(b"x" * size)
    with pytest.raises(StateFileError, match="not an hv page-state file"):
        st.open_state(path, ident(8))
    os.truncate(path, 0)
    with pytest.raises(StateFileError, match="empty"):
        st.open_state(path, ident(8))
    with pytest.raises(StateFileError, match="never scanned"):
        st.open_state(tmp_path / "none.pages", ident(8))
    # nothing else was lost, and a caller may replace the bad file on purpose
    st.open_state(other, ident(8, "g2")).close()
    with pytest.raises(StateFileError):
        st.open_or_create(ident(8), path)
    st.open_or_create(ident(8), path, replace_foreign=True).close()
    st.open_state(path, ident(8)).close()
