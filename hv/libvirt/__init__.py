"""VMs managed by libvirt: a libvirt domain behind hv's VM handle.

    naming    ``libvirt:DOMAIN`` and the connection URI
    errors    libvirt's errors onto hv's HvError tree
    domxml    the domain XML hv reads, and its policy metadata
    domain    :class:`Domain`, the handle (a :class:`hv.qemu.vm.VM`)
"""

from hv.libvirt.domain import Domain, Lister
from hv.libvirt.domxml import POLICY_NS, Policy, XmlPolicy, merge_policy
from hv.libvirt.naming import DEFAULT_URI, DomainRef, is_libvirt, parse_ref, uri_of

__all__ = ["Domain", "DomainRef", "parse_ref", "is_libvirt", "uri_of", "DEFAULT_URI",
           "Lister", "POLICY_NS", "XmlPolicy", "Policy", "merge_policy"]
