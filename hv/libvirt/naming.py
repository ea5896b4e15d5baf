"""``libvirt:DOMAIN``: how a libvirt domain is named wherever hv takes a VM name or socket.

    ref = parse_ref("libvirt:web", connect=None)   # DomainRef("web", "qemu:///system")
    ref.name      -> "libvirt:web"                  # what hv prints
    ref.address   -> "libvirt:web"                  # what hv stores (guard file, status)

The connection URI is ``--connect URI``, else ``$HV_LIBVIRT_URI``, else
``qemu:///system``.  An address made with another URI carries it after ``#``
(``libvirt:web#qemu+ssh://host/system``), so whoever reads it back (the guardian)
reaches the same libvirtd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hv.errors import UsageError

__all__ = ["PREFIX", "DEFAULT_URI", "URI_ENV", "DomainRef", "is_libvirt", "uri_of", "parse_ref"]

PREFIX = "libvirt:"
DEFAULT_URI = "qemu:///system"
URI_ENV = "HV_LIBVIRT_URI"


@dataclass(frozen=True)
class DomainRef:
    """One domain of one libvirt connection."""

    domain: str
    uri: str = DEFAULT_URI

    @property
    def name(self) -> str:
        return PREFIX + self.domain

    @property
    def address(self) -> str:
        return self.name if self.uri == DEFAULT_URI else f"{self.name}#{self.uri}"


def is_libvirt(arg: str) -> bool:
    """Whether a VM argument names a libvirt domain."""
    return arg.startswith(PREFIX)


def uri_of(connect: str | None = None) -> str:
    """The connection URI: ``connect``, else ``$HV_LIBVIRT_URI``, else ``qemu:///system``."""
    uri = connect or os.environ.get(URI_ENV) or DEFAULT_URI
    if any(c.isspace() for c in uri):
        raise UsageError(f"bad libvirt URI {uri!r}: it contains white space")
    return uri


def check_domain(domain: str) -> str:
    """A domain name as libvirt allows it: not empty, no '/' (libvirt refuses those)."""
    if not domain or "/" in domain or any(c.isspace() or not c.isprintable() for c in domain):
        raise UsageError(f"bad libvirt domain name {domain!r}: give libvirt:DOMAIN, with no "
                         "'/', spaces or control characters in DOMAIN")
    return domain


def parse_ref(arg: str, connect: str | None = None) -> DomainRef:
    """``libvirt:DOMAIN`` (or an address ``libvirt:DOMAIN#URI``) to a :class:`DomainRef`."""
    if not is_libvirt(arg):
        raise UsageError(f"{arg!r} does not name a libvirt domain (use libvirt:DOMAIN)")
    domain, sep, uri = arg[len(PREFIX):].partition("#")
    return DomainRef(check_domain(domain), uri_of(uri if sep else connect))
