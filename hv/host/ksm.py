"""KSM, the kernel's same-page merging, through /sys/kernel/mm/ksm.

Names follow the kernel's documentation (Documentation/admin-guide/mm/ksm.rst)
verbatim: ``pages_to_scan``, ``sleep_millisecs``, ``pages_sharing``...  hv changes
KSM's tunables only through :class:`Ksm`, which first saves what was there (in hv's
state directory, so a crashed hv is still undone by the next one) and puts it back
with :meth:`Ksm.restore`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hv import paths
from hv.errors import HostError
from hv.host.sysfs import Sysfs

KSM_DIR = "/sys/kernel/mm/ksm"
# Tunables hv may change.  While advisor_mode is scan-time the kernel refuses writes to
# pages_to_scan (EINVAL), so the advisor is turned off first and set last but for run;
# run comes last so KSM restarts with its old settings already in place.
TUNABLES = ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
            "advisor_max_cpu", "advisor_target_scan_time", "advisor_min_pages_to_scan",
            "advisor_max_pages_to_scan", "smart_scan", "advisor_mode", "run")
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
            "general_profit", "ksm_zero_pages", "pages_scanned", "pages_skipped",
            "stable_node_chains", "stable_node_dups")


@dataclass(frozen=True)
class KsmStats:
    """KSM's counters (pages), and ksmd's CPU time so far (seconds)."""

    counters: dict[str, int]
    ksmd_cpu_s: float

    def __getitem__(self, name: str) -> int:
        return self.counters.get(name, 0)


def ksmd_pid() -> int | None:
    """The pid of the ksmd kernel thread, if there is one."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as f:
                    if f.read().strip() == "ksmd":
                        return int(entry.name)
            except OSError:
                continue
    return None


def ksmd_cpu_seconds(pid: int | None) -> float:
    """utime + stime of ksmd, in seconds (0.0 if there is no ksmd)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Ksm:
    """Read KSM's state and change its tunables, saving and restoring the originals."""

    def __init__(self, sysfs: Sysfs | None = None, root: str = KSM_DIR,
                 saved_file: Path | None = None) -> None:
        self.sysfs = sysfs or Sysfs()
        self.root = root
        self.saved_file = saved_file or paths.state_dir() / "ksm-saved.json"
        self._ksmd = ksmd_pid()
        if not os.path.isdir(root):
            raise HostError(f"no {root}: this kernel has no KSM (CONFIG_KSM)")

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def get(self, name: str) -> str:
        """A tunable's value; for a choice like ``[none] scan-time``, the chosen one."""
        text = self.sysfs.read(self._path(name))
        return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text

    def tunables(self) -> dict[str, str]:
        """The current value of every tunable this kernel has."""
        return {n: self.get(n) for n in TUNABLES if self.has(n)}

    def stats(self) -> KsmStats:
        counters = {n: self.sysfs.read_int(self._path(n)) for n in COUNTERS if self.has(n)}
        return KsmStats(counters, ksmd_cpu_seconds(self._ksmd))

    def save(self) -> dict[str, str]:
        """Record the original tunables once (an earlier, unrestored record wins)."""
        if self.saved_file.exists():
            try:
                saved: dict[str, str] = json.loads(self.saved_file.read_text())
                return saved
            except ValueError:
                pass  # a torn file from a crash: the current values are the best we have
        original = self.tunables()
        paths.write_json_atomic(self.saved_file, original)
        return original

    def set(self, **values: object) -> None:
        """Write tunables (saving the originals first).  ``run`` is written last."""
        self.save()
        for name in values:
            if not self.has(name):
                raise HostError(f"this kernel's KSM has no {name!r}")
        self._write_in_order({n: str(v) for n, v in values.items()})

    def _write_in_order(self, values: dict[str, str]) -> None:
        if self.has("advisor_mode") and self.get("advisor_mode") != "none":
            if values.get("advisor_mode", "none") == "none" or any(
                    n == "pages_to_scan" for n in values):
                self.sysfs.write(self._path("advisor_mode"), "none")
        for name in TUNABLES:
            if name in values and self.get(name) != values[name]:
                self.sysfs.write(self._path(name), values[name])

    def restore(self) -> bool:
        """Put back the tunables saved by :meth:`save`; True if there was anything to restore."""
        if not self.saved_file.exists():
            return False
        try:
            saved = json.loads(self.saved_file.read_text())
        except (OSError, ValueError) as exc:
            raise HostError(f"cannot read KSM's saved settings {self.saved_file}: {exc}; "
                            "check /sys/kernel/mm/ksm by hand, then remove the file") from exc
        self._write_in_order({n: v for n, v in saved.items() if n in TUNABLES and self.has(n)})
        self.saved_file.unlink()
        return True
