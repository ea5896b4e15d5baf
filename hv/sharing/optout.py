"""Per-VM opt-out of page sharing: who asked, and what a VM's RAM should be.

Content-based sharing leaks across VMs: a tenant can time writes to learn whether a
neighbour holds a page with the same content (memory-deduplication side channels).
A VM opts out with ``ksm = false`` in its ``[vm.NAME]`` table, or by the admin's
``hv share --opt-out VM`` (``--opt-in VM`` takes it back), which is recorded here,
``STATE/sharing/opt-out.json`` (a sorted list of names, 0600), so it survives hv.

The mechanism is QEMU's: the backend of guest RAM gets ``merge`` = false over QMP
(:meth:`hv.qemu.vm.VM.set_merge`); QEMU madvises it ``MADV_UNMERGEABLE`` and the
kernel unmerges every page KSM had merged.  hv never turns merging *on* for a VM on
its own: only an explicit ``--opt-in``, or taking back in the same run an opt-out
that hv applied, does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hv import paths
from hv.errors import StateFileError

__all__ = ["record_path", "admin_choices", "set_admin_choice", "record_mtime", "wanted",
           "OPTED_OUT"]

OPTED_OUT = "opted out"  # how status and share show a VM out of sharing


def record_path() -> Path:
    return paths.state_dir() / "sharing" / "opt-out.json"


def admin_choices() -> dict[str, bool]:
    """The admin's ``--opt-out`` (False) and ``--opt-in`` (True), by VM name."""
    try:
        choices = json.loads(record_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StateFileError(f"{record_path()}: unreadable: {exc}") from exc
    if not isinstance(choices, dict) or not all(isinstance(v, bool) for v in choices.values()):
        raise StateFileError(f"{record_path()}: not a table of VM name -> true/false")
    return choices


def set_admin_choice(name: str, merge: bool) -> None:
    """Record the admin's choice for ``name``: merging allowed (opt-in) or not (opt-out)."""
    choices = admin_choices()
    choices[name] = merge
    paths.write_json_atomic(record_path(), dict(sorted(choices.items())), indent=1)


def record_mtime() -> float | None:
    """When the record last changed (None: there is none), so a daemon rereads it only then."""
    try:
        return os.stat(record_path()).st_mtime_ns / 1e9
    except FileNotFoundError:
        return None


def wanted(config_ksm: bool, admin: bool | None, now: bool, off_by_hv: bool) -> bool | None:
    """What a managed VM's ``merge`` should become, or None to leave it as it is.

    Out if its config says ``ksm = false`` or the admin opted it out; back in only on
    the admin's ``--opt-in`` or if hv itself took it out (never on hv's own say-so).
    """
    want = config_ksm and admin is not False
    if want == now or (want and not (off_by_hv or admin is True)):
        return None
    return want
