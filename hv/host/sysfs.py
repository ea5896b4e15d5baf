"""The one seam for every write hv makes to /sys (and the reads next to them).

Tests can pass a :class:`Sysfs` with ``record_only=True`` to get the exact
transcript of what hv would write, without touching the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hv.errors import HostError


@dataclass
class Sysfs:
    """Reads and writes sysfs attribute files, keeping a transcript of writes."""

    record_only: bool = False
    writes: list[tuple[str, str]] = field(default_factory=list)

    def read(self, path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise HostError(f"cannot read {path}: {exc.strerror}") from exc

    def read_int(self, path: str) -> int:
        text = self.read(path)
        try:
            return int(text)
        except ValueError as exc:
            raise HostError(f"{path} holds {text!r}, not a number") from exc

    def write(self, path: str, value: object) -> None:
        text = str(value)
        self.writes.append((path, text))
        if self.record_only:
            return
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:
            raise HostError(f"cannot write {text!r} to {path}: {exc.strerror}") from exc
