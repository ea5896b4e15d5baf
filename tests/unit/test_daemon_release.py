"""The daemon's side of freeing paged-out memory (``hv.daemon.act.release``): what it
asks, and that a problem is told once.  The kernel's side runs for real in
tests/functional/test_reclaim.py and test_pressure.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hv.daemon import act
from hv.daemon.managed import Context
from hv.errors import HostError
from hv.guardian import GuardFile, undo
from hv.host.reclaim import Release, restore_sysctls
from hv.host.sysfs import Sysfs
from hv.units import PAGE_SIZE


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def write(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def context(tmp_path: Path, told: list[str]) -> Context:
    return Context(log=Log(), guard=GuardFile(tmp_path / "guard.json"),  # type: ignore[arg-type]
                   notify=told.append)


def test_release_asks_for_what_was_paged_out_and_records_the_tunable(tmp_path: Path,
                                                                      monkeypatch: Any) -> None:
    asked: list[int] = []

    def fake(nbytes: int, remember: Any) -> Release:
        asked.append(nbytes)
        remember({"/proc/sys/vm/min_unmapped_ratio": "1"})
        assert GuardFile.load(tmp_path / "guard.json").sysctls == {
            "/proc/sys/vm/min_unmapped_ratio": "1"}
        remember({})
        return Release(nbytes, nbytes // 2)

    monkeypatch.setattr(act.reclaim, "release", fake)
    told: list[str] = []
    c = context(tmp_path, told)
    assert act.release(c, 100).freed_bytes == 100 * PAGE_SIZE // 2
    assert asked == [100 * PAGE_SIZE]
    assert c.guard.sysctls == {} and GuardFile.load(c.guard.path).empty
    assert told == [] and c.release_problem is None


def test_a_problem_is_told_once_and_page_out_goes_on(tmp_path: Path, monkeypatch: Any) -> None:
    results: list[Release | HostError] = [
        Release(0, 0, "no interface"), Release(0, 0, "no interface"),
        HostError("cannot write 0"), Release(4096, 4096)]

    def fake(nbytes: int, remember: Any) -> Release:
        r = results.pop(0)
        if isinstance(r, HostError):
            raise r
        return r

    monkeypatch.setattr(act.reclaim, "release", fake)
    told: list[str] = []
    c = context(tmp_path, told)
    freed = [act.release(c, 1).freed_bytes for _ in range(4)]
    assert freed == [0, 0, 0, 4096]
    assert told == ["paged-out memory is not freed: no interface",
                    "paged-out memory is not freed: cannot write 0"]
    assert c.release_problem is None
    assert [e for e, _ in c.log.events] == ["release_failed", "release_failed"]  # type: ignore[attr-defined]


def test_a_garbled_guard_file_writes_nothing_to_the_host(tmp_path: Path) -> None:
    path = tmp_path / "guard.json"
    for sysctls in ({"/proc/sys/kernel/panic": "1"},
                    {"/proc/sys/vm/min_unmapped_ratio": "1; reboot"},
                    {"/proc/sys/vm/min_unmapped_ratio": "1000"}):
        GuardFile(path, sysctls=sysctls).save()
        done = undo(path)
        assert len(done) == 1 and done[0].startswith("cannot restore"), done
        assert GuardFile.load(path).sysctls == sysctls  # kept for a look, not acted on
    recorder = Sysfs(record_only=True)
    restore_sysctls({"/proc/sys/vm/min_unmapped_ratio": "1"}, recorder)
    assert recorder.writes == [("/proc/sys/vm/min_unmapped_ratio", "1")]
