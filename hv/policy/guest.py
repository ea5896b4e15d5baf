"""What a guest reports about itself, treated as untrusted input.

The balloon statistics (MemTotal, free, available, ...) are written by the guest's
kernel, so a hostile or broken guest controls every figure.  hv uses them for one
thing only: to keep an inflating balloon from taking memory the guest is using
(the guest-need floor).  They never raise a VM's target, never lift it above its
``max``, and never decide anything about its neighbours.  So:

- :func:`check_report` rejects a report that is stale (older than the polling
  period: QEMU stamps ``last-update`` itself, the guest cannot forge it) or
  impossible (MemTotal 0 or above the VM's memory, free or available above total,
  MemTotal far from what the balloon says the guest has);
- :class:`NeedTrend` — the need is given only once two reports agree that the
  guest's use stopped growing, since reports lag the guest;
- :class:`HiddenEstimate` — the memory the guest kernel reserved at boot (outside
  MemTotal) is the median of several readings taken while the balloon stood
  still, so no single report moves it, and it is bounded.

Pure: figures come in as numbers.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from hv.units import MiB

__all__ = [
    "HIDDEN_MIN_READINGS",
    "HIDDEN_WINDOW",
    "hidden_bound_bytes",
    "GuestReport",
    "check_report",
    "report_is_late",
    "HiddenEstimate",
    "NEED_RISE_BYTES",
    "NeedTrend",
]

# Readings needed before the boot reserve is trusted: a median of three outvotes one
# odd report.
HIDDEN_MIN_READINGS = 3

# Readings kept: the last 7 settled ones (a few seconds each), so a reserve that
# really changed (memory hot-plug) is followed within a minute.
HIDDEN_WINDOW = 7

# Measured: Debian's cloud kernel hides ~40 MiB of a 256 MiB guest (kernel image,
# struct pages, reservations); what scales with RAM stays well under a quarter.
HIDDEN_MIN_BOUND_BYTES = 64 * MiB
HIDDEN_FRACTION_BOUND = 0.25

# MemTotal may run ahead of the balloon's actual size by the driver's in-flight step
# (1 MiB pages, reported a poll later): 16 MiB covers it.
TOTAL_SLACK_BYTES = 16 * MiB

# A guest whose use grew by more than this between two reports is still allocating.
# Reports lag the guest by up to a stats period and a tick (3 s), and a balloon that
# inflates into a guest still filling its memory OOM-kills it (measured: a 600 MiB
# hog relaunched into a 1 GiB guest under low host memory, in the soak).
NEED_RISE_BYTES = 16 * MiB


def hidden_bound_bytes(ram_bytes: int) -> int:
    """The largest boot reserve a guest of ``ram_bytes`` can plausibly have."""
    return max(HIDDEN_MIN_BOUND_BYTES, int(ram_bytes * HIDDEN_FRACTION_BOUND))


@dataclass(frozen=True)
class GuestReport:
    """The figures of one balloon statistics report hv uses (bytes; None = not sent)."""

    total_bytes: int | None
    free_bytes: int | None
    available_bytes: int | None
    age_s: float | None  # seconds since QEMU received it; None: no report


def report_is_late(r: GuestReport, max_age_s: float) -> bool:
    """The report came, but longer ago than ``max_age_s`` (QEMU's stamp, not the guest's)."""
    return r.age_s is not None and r.age_s > max_age_s


def check_report(r: GuestReport, ram_bytes: int, balloon_bytes: int, deflate_on_oom: bool,
                 max_age_s: float) -> str | None:
    """Why the report cannot be used, or None if it is plausible and fresh.

    Without deflate-on-oom, ballooned pages leave the guest's MemTotal, so MemTotal
    lies within the reserve bound below the balloon's actual size; with it, below
    the VM's memory.
    """
    if r.age_s is None:
        return "no statistics report"
    if report_is_late(r, max_age_s):
        return f"statistics {r.age_s:.0f} s old (more than {max_age_s:.0f} s)"
    if r.total_bytes is None or r.available_bytes is None:
        return "statistics without MemTotal or MemAvailable"
    total = r.total_bytes
    if total <= 0:
        return "MemTotal is 0"
    if total > ram_bytes:
        return f"MemTotal {total // MiB} MiB is above the VM's {ram_bytes // MiB} MiB"
    for what, value in (("free", r.free_bytes), ("available", r.available_bytes)):
        if value is not None and not 0 <= value <= total:
            return f"{what} {value // MiB} MiB is outside 0..MemTotal {total // MiB} MiB"
    size = ram_bytes if deflate_on_oom else balloon_bytes
    if total > size + TOTAL_SLACK_BYTES:
        return f"MemTotal {total // MiB} MiB is above the guest's {size // MiB} MiB"
    if total < size - hidden_bound_bytes(ram_bytes) - TOTAL_SLACK_BYTES:
        return (f"MemTotal {total // MiB} MiB is implausibly far below the guest's "
                f"{size // MiB} MiB")
    return None


@dataclass
class HiddenEstimate:
    """The guest kernel's boot reserve (``size - MemTotal``), from settled readings.

    A reading counts only when the balloon stood still since the previous one (a
    MemTotal read while the balloon moves is stale) and the report is a new one.
    The estimate is the median of the last :data:`HIDDEN_WINDOW` readings, known
    after :data:`HIDDEN_MIN_READINGS`, and clamped to :func:`hidden_bound_bytes`.
    """

    readings: deque[int] = field(default_factory=lambda: deque(maxlen=HIDDEN_WINDOW))

    def add(self, size_bytes: int, total_bytes: int, ram_bytes: int) -> None:
        self.readings.append(min(max(0, size_bytes - total_bytes), hidden_bound_bytes(ram_bytes)))

    @property
    def bytes(self) -> int | None:
        if len(self.readings) < HIDDEN_MIN_READINGS:
            return None
        return int(statistics.median(self.readings))


@dataclass
class NeedTrend:
    """The guest-need floor, given only while the guest's use is not growing.

    Fed once per collection with the report's time and the need computed from it.
    :attr:`settled_bytes` is None (the balloon does not shrink) until two distinct
    reports are known and the later one is not above the earlier by more than
    :data:`NEED_RISE_BYTES`; then it is the larger of the two.  A guest that claims
    to grow forever only keeps its balloon where it is: hv then reaches the VM's
    target by hypervisor swap, so the claim gains it nothing.
    """

    report_at: float | None = None
    previous: int | None = None
    current: int | None = None

    def add(self, report_at: float, need_bytes: int | None) -> None:
        if need_bytes is None:
            self.reset()
        elif report_at == self.report_at:
            self.current = need_bytes  # the same report, seen again
        else:
            self.previous, self.current, self.report_at = self.current, need_bytes, report_at

    def reset(self) -> None:
        self.report_at = self.previous = self.current = None

    @property
    def settled_bytes(self) -> int | None:
        if self.previous is None or self.current is None:
            return None
        if self.current > self.previous + NEED_RISE_BYTES:
            return None
        return max(self.current, self.previous)
