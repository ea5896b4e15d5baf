"""The config loader on random TOML documents built from the schema's keys, then mutated.

Every document gives a :class:`~hv.policy.config.Config` whose every value is in its
documented range (finite numbers, sizes within a C long, min <= max, thresholds
strictly decreasing, ...) or one :class:`~hv.errors.ConfigError` line that names the
file; never another exception.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from hv.errors import ConfigError
from hv.policy.config import (
    _HOST_KEYS,
    _THRESHOLD_KEYS,
    _VM_KEYS,
    MAX_IDLE_COLLECT_S,
    Config,
    parse_config,
)
from hv.units import MAX_SIZE_BYTES
from tests.property.conftest import examples, one_line

HOST_MEMORY_BYTES = 24 * 1024**3
SOURCE = "prop.toml"

# Values of every TOML type, with the edge cases the loader must refuse.
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 0.5, 1.0, 0.75, 1e-300, 1e300]))


class Raw(str):
    """TOML text written as is: integers too long for Python's int-to-str limit."""


ints = st.one_of(st.integers(-10, 10**6), st.integers(-2**64, 2**64),
                 st.sampled_from([0, 1, 2**63 - 1, 2**63, -(2**63), 10**30, 10**400]),
                 st.integers(300, 5000).map(lambda n: Raw("9" * n)))
size_texts = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10**6),
              st.sampled_from(["", "K", "M", "G", "T", "MiB", "X", " M"])),
    st.sampled_from(["", "nan", "1.5G", "0.1K", "9" * 40 + "G", "-128M", "128M ", "24G", "25G"]),
    st.text(max_size=10),
)
scalars = st.one_of(st.booleans(), ints, floats, size_texts, st.text(max_size=8))
toml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "high", "x"]), inner, max_size=2)),
    max_leaves=4)

# A valid document: every key of the schema, each maybe absent, with a value in range.
def _size(lo_mib: int, hi_mib: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(lo_mib, hi_mib).map(lambda n: f"{n}M"),
                     st.integers(lo_mib, hi_mib).map(lambda n: n * 1024 * 1024))


@st.composite
def thresholds(draw: st.DrawFn) -> dict[str, float]:
    cuts = sorted(draw(st.lists(st.floats(0.1, 50.0), min_size=4, max_size=4, unique=True)),
                  reverse=True)
    return dict(zip(_THRESHOLD_KEYS, cuts))


VALID_HOST = {
    "managed": _size(1024, 24 * 1024), "tax_rate": st.floats(0.0, 0.99),
    "sample_pages": st.integers(1, 10_000), "sample_period_s": st.floats(0.1, 3600.0),
    "hysteresis_pct": st.floats(0.0, 2.0), "poll_interval_s": st.floats(0.05, 60.0) | st.integers(1, 60),
    "share_interval_s": st.floats(0.0, 600.0), "idle_collect_s": st.floats(0.0, MAX_IDLE_COLLECT_S),
    "thresholds_pct": thresholds(), "reclaim": st.sampled_from(["balloon+swap", "balloon"]),
}
VALID_VM = {"socket": st.sampled_from(["/run/x/qmp.sock", "x.sock"]), "min": _size(64, 1024),
            "max": _size(1024, 4096), "shares": st.integers(1, 10**6), "ksm": st.booleans(),
            "libvirt": st.sampled_from(["web", "db-1"]), "uri": st.just("qemu:///system")}
assert set(VALID_HOST) == _HOST_KEYS and set(VALID_VM) == _VM_KEYS

valid_documents = st.fixed_dictionaries({
    "host": st.fixed_dictionaries({}, optional=VALID_HOST),
    "vm": st.dictionaries(st.sampled_from(["web", "db", "a-b_1", "1st", "W9"]),
                          st.fixed_dictionaries({"min": VALID_VM["min"], "max": VALID_VM["max"]},
                                                optional={k: VALID_VM[k] for k in ("socket", "shares", "ksm")}),
                          max_size=3).map(lambda vms: {
        n: {**t, "socket": t["socket"].replace("x", n)} if "socket" in t else t
        for n, t in vms.items()}),  # one socket per VM: two names for one socket are refused
})

# What a mutation puts in place of a value: anything TOML can say.
hostile = st.one_of(scalars, toml_values)


def mutate_doc(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """0-3 changes to a valid document: a value replaced by anything, a key dropped, an
    unknown key added, a table replaced by a value."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        tables: list[tuple[str, dict[str, Any]]] = [("host", doc["host"])]
        tables += [(f"vm.{n}", t) for n, t in doc["vm"].items() if isinstance(t, dict)]
        if isinstance(doc["host"].get("thresholds_pct"), dict):
            tables.append(("thresholds", doc["host"]["thresholds_pct"]))
        where, t = data.draw(st.sampled_from(tables), label="table")
        kind = data.draw(st.sampled_from(["replace", "replace", "drop", "unknown", "table"]),
                         label="kind")
        keys = sorted(t)
        if kind == "replace" and keys:
            t[data.draw(st.sampled_from(keys))] = data.draw(hostile, label=f"{where} value")
        elif kind == "drop" and keys:
            del t[data.draw(st.sampled_from(keys))]
        elif kind == "unknown":
            t[data.draw(st.sampled_from(["mem", "Min", "shares ", "x", "max_s"]))] = data.draw(hostile)
        elif kind == "table" and doc["vm"]:
            doc["vm"][data.draw(st.sampled_from(sorted(doc["vm"])))] = data.draw(hostile)
    return doc


def key(k: str) -> str:
    bare = k and all(c.isalnum() or c in "-_" for c in k) and k.isascii()
    return k if bare else json.dumps(k)


def toml(value: Any) -> str:
    """A TOML value (inline), floats and all (nan, inf)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{key(k)} = {toml(v)}" for k, v in value.items()) + "}"


def render(doc: dict[str, Any]) -> str:
    lines = []
    for name, value in doc.items():
        if name == "vm" and isinstance(value, dict):
            for vm, t in value.items():
                if isinstance(t, dict):
                    lines += [f"[vm.{key(vm)}]"] + [f"{key(k)} = {toml(v)}" for k, v in t.items()]
                else:
                    lines += ["[vm]", f"{key(vm)} = {toml(t)}"]
        elif isinstance(value, dict):
            lines += [f"[{key(name)}]"] + [f"{key(k)} = {toml(v)}" for k, v in value.items()]
        else:
            lines.insert(0, f"{key(name)} = {toml(value)}")
    return "\n".join(lines) + "\n"


# Text-level mutations: what a hand edit or a torn write does.
def mutate(text: str, data: st.DataObject) -> str:
    for _ in range(data.draw(st.integers(0, 2), label="mutations")):
        kind = data.draw(st.sampled_from(["cut", "insert", "dup_line", "drop_line", "swap"]))
        if not text:
            break
        i = data.draw(st.integers(0, len(text) - 1))
        if kind == "cut":
            text = text[:i]
        elif kind == "insert":
            text = text[:i] + data.draw(st.sampled_from(["=", "[", "]", '"', "\n", "#", " ", "\x00", "é"])) + text[i:]
        else:
            lines = text.splitlines(keepends=True)
            j = i % len(lines)
            if kind == "dup_line":
                lines.insert(j, lines[j])
            elif kind == "drop_line":
                del lines[j]
            else:
                lines[j], lines[-1] = lines[-1], lines[j]
            text = "".join(lines)
    return text


def check_valid(c: Config) -> None:
    """Every value of a config the loader accepted is in its documented range."""
    h = c.host
    numbers = (h.tax_rate, h.sample_period_s, h.hysteresis_pct, h.poll_interval_s,
               h.share_interval_s, h.idle_collect_s, h.thresholds.high_pct, h.thresholds.low_pct)
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), h
    assert 0 < h.managed_bytes <= HOST_MEMORY_BYTES
    assert 0 <= h.tax_rate < 1 and h.sample_pages >= 1 and h.sample_period_s > 0
    assert h.poll_interval_s > 0 and h.share_interval_s >= 0
    assert 0 <= h.idle_collect_s <= MAX_IDLE_COLLECT_S
    t = h.thresholds
    assert 100 > t.high_pct > t.soft_pct > t.hard_pct > t.low_pct > 0
    assert 0 <= h.hysteresis_pct < 100 - t.high_pct
    assert len({v.name for v in c.vms}) == len(c.vms)
    for v in c.vms:
        assert 0 <= v.min_bytes <= MAX_SIZE_BYTES and v.shares > 0
        assert v.max_bytes is not None or v.socket is not None
        if v.max_bytes is not None:
            assert v.min_bytes <= v.max_bytes <= MAX_SIZE_BYTES and v.max_bytes > 0
        assert v.socket is None or v.socket


def load(text: str) -> Config | None:
    try:
        config = parse_config(text, SOURCE, HOST_MEMORY_BYTES, base_dir="/etc/hv")
    except ConfigError as exc:
        assert one_line(exc).startswith(f"{SOURCE}: "), exc
        event("refused")
        return None
    check_valid(config)
    event(f"accepted, {min(len(config.vms), 2)}+ VMs")
    return config


@settings(max_examples=examples("pure"))
@given(valid_documents)
def test_valid_documents_load_as_written(doc: dict[str, Any]) -> None:
    config = load(render(doc))
    assert config is not None, render(doc)
    host = doc["host"]
    for k in ("tax_rate", "sample_period_s", "poll_interval_s"):
        if k in host:
            assert getattr(config.host, k) == host[k]
    for name, t in doc["vm"].items():
        vm = config.vm(name)
        assert vm.shares == t.get("shares", 1000)


@settings(max_examples=examples("pure"))
@given(valid_documents, st.data())
def test_mutated_documents_load_or_fail_in_one_line(doc: dict[str, Any], data: st.DataObject) -> None:
    load(render(mutate_doc(doc, data)))


@settings(max_examples=examples("pure"))
@given(valid_documents, st.data())
def test_torn_or_hand_edited_text_loads_or_fails_in_one_line(doc: dict[str, Any],
                                                             data: st.DataObject) -> None:
    load(mutate(render(mutate_doc(doc, data)), data))


@settings(max_examples=examples("pure"))
@given(st.text(max_size=200))
@example("[host]\ntax_rate = " + "9" * 400)  # found here: OverflowError from math.isfinite
@example("[vm.a]\nmin = 1\nmax = 9223372036854775808")  # found here: max past a C long accepted
@example('[vm.a]\nmin = "1M"\nmax = "1G"\nshares = ' + "9" * 5000)  # ValueError from tomllib
def test_any_text_loads_or_fails_in_one_line(text: str) -> None:
    load(text)
