"""Writing an experiment's results: JSON beside a PNG, in one output folder.

Every experiment writes ``NAME.json`` (its configuration, the host it ran on and its
measurements) and ``NAME.png`` under its ``--out`` folder; matplotlib draws off-screen.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from hv.units import MiB, PAGE_SIZE

__all__ = ["host_facts", "jsonable", "write_json", "pyplot", "mib"]


def mib(pages: float) -> float:
    """Pages as MiB."""
    return pages * PAGE_SIZE / MiB


def host_facts() -> dict[str, Any]:
    """What a reader needs to compare runs: kernel, cores, memory."""
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "mem_total_mib": total_kib // 1024}


def jsonable(value: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (with the host's facts added) as indented JSON; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable({"host": host_facts(), **doc}), indent=1) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib's pyplot, drawing off-screen (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
