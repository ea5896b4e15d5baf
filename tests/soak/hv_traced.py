"""`hv` with tracemalloc, for finding what grows in a soak (``scripts/soak.sh --trace-malloc``).

    python -m tests.soak.hv_traced run --config ... --log ...

Each SIGUSR2 dumps a tracemalloc snapshot to ``$HV_SOAK_TRACE.N`` (N = 1, 2, ...);
:func:`compare` lists the allocation sites that grew most between two of them.  A
diagnostic only: tracing slows every allocation, so a traced run's ticks and CPU are
not hv's.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from typing import Any

FRAMES = 12  # deep enough to get from numpy or a dict up to hv's own code


def _dump(*_: Any) -> None:
    base = os.environ["HV_SOAK_TRACE"]
    n = 1
    while os.path.exists(f"{base}.{n}"):
        n += 1
    tracemalloc.take_snapshot().dump(f"{base}.{n}")


def compare(first: str, last: str, top: int = 15) -> dict[str, Any]:
    """Live traced memory in ``first`` and ``last``, and the sites that grew most."""
    a = tracemalloc.Snapshot.load(first)
    b = tracemalloc.Snapshot.load(last)
    out = []
    for stat in b.compare_to(a, "traceback")[:top]:
        frames = [f"{f.filename.split('/site-packages/')[-1].split('/wt-soak/')[-1]}:{f.lineno}"
                  for f in stat.traceback]
        out.append({"growth_kib": round(stat.size_diff / 1024, 1), "now_kib": round(stat.size / 1024, 1),
                    "blocks_growth": stat.count_diff, "where": [x for x in frames if "hv/" in x][:6] or frames[:3]})
    total = [round(sum(s.size for s in snap.statistics("filename")) / 2**20, 1) for snap in (a, b)]
    return {"traced_mib_first": total[0], "traced_mib_last": total[1], "sites": out}


if __name__ == "__main__":
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR2, _dump)
    from hv.cli import main
    sys.exit(main(sys.argv[1:]))
