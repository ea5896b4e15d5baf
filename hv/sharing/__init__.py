"""Content-based page sharing (ESX section 4), the Linux way.

hv's native scanner hashes every present guest page; this package keeps the result
as per-VM page-state files (:mod:`hv.sharing.state`), builds the paper's table of
shared and hint pages over all VMs (:mod:`hv.sharing.index`), steers KSM from it
(:mod:`hv.sharing.governor`), and ties these to running VMs (:mod:`hv.sharing.scan`).
``hv share`` is in :mod:`hv.sharing.commands`; ``hv bench sharing`` in
:mod:`hv.bench.sharing`.
"""

__all__ = ["state", "index", "governor", "scan"]
