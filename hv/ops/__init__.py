"""Operating a running ``hv run``: what it publishes, shown to people and to Prometheus.

Arrows run one way: :mod:`hv.daemon` publishes a snapshot every tick
(:mod:`hv.daemon.status`); the parts here only read it.

- :mod:`~hv.ops.metrics`   the Prometheus collector over the snapshot
- :mod:`~hv.ops.history`   the bounded in-memory history behind the dashboard
- :mod:`~hv.ops.web`       the HTTP server of ``hv run --metrics``: /metrics, /, /api/*
- :mod:`~hv.ops.top`       ``hv top``, a live terminal view of the snapshot file
- :mod:`~hv.ops.commands`  the ``hv top`` subcommand
"""

from hv.ops.history import History
from hv.ops.metrics import SnapshotCollector
from hv.ops.web import DEFAULT_PORT, OpsServer, parse_listen

__all__ = ["DEFAULT_PORT", "History", "OpsServer", "SnapshotCollector", "parse_listen"]
