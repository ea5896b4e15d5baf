"""QMP answers of the right and wrong shapes, through the VM seam (hv/qemu/vm.py over
hv/qemu/qmp.py), from a real unix-socket peer that greets like QMP.

Every command hv sends to attach to a VM and to run it (status, balloon, statistics)
is answered from a table: QEMU's healthy answers, some of them replaced by random
JSON or mutated (a field dropped, a field's value replaced, a field added).  Each step
either gives a valid result (types and ranges as hv documents them) or one
:class:`~hv.errors.HvError` line, which names the command when an answer is malformed
(hv/qemu/answers.py); never another exception, never a hang.

The peer is :class:`tests.functional.peers.FakeQMP` (a real socket and QMP's framing);
every feature that talks to QEMU is also tested against real QEMU elsewhere.
"""

from __future__ import annotations

import asyncio
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from hv.errors import HvError
from hv.qemu.vm import VM, GuestStats, VMInfo
from tests.functional.peers import FakeQMP
from tests.property.conftest import examples, one_line

MiB = 1024 * 1024

# A whole step (attach and every call) against a peer answering at once takes
# milliseconds; 20 s means hv is waiting for something that will not come.
STEP_TIMEOUT_S = 20.0

STATS = {"stat-total-memory": 220 * MiB, "stat-free-memory": 150 * MiB,
         "stat-available-memory": 180 * MiB, "stat-disk-caches": 10 * MiB, "stat-swap-in": 0,
         "stat-swap-out": 0, "stat-major-faults": 12, "stat-minor-faults": 3400}

# QEMU's answers to what hv asks, keyed by command (and the argument that selects one).
HEALTHY: dict[str, Any] = {
    "query-kvm": {"enabled": False, "present": True},
    "query-memory-size-summary": {"base-memory": 256 * MiB, "plugged-memory": 0},
    "hmp:gpa2hva 0": "Host virtual address for 0x0 (pc.ram) is 0x7f0000000000\r\n",
    "hmp:info ramblock": ("              Block Name    PSize              Offset               Used"
                          "              Total\r\n                  pc.ram    4 KiB  0x0000000000000000 "
                          "0x0000000010000000 0x0000000010000000\r\n"),
    "qom-list:/machine/peripheral": [],
    "qom-list:/machine/peripheral-anon": [{"name": "device[0]", "type": "child<virtio-balloon-pci>"}],
    "qom-get:deflate-on-oom": False,
    "qom-get:guest-stats-polling-interval": 2,
    "qom-get:guest-stats": {"last-update": 0, "stats": STATS},  # last-update: now, at serve time
    "qom-set": {},
    "query-status": {"status": "running", "singlestep": False, "running": True},
    "query-balloon": {"actual": 200 * MiB},
    "balloon": {},
}


class RoutedQMP(FakeQMP):
    """FakeQMP with answers chosen by command *and* the argument that tells calls apart."""

    def _answer(self, msg: dict[str, Any]) -> bytes:
        args = msg.get("arguments") or {}
        command = msg.get("execute")
        key = {"qom-list": f"qom-list:{args.get('path')}",
               "qom-get": f"qom-get:{args.get('property')}"}.get(str(command))
        if key is not None and key in self.answers:
            value = self.answers[key]
            if key == "qom-get:guest-stats" and isinstance(value, dict) and value.get("last-update") == 0:
                value = {**value, "last-update": int(time.time())}
            return json.dumps({"return": value, "id": msg.get("id")}).encode() + b"\n"
        return super()._answer(msg)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["actual", "status", "type", "name",
                                                             "enabled", "base-memory", "stats",
                                                             "last-update", "x"]), inner, max_size=3)),
    max_leaves=8)


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """The healthy ``value`` with one change somewhere inside it."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and value and draw(st.booleans()):
        k = draw(st.sampled_from(sorted(value)))
        how = draw(st.sampled_from(["drop", "replace", "deeper", "add"]))
        if how == "drop":
            del value[k]
        elif how == "replace":
            value[k] = draw(json_values)
        elif how == "deeper":
            value[k] = draw(mutated(value[k]))
        else:
            value[draw(st.text(max_size=6))] = draw(json_values)
        return value
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        value[i] = draw(mutated(value[i]))
        return value
    if isinstance(value, str) and draw(st.booleans()):  # HMP text: cut, or a number changed
        cut = draw(st.integers(0, len(value)))
        return value[:cut] + draw(st.sampled_from(["", "0xzz", "-1", "0x" + "f" * 40, " ", "\n"]))
    return draw(json_values)


@st.composite
def answer_tables(draw: st.DrawFn) -> dict[str, Any]:
    """Healthy answers with 0-3 of them mutated or replaced by random JSON."""
    table = dict(HEALTHY)
    for key in draw(st.lists(st.sampled_from(sorted(HEALTHY)), max_size=3, unique=True), label="broken"):
        table[key] = draw(st.one_of(mutated(HEALTHY[key]), json_values), label=key)
    return table


def check_info(info: VMInfo) -> None:
    assert info.accel in ("kvm", "tcg")
    assert isinstance(info.ram_bytes, int) and 0 < info.ram_bytes
    for r in info.ram:
        # An address range in the QEMU process: the C scanner and /proc/PID/pagemap take
        # it as an unsigned long, so it must end within 2^64.
        assert isinstance(r.hva, int) and isinstance(r.size, int) and r.hva >= 0 and r.size >= 0
        assert r.hva + r.size <= 2**64, f"guest RAM at {r.hva:#x} + {r.size:#x} is past 2^64"
    assert isinstance(info.deflate_on_oom, bool)
    assert info.balloon_path is None or isinstance(info.balloon_path, str)


def check_stats(s: GuestStats) -> None:
    for name in ("total_bytes", "free_bytes", "available_bytes", "disk_caches_bytes",
                 "swap_in_bytes", "swap_out_bytes", "major_faults", "minor_faults"):
        v = getattr(s, name)
        assert v is None or (isinstance(v, int) and 0 <= v < 2**64), (name, v)
    assert s.age_s is None or isinstance(s.age_s, float)


async def drive(sock: Path) -> list[str]:
    """Attach and use the VM as hv does; returns what happened at each step."""
    vm = VM("peer", str(sock))
    outcome = []
    steps: list[tuple[str, Any]] = [("attach", vm.attach), ("status", vm.status), ("balloon_actual", vm.balloon_actual),
             ("guest_stats", lambda: vm.guest_stats(wait_s=0)),
             ("set_balloon", lambda: vm.set_balloon(128 * MiB, force=True))]
    try:
        for name, step in steps:
            try:
                got: Any = await asyncio.wait_for(step(), STEP_TIMEOUT_S)
            except HvError as exc:
                text = one_line(exc)
                assert text.startswith("peer: "), text
                if "malformed answer" in text:
                    assert text.split(": ")[1].split()[0] in {k.split(":")[0] for k in HEALTHY} | {
                        "qom-get", "human-monitor-command"}, text
                outcome.append(f"{name}: error")
                if name == "attach":
                    break
                continue
            if name == "attach":
                check_info(got)
            elif name == "status":
                assert isinstance(got, str)
            elif name == "balloon_actual":
                assert isinstance(got, int) and 0 <= got <= 2**63 - 1
            elif name == "guest_stats":
                check_stats(got)
            outcome.append(f"{name}: ok")
    finally:
        await vm.detach()
    return outcome


@settings(max_examples=examples("socket"))
@given(answer_tables())
# Found here: an address past 2^64 in HMP's gpa2hva answer is accepted as guest RAM
# (hv/qemu/vm.py, _ram_ranges); hv's sampler and page-out then raise OverflowError
# ("Python int too large to convert to C long"), not an HvError.
@example({**HEALTHY, "hmp:gpa2hva 0": "Host virtual address for 0x0 (pc.ram) is 0x" + "f" * 40})
def test_any_answer_is_a_valid_result_or_one_line(table: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="hv-prop-") as d:
        sock = Path(d) / "qmp.sock"
        with RoutedQMP(sock, table):
            outcome = asyncio.run(drive(sock))
    if json.dumps(table, sort_keys=True) == json.dumps(HEALTHY, sort_keys=True):  # False == 0 in Python
        assert all(o.endswith(": ok") for o in outcome), outcome
    failed = [o for o in outcome[1:] if o.endswith("error")]
    event(outcome[0] if outcome[0] == "attach: error"
          else "attached; " + (", ".join(failed) if failed else "every step ok"))


@settings(max_examples=examples("socket"))
@given(st.one_of(json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
                 # Whole lines: a greeting that never ends is a peer that never greets,
                 # which hv waits 5 s for and calls busy (tests/functional/test_bad_peers.py).
                 st.binary(max_size=64).map(lambda b: b.replace(b"\n", b"") + b"\n"),
                 st.sampled_from([b'{"QMP": {"version": {}, "capabilities": []}}\n',
                                  b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},'
                                  b' "package": ""}, "capabilities": "oob"}}\n'])))
def test_any_greeting_attaches_or_fails_in_one_line(greeting: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="hv-prop-") as d:
        sock = Path(d) / "qmp.sock"
        with RoutedQMP(sock, HEALTHY, greeting=greeting):
            outcome = asyncio.run(drive(sock))
    event(outcome[0])
