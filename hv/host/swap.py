"""Host swap: what exists (``/proc/swaps``), and the swap file hv may create.

Hypervisor swapping and the working-set sampler both rely on
``process_madvise(MADV_PAGEOUT)``, which invalidates an anonymous page only when it
can be written to swap, so hv needs host swap.  ``hv swap create SIZE`` makes one
swap file (``fallocate``, mode 0600, ``mkswap``, ``swapon``) and records it in hv's
state directory (``swap.json``); ``hv swap remove`` disables and deletes only a
file recorded there, never swap that someone else set up.

Every command hv runs on the host goes through :func:`_run`, so a failure is one
:class:`~hv.errors.HostError` naming the command and its message.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hv import paths
from hv.errors import HostError, UsageError
from hv.host import proc
from hv.units import KiB, MiB, PAGE_SIZE, format_size

__all__ = [
    "MIN_SWAP_BYTES",
    "SwapArea",
    "areas",
    "totals",
    "default_path",
    "recorded",
    "create",
    "remove",
]

# mkswap refuses areas under 10 pages; 16 MiB is the least that is worth having
# (the sampler alone pages out a few hundred pages per VM per period).
MIN_SWAP_BYTES = 16 * MiB


@dataclass(frozen=True)
class SwapArea:
    """One line of ``/proc/swaps``; ``hv_created`` if hv's record names it."""

    path: str
    kind: str
    size_bytes: int
    used_bytes: int
    priority: int
    hv_created: bool


def _record_file() -> Path:
    return paths.state_dir() / "swap.json"


def default_path() -> Path:
    """Where ``hv swap create`` puts the file unless told otherwise."""
    return paths.state_dir() / "swapfile"


def recorded() -> list[str]:
    """Paths of the swap files hv created and has not removed yet."""
    try:
        data = json.loads(_record_file().read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise HostError(f"{_record_file()} is corrupt: {exc}") from exc
    files = data.get("files", []) if isinstance(data, dict) else []
    return [str(f) for f in files]


def _write_record(files: list[str]) -> None:
    paths.write_json_atomic(_record_file(), {"files": files}, indent=1)


def active_paths() -> frozenset[str]:
    """The paths of the host's active swap areas (one read of ``/proc/swaps``)."""
    with open("/proc/swaps") as f:
        return frozenset(line.split()[0].replace("\\040", " ")
                         for line in f.readlines()[1:] if line.split())


def areas() -> list[SwapArea]:
    """Every active swap area of the host."""
    mine = {os.path.realpath(p) for p in recorded()}
    out: list[SwapArea] = []
    with open("/proc/swaps") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) < 5:
                continue
            # /proc/swaps escapes spaces in paths as \040
            path = parts[0].replace("\\040", " ")
            out.append(SwapArea(path, parts[1], int(parts[2]) * KiB, int(parts[3]) * KiB,
                                int(parts[4]), os.path.realpath(path) in mine))
    return out


def totals() -> tuple[int, int]:
    """(total, free) host swap in bytes, from /proc/meminfo."""
    info = proc.meminfo()
    return info.get("SwapTotal", 0), info.get("SwapFree", 0)


def _run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise HostError(f"cannot run {cmd[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        msg = (done.stderr or done.stdout).strip().splitlines()
        raise HostError(f"{' '.join(cmd)} failed (exit {done.returncode}): "
                        f"{msg[-1] if msg else 'no message'}")


def create(size_bytes: int, path: str | Path | None = None) -> Path:
    """Create, format and enable a swap file of ``size_bytes``; record it as hv's."""
    if size_bytes < MIN_SWAP_BYTES:
        raise UsageError(f"swap size {format_size(size_bytes)} is below the minimum "
                         f"{format_size(MIN_SWAP_BYTES)}")
    size_bytes -= size_bytes % PAGE_SIZE
    p = Path(path) if path is not None else default_path()
    if p.exists() or p.is_symlink():
        raise UsageError(f"{p} already exists; hv creates a new swap file only "
                         "(remove it, or pass --path)")
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise HostError(f"cannot create {p}: {exc.strerror}") from exc
    try:
        try:
            # Real blocks, not a sparse file: swapon refuses files with holes.
            os.posix_fallocate(fd, 0, size_bytes)
        except OSError as exc:
            raise HostError(f"cannot allocate {format_size(size_bytes)} for {p}: "
                            f"{exc.strerror}") from exc
        finally:
            os.close(fd)
        _run(["mkswap", str(p)])
        _run(["swapon", str(p)])
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    _write_record([*recorded(), str(p.resolve())])
    return p


def remove(path: str | Path | None = None) -> list[str]:
    """Disable and delete the swap file(s) hv created; returns the paths removed.

    With ``path``, only that file, and only if hv's record names it.  Without, every
    file hv recorded.  ``swapoff`` needs room in memory for what is swapped out;
    if it fails, the file stays enabled and recorded.
    """
    mine = recorded()
    if path is not None:
        want = str(Path(path).resolve())
        if want not in mine:
            raise UsageError(f"{path} is not a swap file hv created "
                             f"(hv's files: {', '.join(mine) or 'none'})")
        targets = [want]
    else:
        targets = list(mine)
    active = {os.path.realpath(a.path) for a in areas()}
    removed: list[str] = []
    for target in targets:
        if target in active:
            _run(["swapoff", target])
        Path(target).unlink(missing_ok=True)
        mine.remove(target)
        _write_record(mine)
        removed.append(target)
    return removed
