"""hv's TOML configuration, validated into frozen dataclasses.

Example, with every default spelled out::

    [host]
    managed = "20G"          # memory hv manages; default: all of the host's memory
    tax_rate = 0.75          # idle memory tax, 0 <= tax_rate < 1
    sample_pages = 100       # working-set sample per VM per period
    sample_period_s = 30     # working-set sampling period
    thresholds_pct = {high = 6, soft = 4, hard = 2, low = 1}
    hysteresis_pct = 0.5     # margin above a better state's threshold to return to it
    poll_interval_s = 1      # how often free memory is read and targets recomputed
    share_interval_s = 10    # how often pages are scanned for sharing and KSM re-steered; 0: off
    idle_collect_s = 10      # how often a VM is read while the host is in high and it needs nothing
    reclaim = "balloon+swap" # "balloon": never page a VM out (hypervisor swap off)

    [vm.web]
    socket = "/run/web/qmp.sock"   # attach to this running QEMU; omit for the guest hv launched as "web"
    min = "128M"                   # guaranteed memory (required)
    max = "512M"                   # configured guest memory; with a socket, default: the VM's size
    shares = 1000                  # relative importance
    ksm = true                     # false: keep its RAM out of page sharing (KSM), live

    [vm.db]
    libvirt = "db"                 # a libvirt domain instead of a socket; uri = "..." optional
    # min, max and shares may also come from the domain's XML <metadata> (hv.libvirt.domxml);
    # where both give one, this file wins.  Defaults: min the balloon floor, max its memory.

    [libvirt]
    uri = "qemu:///system"         # default: $HV_LIBVIRT_URI, else qemu:///system
    manage = "all"                 # also manage every running domain ("listed": only [vm] ones)

The ``[host]`` defaults are the paper's (tax 0.75, 100 pages, 30 s, 6/4/2/1 %).
Sizes are strings such as ``"512M"`` or whole numbers of bytes.  Every problem is
one :class:`~hv.errors.ConfigError` line naming the file and the key, e.g.
``hv.toml: vm.web.min: 600.0M is larger than max 512.0M``.  Unknown keys are refused
wherever they appear, so a misspelt key never silently means its default.

:func:`parse_config` is pure; :func:`load_config` only reads the file and calls it.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hv.errors import ConfigError, UsageError
from hv.policy.shares import DEFAULT_TAX_RATE
from hv.policy.states import DEFAULT_HYSTERESIS_PCT, DEFAULT_THRESHOLDS, Thresholds
from hv.units import MAX_SIZE_BYTES, format_size, parse_size

__all__ = [
    "DEFAULT_SAMPLE_PAGES",
    "DEFAULT_SAMPLE_PERIOD_S",
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_SHARES",
    "DEFAULT_SHARE_INTERVAL_S",
    "DEFAULT_IDLE_COLLECT_S",
    "RECLAIM_MODES",
    "HostConfig",
    "VMConfig",
    "LibvirtConfig",
    "Config",
    "parse_config",
    "load_config",
]

# The paper's sample: 100 pages per VM per period, cheap (100 minor faults) yet
# enough for +/-0.05 on a fraction.
DEFAULT_SAMPLE_PAGES = 100

# The paper's sampling period.
DEFAULT_SAMPLE_PERIOD_S = 30.0

# How often hv scans guest pages for sharing and re-steers KSM: a scan of four 512 MiB
# guests costs ~0.1 s of CPU, so every 10 s is ~1% of a core; 0 turns sharing off.
DEFAULT_SHARE_INTERVAL_S = 10.0

# Free memory can fall by a threshold gap (2 % of 24 GiB, ~490 MiB) in well under a
# second of guest allocation, while one poll (/proc/meminfo, a QMP query per VM)
# costs milliseconds: poll every second.
DEFAULT_POLL_INTERVAL_S = 1.0

# In the high state nothing is reclaimed: a VM that needs nothing (no balloon moving,
# not paused by hv) is read every 10 s instead of every poll, which is most of hv's
# cost on an idle host.  Free memory is still read every poll, and a worse state makes
# every VM due at once; 0 reads every VM every poll.
DEFAULT_IDLE_COLLECT_S = 10.0

# Reads feed each VM's clock for sampling (hv.policy.vmtime), which ignores gaps over
# 30 s: 20 s keeps a margin for a slow read.
MAX_IDLE_COLLECT_S = 20.0

# How hv may reclaim: the paper's ladder (balloon in soft, hypervisor swap in hard and
# when a balloon cannot reach its target, pause in low), or the balloon alone (no
# page-out; pausing in low stays).  The first is the default.
RECLAIM_MODES = ("balloon+swap", "balloon")

# One value for every VM that does not say, so plain configs share memory equally;
# only ratios between VMs matter, and 1000 leaves room for finer weights.
DEFAULT_SHARES = 1000

# VM names become file names in hv's state directory: keep them plain.
_VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

_HOST_KEYS = frozenset(
    {"managed", "tax_rate", "sample_pages", "sample_period_s", "thresholds_pct",
     "hysteresis_pct", "poll_interval_s", "share_interval_s", "idle_collect_s",
     "reclaim"}
)
_THRESHOLD_KEYS = ("high", "soft", "hard", "low")
_VM_KEYS = frozenset({"socket", "libvirt", "uri", "min", "max", "shares", "ksm"})
_LIBVIRT_KEYS = frozenset({"uri", "manage"})
_MANAGE = ("listed", "all")


@dataclass(frozen=True)
class HostConfig:
    """The ``[host]`` table.  Defaults: see the module docstring."""

    managed_bytes: int
    tax_rate: float = DEFAULT_TAX_RATE
    sample_pages: int = DEFAULT_SAMPLE_PAGES
    sample_period_s: float = DEFAULT_SAMPLE_PERIOD_S
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    hysteresis_pct: float = DEFAULT_HYSTERESIS_PCT
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    share_interval_s: float = DEFAULT_SHARE_INTERVAL_S
    idle_collect_s: float = DEFAULT_IDLE_COLLECT_S
    reclaim: str = RECLAIM_MODES[0]

    @property
    def hypervisor_swap(self) -> bool:
        """Whether hv may page VMs out (``reclaim = "balloon+swap"``)."""
        return self.reclaim == "balloon+swap"


@dataclass(frozen=True)
class VMConfig:
    """One ``[vm.NAME]`` table.

    ``socket`` None means hv launches the VM; ``max_bytes`` None (allowed only with
    a socket or a libvirt domain) means the attached VM's own memory size, which the
    caller learns from the VM.  ``libvirt`` names a libvirt domain (at ``uri``, else
    ``[libvirt] uri``); ``given`` says which of min, max and shares this file set, the
    others may come from the domain's XML metadata (0 and defaults stand in until then).
    """

    name: str
    min_bytes: int
    max_bytes: int | None = None
    shares: int = DEFAULT_SHARES
    socket: str | None = None
    ksm: bool = True  # False: the VM opts out of page sharing (side channels across tenants)
    libvirt: str | None = None
    uri: str | None = None
    given: frozenset[str] = frozenset({"min", "max", "shares"})


@dataclass(frozen=True)
class LibvirtConfig:
    """The ``[libvirt]`` table: the default URI, and whether every running domain is managed."""

    uri: str | None = None
    manage_all: bool = False


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    host: HostConfig
    vms: tuple[VMConfig, ...] = ()
    source: str = "<config>"
    libvirt: LibvirtConfig = LibvirtConfig()

    def vm(self, name: str) -> VMConfig:
        """The VM called ``name``; a :class:`UsageError` if there is none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise UsageError(f"no VM {name!r} in {self.source}")


class _Reader:
    """Typed access to one TOML table, raising ConfigError lines that name the key."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any],
                 allowed: frozenset[str]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table
        for key in table:
            if key not in allowed:
                self.fail(key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {self.prefix}{key}: {problem}")

    def number(self, key: str, default: float) -> float:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, not {_describe(value)}")
        if isinstance(value, int) and abs(value) > MAX_SIZE_BYTES:
            self.fail(key, f"{_short(value)} is out of range")  # and maybe past a float
        if not math.isfinite(value):  # nan passes every comparison test below it
            self.fail(key, f"must be a finite number, not {value}")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be a whole number, not {_describe(value)}")
        if abs(value) > MAX_SIZE_BYTES:  # TOML's integers are 64-bit; tomllib's are not
            self.fail(key, f"{_short(value)} is out of range (at most {MAX_SIZE_BYTES})")
        return int(value)

    def size(self, key: str) -> int | None:
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(key, f"must be a size such as \"512M\", not {_describe(value)}")
        if isinstance(value, int):
            if value < 0:
                self.fail(key, f"must not be negative, got {_short(value)}")
            if value > MAX_SIZE_BYTES:
                self.fail(key, f"{_short(value)} bytes is too large (at most "
                               f"{format_size(MAX_SIZE_BYTES)})")
            return value
        if value.strip().startswith("-"):
            self.fail(key, f"must not be negative, got {value!r}")
        try:
            return parse_size(value)
        except UsageError as exc:
            raise ConfigError(f"{self.source}: {self.prefix}{key}: {exc}") from exc

    def string(self, key: str) -> str | None:
        if key not in self.table:
            return None
        value = self.table[key]
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, not {_describe(value)}")
        return str(value)

    def table_of(self, key: str) -> Mapping[str, Any]:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            self.fail(key, f"must be a table, not {_describe(value)}")
        return value


def _short(value: int) -> str:
    """An integer for a message: a 400-digit one is not shown whole."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"


def _describe(value: object) -> str:
    """A value as the user wrote it, for messages."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string",
            dict: "table", list: "array"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if kind not in ("table", "array") else kind


def parse_config(
    text: str,
    source_name: str,
    host_memory_bytes: int,
    base_dir: str | Path | None = None,
) -> Config:
    """Parse and validate TOML ``text``; ``source_name`` names it in messages.

    ``host_memory_bytes`` is the host's memory: the default for ``host.managed`` and
    its upper bound.  A relative ``socket`` is taken relative to ``base_dir`` when
    given (the config file's directory).
    """
    try:
        doc = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4300 digits
        raise ConfigError(f"{source_name}: not valid TOML: {exc}") from exc
    top = _Reader(source_name, "", doc, frozenset({"host", "vm", "libvirt"}))
    host = _parse_host(source_name, top.table_of("host"), host_memory_bytes)
    lv = _Reader(source_name, "libvirt.", top.table_of("libvirt"), _LIBVIRT_KEYS)
    manage = lv.string("manage") or "listed"
    if manage not in _MANAGE:
        lv.fail("manage", f"must be \"all\" or \"listed\", not {manage!r}")
    libvirt = LibvirtConfig(lv.string("uri"), manage == "all")
    vm_tables = top.table_of("vm")
    vms: list[VMConfig] = []
    sockets: dict[str, str] = {}
    for name, table in vm_tables.items():
        vm = _parse_vm(source_name, name, table, base_dir)
        key, where = ((f"{vm.libvirt} at {vm.uri or libvirt.uri or 'the default URI'}", "libvirt")
                      if vm.libvirt is not None else (vm.socket, "socket"))
        if key is not None:
            if key in sockets:
                raise ConfigError(
                    f"{source_name}: vm.{name}.{where}: {key} is already the {where} "
                    f"of vm.{sockets[key]}"
                )
            sockets[key] = name
        vms.append(vm)
    return Config(host=host, vms=tuple(vms), source=source_name, libvirt=libvirt)


def _parse_host(source: str, table: Mapping[str, Any], host_memory_bytes: int) -> HostConfig:
    r = _Reader(source, "host.", table, _HOST_KEYS)
    managed = r.size("managed")
    if managed is None:
        managed = host_memory_bytes
    elif managed == 0:
        r.fail("managed", "must be more than 0")
    elif managed > host_memory_bytes:
        r.fail("managed", f"{format_size(managed)} is more than the host's "
                          f"{format_size(host_memory_bytes)}")
    tax = r.number("tax_rate", DEFAULT_TAX_RATE)
    if not 0.0 <= tax < 1.0:
        r.fail("tax_rate", f"must be at least 0 and below 1, got {tax:g}")
    sample_pages = r.integer("sample_pages", DEFAULT_SAMPLE_PAGES)
    if sample_pages < 1:
        r.fail("sample_pages", f"must be at least 1, got {sample_pages}")
    period = r.number("sample_period_s", DEFAULT_SAMPLE_PERIOD_S)
    if period <= 0:
        r.fail("sample_period_s", f"must be more than 0, got {period:g}")
    poll = r.number("poll_interval_s", DEFAULT_POLL_INTERVAL_S)
    if poll <= 0:
        r.fail("poll_interval_s", f"must be more than 0, got {poll:g}")
    share = r.number("share_interval_s", DEFAULT_SHARE_INTERVAL_S)
    if share < 0:
        r.fail("share_interval_s", f"must be 0 (sharing off) or more, got {share:g}")
    idle_collect = r.number("idle_collect_s", DEFAULT_IDLE_COLLECT_S)
    if not 0 <= idle_collect <= MAX_IDLE_COLLECT_S:
        r.fail("idle_collect_s", f"must be between 0 (every poll) and {MAX_IDLE_COLLECT_S:g}, "
                                 f"got {idle_collect:g}")
    reclaim = r.string("reclaim") or RECLAIM_MODES[0]
    if reclaim not in RECLAIM_MODES:
        r.fail("reclaim", f"must be {' or '.join(map(repr, RECLAIM_MODES))}, not {reclaim!r}")

    t = _Reader(source, "host.thresholds_pct.", r.table_of("thresholds_pct"),
                frozenset(_THRESHOLD_KEYS))
    pct = {k: t.number(k, getattr(DEFAULT_THRESHOLDS, f"{k}_pct")) for k in _THRESHOLD_KEYS}
    for k, v in pct.items():
        if not 0.0 < v < 100.0:
            t.fail(k, f"must be between 0 and 100 percent, got {v:g}")
    if not pct["high"] > pct["soft"] > pct["hard"] > pct["low"]:
        shown = ", ".join(f"{k} = {pct[k]:g}" for k in _THRESHOLD_KEYS)
        raise ConfigError(
            f"{source}: host.thresholds_pct: must be strictly decreasing "
            f"high > soft > hard > low, got {shown}"
        )
    thresholds = Thresholds(pct["high"], pct["soft"], pct["hard"], pct["low"])

    hysteresis = r.number("hysteresis_pct", DEFAULT_HYSTERESIS_PCT)
    if not 0.0 <= hysteresis < 100.0 - pct["high"]:
        r.fail("hysteresis_pct", f"must be at least 0 and keep high + hysteresis below "
                                 f"100, got {hysteresis:g}")
    return HostConfig(
        managed_bytes=managed,
        tax_rate=tax,
        sample_pages=sample_pages,
        sample_period_s=period,
        thresholds=thresholds,
        hysteresis_pct=hysteresis,
        poll_interval_s=poll,
        share_interval_s=share,
        idle_collect_s=idle_collect,
        reclaim=reclaim,
    )


def _parse_vm(source: str, name: str, table: object, base_dir: str | Path | None) -> VMConfig:
    if not _VM_NAME_RE.match(name):
        raise ConfigError(
            f"{source}: vm.{name}: a VM name is 1-64 letters, digits, '-' or '_', "
            f"starting with a letter or digit"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: vm.{name}: must be a table, not {_describe(table)}")
    r = _Reader(source, f"vm.{name}.", table, _VM_KEYS)
    socket = r.string("socket")
    if socket is not None and base_dir is not None:
        socket = str(Path(base_dir) / socket)
    domain = r.string("libvirt")
    uri = r.string("uri")
    if domain is not None and socket is not None:
        r.fail("libvirt", "a VM is either a libvirt domain or a QMP socket, not both")
    if uri is not None and domain is None:
        r.fail("uri", "applies to a libvirt domain only (give libvirt = \"DOMAIN\")")
    if domain is not None and ("/" in domain or any(c.isspace() for c in domain)):
        r.fail("libvirt", f"bad domain name {domain!r} (no '/' or spaces)")
    min_bytes = r.size("min")
    if min_bytes is None and domain is None:
        r.fail("min", "is required (the memory guaranteed to this VM)")
    max_bytes = r.size("max")
    if max_bytes is None and socket is None and domain is None:
        r.fail("max", "is required for a VM hv launches (no socket given)")
    if max_bytes is not None:
        if max_bytes == 0:
            r.fail("max", "must be more than 0")
        if min_bytes is not None and min_bytes > max_bytes:
            r.fail("min", f"{format_size(min_bytes)} is larger than max {format_size(max_bytes)}")
    shares = r.integer("shares", DEFAULT_SHARES)
    if shares <= 0:
        r.fail("shares", f"must be more than 0, got {shares}")
    ksm = table.get("ksm", True)
    if not isinstance(ksm, bool):
        r.fail("ksm", f"must be true or false, not {_describe(ksm)}")
    given = frozenset(k for k in ("min", "max", "shares") if k in table)
    return VMConfig(name=name, min_bytes=min_bytes or 0, max_bytes=max_bytes, shares=shares,
                    socket=socket, ksm=ksm, libvirt=domain, uri=uri, given=given)


def load_config(path: str | Path, host_memory_bytes: int) -> Config:
    """Read ``path`` and :func:`parse_config` it; an unreadable file is a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from exc
    return parse_config(text, str(p), host_memory_bytes, base_dir=p.parent)
