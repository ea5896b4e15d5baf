"""How ``hv.host.reclaim.release`` steps through its request, against a model of the
node's inactive list: the swap-cached pages a page-out left at the tail come first,
then a neighbour's pages, which reclaim must write to swap.  The kernel itself is in
tests/functional/test_reclaim.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from hv.host import reclaim
from hv.units import MiB, PAGE_SIZE

NODE = "/sys/devices/system/node/node0/reclaim"


@dataclass
class Tail:
    """The tail of a node's inactive list: ``cached`` swap-cached pages, then others;
    ``away`` more swap-cached pages are elsewhere (mapped again, or not rotated)."""

    cached: int
    away: int = 0
    written: int = 0
    stolen: int = 0
    requests: int = 0

    def reclaim(self, path: str, nbytes: int) -> tuple[str | None, bool]:
        assert path == NODE
        self.requests += 1
        pages = nbytes // PAGE_SIZE
        freed = min(pages, self.cached)
        self.cached -= freed
        self.written += pages - freed  # past the swap cache: a neighbour's pages
        self.stolen += pages
        return None, False


@pytest.fixture
def tail(monkeypatch: pytest.MonkeyPatch) -> Tail:
    t = Tail(cached=0)
    monkeypatch.setattr(reclaim, "nodes", lambda: [NODE])
    monkeypatch.setattr(reclaim, "_wait_writeback", lambda: None)
    monkeypatch.setattr(reclaim, "_swapcached_pages", lambda f: t.cached + t.away)
    monkeypatch.setattr(reclaim, "_swap_used", lambda: t.written * PAGE_SIZE)
    monkeypatch.setattr(reclaim, "_request", t.reclaim)
    monkeypatch.setattr(reclaim, "_stolen", lambda: t.stolen * PAGE_SIZE)
    return t


class Tunables:
    """``vm.zone_reclaim_mode`` 1: release leaves ``min_unmapped_ratio`` alone."""

    def read_int(self, path: str) -> int:
        return 1

    def read(self, path: str) -> str:
        raise AssertionError(f"read {path}")

    def write(self, path: str, value: Any) -> None:
        raise AssertionError(f"wrote {path}")


def release(nbytes: int, **kw: Any) -> reclaim.Release:
    return reclaim.release(nbytes, lambda _: None, Tunables(), **kw)  # type: ignore[arg-type]


def test_everything_at_the_tail_is_freed_and_nothing_else(tail: Tail) -> None:
    tail.cached = 64 * MiB // PAGE_SIZE
    r = release(64 * MiB)
    assert (r.asked_bytes, r.freed_bytes, r.collateral_bytes) == (64 * MiB, 64 * MiB, 0)
    assert not r.stopped and tail.written == 0
    assert tail.requests == 64 * MiB // reclaim.STEP_BYTES


def test_the_first_step_past_the_swap_cache_ends_the_release(tail: Tail) -> None:
    """20 of the 64 MiB paged out are at the tail (the guest took the rest back): one
    request for 64 MiB would write 44 MiB of a neighbour's pages; the steps, one."""
    tail.cached, tail.away = 20 * MiB // PAGE_SIZE, 44 * MiB // PAGE_SIZE
    r = release(64 * MiB)
    assert r.freed_bytes == 20 * MiB and r.stopped
    assert r.collateral_bytes == tail.written * PAGE_SIZE <= reclaim.STEP_BYTES
    assert r.asked_bytes == 20 * MiB + reclaim.STEP_BYTES


def test_never_more_than_the_swap_cache_holds(tail: Tail) -> None:
    tail.cached = 3 * MiB // PAGE_SIZE
    r = release(64 * MiB)
    assert (r.asked_bytes, r.freed_bytes, r.collateral_bytes) == (3 * MiB, 3 * MiB, 0)


def test_a_node_that_cannot_give_more_ends_the_release(tail: Tail,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tail.cached = 64 * MiB // PAGE_SIZE
    monkeypatch.setattr(reclaim, "_request", lambda f, n: (None, True))  # EAGAIN
    r = release(64 * MiB)
    assert r.asked_bytes == reclaim.STEP_BYTES and r.problem is None
