"""Working-set estimate from statistical sampling (paper, section 5.3).

Each period the sampler invalidates ``n`` random guest pages and, at the end of the
period, counts how many were touched again.  Pages that could not be invalidated
(KSM-merged or pinned pages stay mapped) are left out of ``sampled``, so

    f_sample = touched / sampled

and a period with ``sampled == 0`` gives no estimate at all.  As in the paper, hv
keeps a *slow* exponentially weighted moving average (smooth and stable, lags when
the working set shrinks), a *fast* one (follows a growing working set within a
period or two) and the estimate within the current period; the active fraction is
the largest of the three, so hv reacts at once to growth and only slowly to shrinkage.

The estimate within the current period is the paper's "version of the faster
average that incorporates counts from the current sampling period": while a
period runs, the sampler reports the sampled pages touched *so far*
(:meth:`WorkingSetEstimator.observe_partial`), and the in-period estimate is the
fast average updated with that partial sample, ``fast + FAST_GAIN * (t/n - fast)``.
Touched-so-far is a lower bound of what the whole period will count (a page
touched stays touched), so a partial sample can show growth but never shrinkage:
it only ever *raises* the active fraction (through the max), and a low partial
count early in a period lowers nothing.  The period's :meth:`~WorkingSetEstimator.update`
replaces it.  Before the first full period a partial count says ``t/n`` (reported
as ``in_period``) but the active fraction stays at the unmeasured 1.0, since a lower
bound cannot lower it.

The last period's raw ``touched / sampled`` is kept as ``current`` for reports;
it is not one of the three (the fast average already holds it, with less noise).

Gains, for the default 100 pages per 30 s period (binomial noise of one sample is
up to 0.05 at f = 0.5):

- fast, 0.5: covers half a step in one period and three quarters in two; its noise
  is ``sqrt(g / (2 - g)) = 0.58`` of one sample's.
- slow, 0.1: a time constant of about 10 periods (5 minutes), so after a working
  set shrinks, its idle memory is taxed only once it has stayed idle for minutes;
  noise is 0.23 of one sample's (about +/- 0.01), a stable base for the tax.

Before the first valid period the active fraction is 1.0: a VM hv has not measured
yet is treated as all active, so it is not taxed on a guess.  The first valid
period seeds both averages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hv.errors import StateFileError

__all__ = ["FAST_GAIN", "SLOW_GAIN", "UNMEASURED_ACTIVE_FRACTION", "WorkingSetEstimator"]

# Fast average gain: three quarters of a step within two periods (see module doc).
FAST_GAIN = 0.5

# Slow average gain: ~10-period time constant, +/-0.01 noise at 100 pages (module doc).
SLOW_GAIN = 0.1

# Active fraction assumed before any measurement: all active, so no tax on a guess.
UNMEASURED_ACTIVE_FRACTION = 1.0

# Version of the to_dict() layout, checked by from_dict().
_FORMAT = 1


class WorkingSetEstimator:
    """Slow and fast moving averages of the sampled active fraction, per VM."""

    def __init__(self, fast_gain: float = FAST_GAIN, slow_gain: float = SLOW_GAIN) -> None:
        if not 0.0 < slow_gain <= fast_gain <= 1.0:
            raise ValueError(
                f"gains must satisfy 0 < slow <= fast <= 1, got slow {slow_gain}, "
                f"fast {fast_gain}"
            )
        self.fast_gain = fast_gain
        self.slow_gain = slow_gain
        self._slow: float | None = None
        self._fast: float | None = None
        self._current: float | None = None
        self._in_period: float | None = None
        self._periods = 0

    def update(self, touched: int, sampled: int) -> float:
        """Feed one period's counts; return the active fraction afterwards.

        ``sampled`` counts only the pages that were really invalidated; ``touched``
        those of them found present again.  ``sampled == 0`` changes no average.
        Either way the period is over: its in-period estimate is dropped.
        """
        _check_counts(touched, sampled)
        self._in_period = None
        if sampled == 0:
            return self.active_fraction
        f = touched / sampled
        if self._slow is None or self._fast is None:
            self._slow = self._fast = f
        else:
            self._slow += self.slow_gain * (f - self._slow)
            self._fast += self.fast_gain * (f - self._fast)
        self._current = f
        self._periods += 1
        return self.active_fraction

    def observe_partial(self, touched: int, sampled: int) -> float:
        """Feed the counts of the period in progress so far; return the active fraction.

        ``touched`` is a lower bound of the period's final count, so this can only
        raise the active fraction.  Each call replaces the previous partial estimate
        (the counts only grow within a period); ``sampled == 0`` changes nothing.
        """
        _check_counts(touched, sampled)
        if sampled:
            f = touched / sampled
            self._in_period = f if self._fast is None else self._fast + self.fast_gain * (f - self._fast)
        return self.active_fraction

    def clear_partial(self) -> None:
        """Drop the in-period estimate: the period was discarded, no update() follows."""
        self._in_period = None

    @property
    def slow(self) -> float | None:
        """Slow moving average, or ``None`` before the first valid period."""
        return self._slow

    @property
    def fast(self) -> float | None:
        """Fast moving average, or ``None`` before the first valid period."""
        return self._fast

    @property
    def current(self) -> float | None:
        """The last valid period's ``touched / sampled``, or ``None``."""
        return self._current

    @property
    def in_period(self) -> float | None:
        """The estimate within the period in progress, or ``None`` (module doc)."""
        return self._in_period

    @property
    def periods(self) -> int:
        """How many periods gave an estimate."""
        return self._periods

    @property
    def active_fraction(self) -> float:
        """``max(slow, fast, in_period)``; 1.0 before the first full period."""
        if self._slow is None or self._fast is None:
            return UNMEASURED_ACTIVE_FRACTION
        values = [v for v in (self._slow, self._fast, self._in_period) if v is not None]
        return max(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state, so a restarted hv resumes the averages.

        The in-period estimate is left out: it belongs to a period in progress, which
        a restart abandons (the next period's partial counts rebuild it).
        """
        return {
            "format": _FORMAT,
            "fast_gain": self.fast_gain,
            "slow_gain": self.slow_gain,
            "slow": self._slow,
            "fast": self._fast,
            "current": self._current,
            "periods": self._periods,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkingSetEstimator:
        """Rebuild from :meth:`to_dict` output; a malformed mapping is a StateFileError."""
        try:
            if data["format"] != _FORMAT:
                raise StateFileError(
                    f"working-set estimator state has format {data['format']!r}, "
                    f"expected {_FORMAT}"
                )
            est = cls(fast_gain=float(data["fast_gain"]), slow_gain=float(data["slow_gain"]))
            values = [_fraction_or_none(data[key]) for key in ("slow", "fast", "current")]
            periods = data["periods"]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # 1e400 as an int: OverflowError
            raise StateFileError(f"working-set estimator state is unusable: {exc!r}") from exc
        if not isinstance(periods, int) or isinstance(periods, bool) or periods < 0:
            raise StateFileError(f"working-set estimator state: bad periods {periods!r}")
        if (values[0] is None) != (periods == 0) or (values[0] is None) != (values[1] is None):
            raise StateFileError("working-set estimator state: averages and periods disagree")
        est._slow, est._fast, est._current = values
        est._periods = periods
        return est

    def __repr__(self) -> str:
        return (
            f"WorkingSetEstimator(slow={self._slow}, fast={self._fast}, "
            f"current={self._current}, in_period={self._in_period}, periods={self._periods})"
        )


def _check_counts(touched: int, sampled: int) -> None:
    if sampled < 0 or not 0 <= touched <= max(sampled, 0):
        raise ValueError(f"need 0 <= touched <= sampled, got {touched} of {sampled}")


def _fraction_or_none(value: object) -> float | None:
    """A stored fraction: ``None`` or a number in 0..1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"fraction {value!r} is outside 0..1")
    return float(value)
