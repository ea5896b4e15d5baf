"""The policy: pure functions and small classes, no I/O.

- :mod:`~hv.policy.config`     the TOML configuration, validated
- :mod:`~hv.policy.shares`     shares, the idle memory tax, min-funding revocation
- :mod:`~hv.policy.states`     free-memory states, their actions, share before swap
- :mod:`~hv.policy.admission`  admission control (memory and swap reservations)
- :mod:`~hv.policy.estimator`  the working-set estimate from sampled pages
- :mod:`~hv.policy.vmtime`     VM time: the wall time a VM really ran, for sampling periods
"""

from hv.policy.admission import AdmissionControl, Reservation, check_admission, overhead_bytes
from hv.policy.config import Config, HostConfig, VMConfig, load_config, parse_config
from hv.policy.estimator import WorkingSetEstimator
from hv.policy.shares import VMDemand, compute_targets, pick_victim, shares_per_page
from hv.policy.states import (
    Actions,
    MemState,
    SharingAdvice,
    StateTracker,
    Thresholds,
    actions_for,
    share_before_swap,
    should_pause,
)
from hv.policy.vmtime import VMClock

__all__ = [
    "Config",
    "HostConfig",
    "VMConfig",
    "load_config",
    "parse_config",
    "VMDemand",
    "shares_per_page",
    "pick_victim",
    "compute_targets",
    "MemState",
    "Thresholds",
    "StateTracker",
    "Actions",
    "actions_for",
    "should_pause",
    "SharingAdvice",
    "share_before_swap",
    "AdmissionControl",
    "Reservation",
    "check_admission",
    "overhead_bytes",
    "WorkingSetEstimator",
    "VMClock",
]
