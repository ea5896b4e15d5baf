"""The paper's experiments, reproduced on real guests: ``hv bench FIGURE``.

One module per figure, each booting its own guests and running its baselines in the
same run, writing JSON and a PNG (``docs/bench-*/`` holds committed runs):

- :mod:`~hv.bench.balloon`   Figure 2: ballooned against configured memory (and hypervisor swap)
- :mod:`~hv.bench.sharing`   Figure 4: sharing against the number of VMs, per KSM policy
- :mod:`~hv.bench.workloads` Figure 5: sharing in Debian guests running real services
- :mod:`~hv.bench.sampling`  Figure 6: working-set estimates against the true working set
- :mod:`~hv.bench.tax`       Figure 7: the idle memory tax moves memory to the active VM
- :mod:`~hv.bench.overcommit` Figure 8: five VMs overcommit the host; states and allocations

Shared parts: :mod:`~hv.bench.fleet` (boot a fleet of guests, read their console
events, always stop them), :mod:`~hv.bench.daemon` (an ``hv run`` with its config file
and event log) and :mod:`~hv.bench.report` (JSON, plots).  The commands
are in :mod:`~hv.bench.commands`.  The experiments use hv's library and commands and
the daemon's published status; never the daemon's internals.
"""

__all__ = ["fleet", "daemon", "report", "balloon", "sharing", "workloads", "sampling", "tax", "overcommit",
           "commands"]
