"""libvirt domains in ``hv run``: their handles, their policy, and ``manage = "all"``.

A ``[vm.NAME]`` table with ``libvirt = "DOMAIN"`` is attached through
:class:`~hv.libvirt.Domain`; its min, max and shares come from the TOML where it gives
them, else from the domain's XML ``<metadata>`` (:mod:`hv.libvirt.domxml`), else the
defaults (min: the balloon floor, max: the domain's memory, shares: 1000); where each
came from is published with the status.

With ``[libvirt] manage = "all"``, :class:`Discovery` lists the running domains once a
tick (one libvirt call, on a connection kept open and opened again after libvirtd
restarts); one not managed yet is attached under its own name and joins
at the next tick; one that stops is dropped like any VM whose QEMU exits (and found
again if it starts).  A domain hv cannot manage (no balloon, a name clash) is said
once, and tried again only after it has stopped and started again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Collection

from hv.errors import ConfigError, HvError
from hv.libvirt import Domain, DomainRef, Lister, XmlPolicy, merge_policy, uri_of
from hv.libvirt.domxml import DomainXml
from hv.libvirt.naming import PREFIX
from hv.policy.config import DEFAULT_SHARES, Config, VMConfig
from hv.qemu.vm import VM, balloon_floor

__all__ = ["domain_handle", "effective", "config_key", "config_uri", "discovered_config",
           "metadata_now", "Discovery"]

CONFIG_SOURCE = {"min": "config", "max": "config", "shares": "config"}


def config_uri(config: Config, cfg: VMConfig) -> str:
    return uri_of(cfg.uri or config.libvirt.uri)


def domain_handle(config: Config, cfg: VMConfig) -> Domain:
    """The (unattached) handle of a ``libvirt = "DOMAIN"`` VM."""
    assert cfg.libvirt is not None
    return Domain(DomainRef(cfg.libvirt, config_uri(config, cfg)), cfg.name)


def config_key(config: Config, cfg: VMConfig) -> str:
    """What identifies a VM's QEMU in the config: its domain and URI, for reloads."""
    return f"{PREFIX}{cfg.libvirt}#{config_uri(config, cfg)}"


def effective(cfg: VMConfig, vm: VM, xml: DomainXml | None = None
              ) -> tuple[VMConfig, dict[str, str]]:
    """The VM's config with min, max and shares merged from its domain's metadata
    (``xml``, else the one read at attach; a QMP VM's is the file's own); and where each
    value came from."""
    xml = xml or (vm.xml if isinstance(vm, Domain) else None)
    if xml is None:
        return cfg, dict(CONFIG_SOURCE)
    given = XmlPolicy(cfg.min_bytes if "min" in cfg.given else None,
                      cfg.max_bytes if "max" in cfg.given else None,
                      cfg.shares if "shares" in cfg.given else None)
    ram = vm.info.ram_bytes
    policy = merge_policy(f"vm.{cfg.name}", given, xml.policy, balloon_floor(ram), ram,
                          DEFAULT_SHARES)
    merged = dataclasses.replace(cfg, min_bytes=policy.min_bytes, max_bytes=policy.max_bytes,
                                 shares=policy.shares)
    return merged, policy.source


async def metadata_now(vm: VM) -> DomainXml | None:
    """A domain's XML read again (for a reload: its policy metadata may have changed);
    the one read at attach if libvirt cannot answer now.  Bad metadata raises."""
    if not isinstance(vm, Domain):
        return None
    try:
        return await vm.read_xml()
    except ConfigError:
        raise
    except HvError:
        return vm.xml


def discovered_config(domain: str) -> VMConfig:
    """The config of a domain found by ``manage = "all"``: everything from its metadata
    or the defaults."""
    return VMConfig(name=domain, min_bytes=0, libvirt=domain, given=frozenset())


class Discovery:
    """``manage = "all"``: which running domains to attach next."""

    def __init__(self) -> None:
        self.refused: dict[str, str] = {}  # domain -> why it is not managed (said once)
        self.failing: str | None = None  # why listing fails (said once)
        self._lister: Lister | None = None  # one connection, kept (a reload may move it)

    async def active(self, uri: str) -> list[str]:
        """The running domains (one libvirt call, in a thread)."""
        if self._lister is None or self._lister.uri != uri:
            self.close()
            self._lister = Lister(uri)
        return await asyncio.to_thread(self._lister.active)

    def close(self) -> None:
        if self._lister is not None:
            self._lister.close()
            self._lister = None

    def new(self, active: list[str], taken: Collection[str], configured: Collection[str]
            ) -> list[str]:
        """Running domains neither managed (``taken`` domains) nor refused before; a
        refused domain that stopped may be tried again when it starts."""
        for domain in list(self.refused):
            if domain not in active:
                del self.refused[domain]
        out = []
        for domain in active:
            if domain in taken or domain in self.refused:
                continue
            if domain in configured:
                self.refused[domain] = (f"a [vm.{domain}] of another VM has that name; "
                                        "give the domain its own [vm] table")
                continue
            out.append(domain)
        return out
