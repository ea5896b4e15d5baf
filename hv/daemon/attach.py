"""Attaching a configured VM: connect, check it is one QEMU managed once, its limits,
its saved estimate; and admission control over a set of VMs.

Used by the daemon at start, at re-attach, at reload and for discovered libvirt
domains; everything here may refuse (ConfigError, AdmissionError) and leaves no
connection open when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable

from hv import paths
from hv.daemon.domains import config_uri, domain_handle, effective
from hv.daemon.managed import Context, ManagedVM
from hv.daemon.merge import read_merge
from hv.errors import ConfigError, HvError, VMGone, VMNotFound
from hv.host import swap
from hv.policy import AdmissionControl, Config, VMConfig, WorkingSetEstimator
from hv.qemu import launch
from hv.qemu.vm import VM, balloon_floor
from hv.units import format_size

__all__ = ["ATTACH_TIMEOUT_S", "STOP_TIMEOUT_S", "admit", "attach", "detach", "entries",
           "load_managed", "max_of", "same_file", "socket_of"]

# Connecting to a VM: one that does not greet in 5 s is refused (at start, at reload)
# or tried again later (re-attach).
ATTACH_TIMEOUT_S = 5.0

# Stopping: resuming what hv paused and closing every connection get 1.5 s together,
# so SIGTERM is handled within 2 s even with a hung QEMU (the guardian and the next
# hv resume what could not be resumed now).
STOP_TIMEOUT_S = 1.5


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (after symlinks, ``..`` and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def socket_of(cfg: VMConfig) -> str:
    """The VM's QMP socket: configured, or the one of hv's guest of that name."""
    if cfg.socket is not None:
        return cfg.socket
    return str(launch.vm_dir(cfg.name) / "qmp.sock")


async def attach(config: Config, cfg: VMConfig, others: list[ManagedVM], ctx: Context | None,
                 notify: Callable[[str], None]) -> ManagedVM:
    """Connect to a configured VM; VMGone or VMNotFound when its QEMU is not running.

    A VM already among ``others`` (same socket or domain, or the same QEMU behind
    another socket) is refused: one QEMU is managed once.  ``ctx`` (once the daemon
    has its event log) is where the RAM backend's merge property is reported.
    """
    vm: VM
    if cfg.libvirt is not None:
        where = f"{config.source}: vm.{cfg.name}.libvirt"
        vm = domain_handle(config, cfg)
        what = f"domain {cfg.libvirt} at {config_uri(config, cfg)}"
        for m in others:
            if m.vm.socket_path == vm.socket_path:
                raise ConfigError(f"{where}: {what} is vm.{m.name} already")
    else:
        where = f"{config.source}: vm.{cfg.name}.socket"
        sock = what = socket_of(cfg)
        for m in others:
            if same_file(sock, m.vm.socket_path):
                raise ConfigError(f"{where}: {sock} is the socket of vm.{m.name} already")
        vm = VM(cfg.name, sock)
    try:
        await asyncio.wait_for(vm.attach(), ATTACH_TIMEOUT_S)
    except asyncio.TimeoutError:
        await vm.detach()
        raise ConfigError(f"{where}: {what} does not answer (nothing within "
                          f"{ATTACH_TIMEOUT_S:.0f} s)") from None
    except (VMGone, VMNotFound):
        raise
    except HvError as exc:
        raise ConfigError(f"{where}: {what} does not answer: {exc}") from exc
    try:
        twin = next((m for m in others if m.pid == vm.info.pid), None)
        if twin is not None:
            raise ConfigError(f"{where}: {what} leads to the QEMU of vm.{twin.name} "
                              f"(pid {twin.pid}) already")
        if vm.info.balloon_path is None:
            raise ConfigError(f"{where}: the VM has no virtio-balloon device")
        cfg, sources = effective(cfg, vm)
        max_bytes = max_of(config, cfg, vm)
        await vm.enable_stats()
    except BaseException:
        await vm.detach()
        raise
    m = load_managed(cfg, vm, max_bytes, notify)
    m.policy_source = sources
    if ctx is not None:
        await read_merge(ctx, m)
    return m


def max_of(config: Config, cfg: VMConfig, vm: VM) -> int:
    """The VM's ``max``: configured, or its memory size; checked against both ends."""
    ram = vm.info.ram_bytes
    max_bytes = cfg.max_bytes if cfg.max_bytes is not None else ram
    if max_bytes > ram:
        raise ConfigError(f"{config.source}: vm.{cfg.name}.max: {format_size(max_bytes)} "
                          f"is more than the VM's memory {format_size(ram)}")
    if max_bytes < balloon_floor(ram):
        raise ConfigError(f"{config.source}: vm.{cfg.name}.max: {format_size(max_bytes)} "
                          f"is below the safe balloon floor {format_size(balloon_floor(ram))} "
                          f"of a {format_size(ram)} guest")
    return max_bytes


def load_managed(cfg: VMConfig, vm: VM, max_bytes: int, notify: Callable[[str], None]) -> ManagedVM:
    """The VM under management, with the working-set estimate saved for its QEMU (one
    of another QEMU, or unusable, is said and started afresh)."""
    info = vm.info
    est_file = paths.state_dir() / "vms" / cfg.name / "estimator.json"
    estimator = WorkingSetEstimator()
    measured = 0
    if est_file.exists():
        try:
            data = json.loads(est_file.read_text())
            if data.get("pid") not in (None, info.pid):
                # Another QEMU under the same name: what hv knew was about a VM
                # that no longer exists.
                notify(f"{cfg.name}: saved working-set estimate is of an earlier "
                            f"QEMU (pid {data.get('pid')}, now {info.pid}); starting afresh")
            else:
                estimator = WorkingSetEstimator.from_dict(data["estimator"])
                measured = int(data.get("measured_pages", 0))
        except (ValueError, KeyError, TypeError, HvError) as exc:
            notify(f"{cfg.name}: ignoring unusable {est_file}: {exc}")
    return ManagedVM(cfg, vm, max_bytes, estimator, est_file, info.pid, measured_pages=measured)


def admit(config: Config, vms: list[tuple[VMConfig, VM, int]]) -> None:
    """Admission control over (config, handle, max) of each VM; AdmissionError names
    the VM refused."""
    # Swap hv's VMs may use: what is free plus what they already hold.
    _, swap_free = swap.totals()
    held = 0
    for _, vm, _ in vms:
        with contextlib.suppress(HvError):
            held += vm.host_usage().swap_bytes
    control = AdmissionControl(config.host.managed_bytes, swap_free + held)
    for cfg, _, max_bytes in vms:
        control.admit(cfg.name, cfg.min_bytes, max_bytes)


def entries(vms: list[ManagedVM]) -> list[tuple[VMConfig, VM, int]]:
    return [(m.cfg, m.vm, m.max_bytes) for m in vms]


async def detach(vms: list[ManagedVM], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Close connections, all at once and within ``timeout_s``."""
    if vms:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(m.vm.detach() for m in vms),
                                                  return_exceptions=True), timeout_s)
