"""Per-VM page state that survives hv: mmap-backed numpy arrays in hv's state directory.

One file per VM, ``STATE_DIR/sharing/NAME.pages``::

    offset 0      header (4 KiB): magic, version, seq, identity (JSON), counts
    offset 4096   hashes  uint64[n]   XXH3-64 of the page's content as last seen (0: unknown)
    ...           pfns    uint64[n]   host frame at the last scan (0: not present)
    ...           flags   uint16[n]   PageFlags of the last scan
    ...           stable  uint16[n]   scans the content stayed the same (saturating)

The identity (QMP socket, guest RAM block name and size, page count) is checked on
open: a file from another VM, one cut short, or one with a bad magic raises
:class:`~hv.errors.StateFileError` naming the file and what is wrong; nothing else is
touched (the caller decides whether to :func:`create` a fresh one in its place).

Writers bump ``seq`` to an odd number before changing the arrays and to the next even
number after (a seqlock), so a reader in another process (``hv share --cached``)
copies a consistent snapshot without asking the daemon.

:func:`update` folds one scan into the state, vectorised:

* a page read by this scan keeps its hash; it is *stable* (count + 1) if the last scan
  saw the same hash, else its count drops to 0 (the volatility filter);
* a KSM-merged page is not read (reading would not unmerge, but it is unnecessary): it
  carries the hash it had when last read, and counts as stable — a write would have
  broken the merge (copy on write) and made it an ordinary page again;
* a page mapping the zero page gets the hash of a zero page;
* a page not present has hash 0 and count 0.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hv import paths
from hv.errors import StateFileError
from hv.host.native import PageFlags, ScanResult, hash_pages

__all__ = ["Identity", "PageState", "Snapshot", "state_path", "create", "open_state",
           "open_or_create", "update", "ZERO_HASH", "STABLE_MAX"]

MAGIC = b"HVPAGES\x00"
VERSION = 1
HEADER_BYTES = 4096  # one page, so the arrays that follow are page aligned
STABLE_MAX = np.iinfo(np.uint16).max  # the count saturates here instead of wrapping
# magic, version, header_bytes, seq, pages, scans, pid, last_scan_unix_s, identity_len
_HEAD = struct.Struct("<8sIIQQQQdI")
_SEQ_OFFSET = 16  # byte offset of seq in the header (after magic, version, header_bytes)
ZERO_HASH = int(hash_pages(bytes(4096))[0])  # XXH3-64 of a page of zeros

U64Array = npt.NDArray[np.uint64]
U16Array = npt.NDArray[np.uint16]


@dataclass(frozen=True)
class Identity:
    """What makes a state file belong to one VM."""

    vm: str
    socket: str
    block: str
    ram_bytes: int
    pages: int

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "socket": self.socket, "block": self.block,
                "ram_bytes": self.ram_bytes, "pages": self.pages}


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of a VM's page state (plain arrays, not mapped)."""

    identity: Identity
    hashes: U64Array
    pfns: U64Array
    flags: U16Array
    stable: U16Array
    scans: int
    pid: int
    last_scan_unix_s: float


def state_path(vm: str) -> Path:
    return paths.state_dir() / "sharing" / f"{vm}.pages"


def _layout(pages: int) -> tuple[int, int, int, int, int]:
    """Offsets of hashes, pfns, flags, stable and the total file size."""
    hashes = HEADER_BYTES
    pfns = hashes + 8 * pages
    flags = pfns + 8 * pages
    stable = flags + 2 * pages
    total = stable + 2 * pages
    return hashes, pfns, flags, stable, total


class PageState:
    """An open page-state file: header fields and the four mmap-backed arrays."""

    def __init__(self, path: Path, identity: Identity, mm: mmap.mmap, fd: int) -> None:
        self.path = path
        self.identity = identity
        self._mm = mm
        self._fd = fd
        n = identity.pages
        h, p, f, s, _ = _layout(n)
        self.hashes: U64Array = np.frombuffer(mm, dtype=np.uint64, count=n, offset=h)
        self.pfns: U64Array = np.frombuffer(mm, dtype=np.uint64, count=n, offset=p)
        self.flags: U16Array = np.frombuffer(mm, dtype=np.uint16, count=n, offset=f)
        self.stable: U16Array = np.frombuffer(mm, dtype=np.uint16, count=n, offset=s)

    # -- header ----------------------------------------------------------------
    def _head(self) -> tuple[Any, ...]:
        return _HEAD.unpack_from(self._mm, 0)

    @property
    def seq(self) -> int:
        return int(self._head()[3])

    @property
    def scans(self) -> int:
        return int(self._head()[5])

    @property
    def pid(self) -> int:
        return int(self._head()[6])

    @property
    def last_scan_unix_s(self) -> float:
        return float(self._head()[7])

    def _set_seq(self, seq: int) -> None:
        struct.pack_into("<Q", self._mm, _SEQ_OFFSET, seq)

    def begin_write(self) -> None:
        """Make readers retry until :meth:`end_write` (seq becomes odd)."""
        seq = self.seq
        self._set_seq(seq + 1 if seq % 2 == 0 else seq)

    def end_write(self, scans: int, pid: int, when_unix_s: float) -> None:
        head = list(self._head())
        head[3] = head[3] + 1 if head[3] % 2 else head[3] + 2
        head[5], head[6], head[7] = scans, pid, when_unix_s
        _HEAD.pack_into(self._mm, 0, *head)

    def snapshot(self, attempts: int = 50) -> Snapshot:
        """A consistent copy, retrying while a writer is in the middle of an update."""
        for _ in range(attempts):
            before = self.seq
            if before % 2 == 0:
                snap = Snapshot(self.identity, self.hashes.copy(), self.pfns.copy(),
                                self.flags.copy(), self.stable.copy(), self.scans, self.pid,
                                self.last_scan_unix_s)
                if self.seq == before:
                    return snap
            time.sleep(0.01)
        raise StateFileError(f"{self.path}: a writer kept it busy (seq {self.seq}); try again")

    def close(self) -> None:
        for arr in ("hashes", "pfns", "flags", "stable"):
            setattr(self, arr, None)  # release the buffer exports before closing the map
        try:
            self._mm.close()
        finally:
            os.close(self._fd)

    def __enter__(self) -> "PageState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create(path: Path, identity: Identity) -> PageState:
    """Write a fresh, empty state file (atomically replacing any old one) and open it."""
    _, _, _, _, total = _layout(identity.pages)
    ident = json.dumps(identity.as_dict(), sort_keys=True).encode()
    if _HEAD.size + len(ident) > HEADER_BYTES:
        raise StateFileError(f"{path}: VM identity too long for the header ({len(ident)} bytes)")
    tmp = path.with_name(path.name + ".tmp")
    # 0600 in a 0700 directory: frame numbers and content hashes are a side channel
    # (which host frames hold which guest content) for any other local user.
    with os.fdopen(paths.open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        try:
            # Real blocks, not a sparse file: a page of the map that the file system
            # cannot back (a full disk) would kill hv with SIGBUS when first written.
            os.posix_fallocate(f.fileno(), 0, total)
        except OSError as exc:
            f.close()
            tmp.unlink(missing_ok=True)
            raise StateFileError(f"{path}: cannot allocate {total} bytes: "
                                 f"{exc.strerror or exc}") from exc
        f.write(_HEAD.pack(MAGIC, VERSION, HEADER_BYTES, 0, identity.pages, 0, 0, 0.0, len(ident)))
        f.write(ident)
    os.replace(tmp, path)
    return open_state(path, identity)


def _read_identity(path: Path, mm: mmap.mmap, size: int) -> Identity:
    if size < HEADER_BYTES:
        raise StateFileError(f"{path}: truncated ({size} bytes, shorter than its {HEADER_BYTES}-byte header)")
    magic, version, header_bytes, _, pages, _, _, _, ident_len = _HEAD.unpack_from(mm, 0)
    if magic != MAGIC:
        raise StateFileError(f"{path}: not an hv page-state file (magic {magic!r})")
    if version != VERSION or header_bytes != HEADER_BYTES:
        raise StateFileError(f"{path}: format version {version} (header {header_bytes} B); "
                             f"this hv reads version {VERSION}")
    if ident_len > HEADER_BYTES - _HEAD.size:
        raise StateFileError(f"{path}: corrupt header (identity of {ident_len} bytes)")
    try:
        raw = json.loads(bytes(mm[_HEAD.size:_HEAD.size + ident_len]))
        ident = Identity(str(raw["vm"]), str(raw["socket"]), str(raw["block"]),
                         int(raw["ram_bytes"]), int(raw["pages"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFileError(f"{path}: corrupt header (identity unreadable: {exc})") from exc
    if ident.pages != pages:
        raise StateFileError(f"{path}: corrupt header (page count {pages} vs identity {ident.pages})")
    expected = _layout(pages)[4]
    if size != expected:
        raise StateFileError(f"{path}: truncated or padded: {size} bytes, expected {expected} "
                             f"for {pages} pages")
    return ident


def open_state(path: Path, expect: Identity | None = None, writable: bool = True) -> PageState:
    """Open and check a state file; ``expect`` is the VM it must belong to."""
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError as exc:
        raise StateFileError(f"{path}: no page state (the VM was never scanned)") from exc
    except OSError as exc:
        raise StateFileError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        if writable:
            os.fchmod(fd, paths.PRIVATE_FILE_MODE)  # a file from before hv kept them private
        size = os.fstat(fd).st_size
        if size == 0:
            raise StateFileError(f"{path}: truncated (empty)")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(fd, size, access=access)
        try:
            ident = _read_identity(path, mm, size)
            if expect is not None and ident != expect:
                diff = ", ".join(f"{k} {v!r} (file) vs {expect.as_dict()[k]!r}"
                                 for k, v in ident.as_dict().items() if expect.as_dict()[k] != v)
                raise StateFileError(f"{path}: belongs to another VM: {diff}")
        except BaseException:
            mm.close()
            raise
    except BaseException:
        os.close(fd)
        raise
    return PageState(path, ident, mm, fd)


def open_or_create(identity: Identity, path: Path | None = None,
                   replace_foreign: bool = False,
                   replaced: Callable[[StateFileError], None] | None = None) -> PageState:
    """Open the VM's state file, creating it if missing.

    A bad file (truncated, foreign, corrupt) raises StateFileError unless
    ``replace_foreign``; then it is replaced by a fresh one (and only that file), and
    ``replaced`` is told why.
    """
    path = path or state_path(identity.vm)
    if not path.exists():
        return create(path, identity)
    try:
        return open_state(path, identity)
    except StateFileError as exc:
        if not replace_foreign:
            raise
        if replaced is not None:
            replaced(exc)
        return create(path, identity)


def update(state: PageState, res: ScanResult, pid: int, when_unix_s: float | None = None) -> None:
    """Fold one scan of the VM into its state (vectorised; see the module docstring)."""
    n = state.identity.pages
    if res.pages != n:
        raise StateFileError(f"{state.path}: scan of {res.pages} pages for a file of {n} pages")
    f = res.flags
    present = (f & np.uint16(PageFlags.PRESENT)) != 0
    read = (f & np.uint16(PageFlags.READ)) != 0
    ksm = (f & np.uint16(PageFlags.KSM)) != 0
    zero = (f & np.uint16(PageFlags.ZERO)) != 0
    same_process = state.pid == pid and state.scans > 0
    old_flags = state.flags if same_process else np.zeros(n, dtype=np.uint16)
    old_present = (old_flags & np.uint16(PageFlags.PRESENT)) != 0
    old_known = old_present & (state.hashes != 0)

    new_hash = np.where(read, res.hashes, np.uint64(0))
    new_hash = np.where(zero, np.uint64(ZERO_HASH), new_hash)
    carried = ksm & ~zero
    new_hash = np.where(carried & old_known, state.hashes, new_hash)
    # Read pages: stable if the content hash is the one the last scan saw.  KSM pages:
    # stable if they were present before (merged pages are write-protected); one whose
    # hash hv never saw keeps hash 0 and the index groups it by its frame.
    same = np.where(ksm, old_present, old_known & (new_hash == state.hashes) & (new_hash != 0))
    same &= present
    stable = np.where(same, np.minimum(state.stable.astype(np.uint32) + 1, STABLE_MAX), 0)

    state.begin_write()
    try:
        state.hashes[:] = new_hash
        state.pfns[:] = res.pfns
        state.flags[:] = f
        state.stable[:] = stable.astype(np.uint16)
    finally:
        state.end_write(state.scans + 1, pid, time.time() if when_unix_s is None else when_unix_s)
