"""What hv reads from a domain's XML, and its policy under hv's ``<metadata>`` namespace.

A domain may carry its own min, max and shares::

    <metadata>
      <hv:policy xmlns:hv="https://hv.example.org/xmlns/policy/1" min="128M" max="512M" shares="2000"/>
    </metadata>

set with ``virsh metadata DOMAIN https://hv.example.org/xmlns/policy/1 --key hv --set
'<policy min="128M"/>' --live --config``.  Where ``hv run``'s TOML gives a value too,
the TOML wins (:func:`merge_policy`); each value keeps where it came from, and
``hv status`` shows it.  Everything here is pure: text in, dataclasses out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from hv.errors import ConfigError, UsageError, VMError
from hv.units import format_size, parse_size

__all__ = ["POLICY_NS", "DomainXml", "XmlPolicy", "Policy", "parse_domain_xml", "merge_policy"]

POLICY_NS = "https://hv.example.org/xmlns/policy/1"


@dataclass(frozen=True)
class XmlPolicy:
    """The ``<hv:policy>`` attributes a domain carries (None: not given)."""

    min_bytes: int | None = None
    max_bytes: int | None = None
    shares: int | None = None


@dataclass(frozen=True)
class DomainXml:
    """The facts hv needs from a live domain's XML."""

    accel: str  # "kvm" or "tcg" (<domain type='qemu'>)
    memory_bytes: int  # <memory>: the most the balloon can give back
    balloon_model: str | None  # <memballoon model=...>; None when absent or model='none'
    stats_period_s: int  # <memballoon><stats period=...>; 0 when not set
    deflate_on_oom: bool
    nosharepages: bool  # <memoryBacking><nosharepages/>: opted out of page sharing
    policy: XmlPolicy


@dataclass(frozen=True)
class Policy:
    """A VM's effective min, max and shares, and where each came from."""

    min_bytes: int
    max_bytes: int
    shares: int
    source: dict[str, str]  # "min" / "max" / "shares" -> "config" | "domain" | "default"


_UNIT_BYTES = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2,
               "mib": 1024**2, "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}


def _scaled(el: ET.Element, vm: str) -> int:
    """A libvirt scaled integer (``<memory unit='KiB'>262144</memory>``) in bytes."""
    unit = el.get("unit", "KiB").lower()
    if unit not in _UNIT_BYTES or not (el.text or "").strip().isdigit():
        raise VMError(vm, f"domain XML: cannot read <{el.tag} unit={unit!r}>{el.text}</{el.tag}>")
    return int(el.text.strip()) * _UNIT_BYTES[unit]  # type: ignore[union-attr]


def _policy(el: ET.Element | None, vm: str) -> XmlPolicy:
    if el is None:
        return XmlPolicy()
    where = f"{vm}: <metadata> hv:policy"
    unknown = set(el.attrib) - {"min", "max", "shares"}
    if unknown:
        raise ConfigError(f"{where}: unknown attribute {sorted(unknown)[0]!r} "
                          "(known: max, min, shares)")

    def size(key: str) -> int | None:
        text = el.get(key)
        if text is None:
            return None
        try:
            value = parse_size(text)
        except UsageError as exc:
            raise ConfigError(f"{where} {key}: {exc}") from exc
        if value <= 0:
            raise ConfigError(f"{where} {key}: must be more than 0, got {text!r}")
        return value

    shares = None
    if el.get("shares") is not None:
        text = el.get("shares", "")
        if not text.strip().isdigit() or int(text) <= 0:
            raise ConfigError(f"{where} shares: must be a whole number more than 0, not {text!r}")
        shares = int(text)
    return XmlPolicy(size("min"), size("max"), shares)


def parse_domain_xml(text: str, vm: str) -> DomainXml:
    """The facts of :class:`DomainXml` from ``virDomainGetXMLDesc`` output."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise VMError(vm, f"domain XML does not parse: {exc}") from exc
    memory = root.find("memory")
    if memory is None:
        raise VMError(vm, "domain XML has no <memory>")
    balloon = root.find("devices/memballoon")
    model = balloon.get("model") if balloon is not None else None
    stats = balloon.find("stats") if balloon is not None else None
    period = stats.get("period", "0") if stats is not None else "0"
    return DomainXml(
        accel="kvm" if root.get("type") == "kvm" else "tcg",
        memory_bytes=_scaled(memory, vm),
        balloon_model=None if model in (None, "none") else model,
        stats_period_s=int(period) if period.isdigit() else 0,
        deflate_on_oom=balloon is not None and balloon.get("deflate-on-oom") == "on",
        nosharepages=root.find("memoryBacking/nosharepages") is not None,
        policy=_policy(root.find(f"metadata/{{{POLICY_NS}}}policy"), vm),
    )


def merge_policy(vm: str, config: XmlPolicy, domain: XmlPolicy, default_min_bytes: int,
                 default_max_bytes: int, default_shares: int) -> Policy:
    """Each of min, max, shares from ``config`` (the TOML), else ``domain`` (its XML
    metadata), else the default; ConfigError if the result does not hold together."""
    source: dict[str, str] = {}

    def pick(key: str, default: int) -> int:
        for origin, given in (("config", config), ("domain", domain)):
            value = getattr(given, key if key == "shares" else f"{key}_bytes")
            if value is not None:
                source[key] = origin
                return int(value)
        source[key] = "default"
        return default

    max_bytes = pick("max", default_max_bytes)
    min_bytes = pick("min", min(default_min_bytes, max_bytes))
    shares = pick("shares", default_shares)
    if min_bytes > max_bytes:
        raise ConfigError(f"{vm}: min {format_size(min_bytes)} (from {source['min']}) is larger "
                          f"than max {format_size(max_bytes)} (from {source['max']})")
    return Policy(min_bytes, max_bytes, shares, source)
