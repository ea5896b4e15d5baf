"""Which handle a VM argument names: a QMP VM (name or socket) or ``libvirt:DOMAIN``.

    vm = open_vm("libvirt:web", connect=args.connect)   # unattached; a hv.qemu.vm.VM
    async with vm: ...

Everything that takes a VM argument goes through :func:`open_vm`, so every command
accepts both kinds, and nothing past it asks which kind it holds.
"""

from __future__ import annotations

import argparse
from typing import Any

from hv.errors import HvError
from hv.host import proc
from hv.libvirt import DEFAULT_URI, Domain, is_libvirt, parse_ref
from hv.libvirt.naming import URI_ENV
from hv.qemu import launch as launcher
from hv.qemu.vm import VM
from hv.units import format_size

__all__ = ["CONNECT_COMMANDS", "open_vm", "handle_for", "add_connect_option", "describe",
           "describe_lines"]

# The commands that take VM arguments, and so libvirt:DOMAIN and --connect.
CONNECT_COMMANDS = ("status", "balloon", "pause", "resume", "share", "sample")


def open_vm(arg: str, connect: str | None = None) -> VM:
    """An unattached handle for a VM name, QMP socket path or ``libvirt:DOMAIN``."""
    if is_libvirt(arg):
        return Domain(parse_ref(arg, connect))
    name, sock = launcher.socket_of(arg)
    return VM(name, sock)


def handle_for(name: str, address: str) -> VM:
    """A handle from a stored (name, address): a QMP socket or a ``libvirt:`` address."""
    if is_libvirt(address):
        return Domain(parse_ref(address), name)
    return VM(name, address)


def add_connect_option(parser: argparse.ArgumentParser, sub: Any) -> None:
    """``--connect URI`` for libvirt domains: before the command (as virsh takes it) or
    after it, on every command that takes a VM argument."""
    text = f"libvirt URI for libvirt:DOMAIN arguments (default: ${URI_ENV} or {DEFAULT_URI})"
    parser.add_argument("--connect", metavar="URI", default=None, help=text)
    for command in CONNECT_COMMANDS:
        if command in sub.choices:
            sub.choices[command].add_argument("--connect", metavar="URI",
                                              default=argparse.SUPPRESS, help=text)


def describe(vm: VM, daemon_row: dict[str, Any] | None) -> dict[str, Any]:
    """What ``hv status`` adds about a live VM: its backend, whether it takes part in
    page sharing, its policy and where each value comes from, and the hv run managing it."""
    info = vm.info
    try:
        sharing = "on" if proc.mergeable(info.pid, info.ram[0].hva, vm.name) else "opted out"
    except HvError:
        sharing = None
    policy = daemon_row.get("policy") if daemon_row else None
    if policy is None and isinstance(vm, Domain) and vm.xml is not None:
        p = vm.xml.policy
        values = {"min_bytes": p.min_bytes, "max_bytes": p.max_bytes, "shares": p.shares}
        policy = {**values, "source": {k.removesuffix("_bytes"): "domain"
                                       for k, v in values.items() if v is not None}}
    return {"backend": "libvirt" if isinstance(vm, Domain) else "qmp", "sharing": sharing,
            "policy": policy, "managed_by": daemon_row.get("managed_by") if daemon_row else None}


def describe_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per VM with a policy or opted out of sharing, under ``hv status``'s table."""
    out = []
    for r in rows:
        parts = []
        policy = r.get("policy") or {}
        source = policy.get("source", {})
        for key, shown in (("min", "min"), ("max", "max"), ("shares", "shares")):
            value = policy.get(key if key == "shares" else f"{key}_bytes")
            if value is not None:
                text = str(value) if key == "shares" else format_size(value)
                parts.append(f"{shown} {text} ({source.get(key, '?')})")
        if r.get("sharing") == "opted out":
            parts.append("page sharing: opted out")
        if parts:
            out.append(f"{r['vm']}: " + ", ".join(parts))
    return out
