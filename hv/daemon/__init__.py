"""``hv run``: the ESX allocation loop for every configured VM, in one asyncio loop.

One file per part, arrows running down this list:

- :mod:`~hv.daemon.loop`      the loop and lifecycle: start, tick, reload, re-attach, stop
- :mod:`~hv.daemon.attach`    attaching one VM (one QEMU managed once, its limits) and admission
- :mod:`~hv.daemon.collect`   collectors: what each tick reads, per VM and for the host
- :mod:`~hv.daemon.act`       controllers: balloon, hypervisor swap, pause
- :mod:`~hv.daemon.sampling`  the working-set sampler of each VM
- :mod:`~hv.daemon.sharing`   the KSM service: sharing scan on a CPU budget, governor
- :mod:`~hv.daemon.merge`     per-VM KSM opt-out: the RAM backend's merge property
- :mod:`~hv.daemon.domains`   libvirt domains: policy from their XML, discovery
- :mod:`~hv.daemon.status`    the published status other commands read
- :mod:`~hv.daemon.managed`   one managed VM and the context the parts share

The rules they apply (pool, balloon goal, swap amount, guest reports) are pure
functions in :mod:`hv.policy`.
"""

from hv.daemon.loop import Daemon, Options, parse_state
from hv.daemon.status import running_status, status_file

__all__ = ["Daemon", "Options", "parse_state", "running_status", "status_file"]
