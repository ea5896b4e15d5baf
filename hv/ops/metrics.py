"""The Prometheus view of ``hv run``: a custom collector over the daemon's snapshot.

Nothing is kept between scrapes: every scrape turns the last published snapshot
(:mod:`hv.daemon.status`) into metric families, so a VM that is no longer managed
has no series in the next scrape.  Names start with ``hv_``, sizes are bytes, times
seconds, fractions ``_ratio``; counters end in ``_total``; per-VM series carry a
``vm`` label.

Left out on purpose, because the libvirt exporter already has them under its own
names: what the guest reports about itself (its free, available and total memory,
page faults) and vCPU and block statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from hv import __version__
from hv.units import PAGE_SIZE

__all__ = ["STATES", "GOVERNOR_MODES", "SnapshotCollector"]

STATES = ("high", "soft", "hard", "low")
GOVERNOR_MODES = ("converge", "idle")

# KSM's counters (kernel names, /sys/kernel/mm/ksm) as metrics: (name, help, kind,
# factor).  Page counts of memory become bytes; counts of events stay counts.
KSM_COUNTERS: dict[str, tuple[str, str, str, int]] = {
    "pages_shared": ("hv_ksm_shared_bytes", "KSM pages in use (pages_shared), in bytes",
                     "gauge", PAGE_SIZE),
    "pages_sharing": ("hv_ksm_sharing_bytes", "Memory saved by KSM (pages_sharing), in bytes",
                      "gauge", PAGE_SIZE),
    "pages_unshared": ("hv_ksm_unshared_bytes", "Unique pages KSM checks again "
                       "(pages_unshared), in bytes", "gauge", PAGE_SIZE),
    "pages_volatile": ("hv_ksm_volatile_bytes", "Pages changing too fast to merge "
                       "(pages_volatile), in bytes", "gauge", PAGE_SIZE),
    "ksm_zero_pages": ("hv_ksm_zero_pages_bytes", "Empty pages merged with the kernel's zero "
                       "page (ksm_zero_pages), in bytes", "gauge", PAGE_SIZE),
    "general_profit": ("hv_ksm_general_profit_bytes", "KSM's profit net of its metadata "
                       "(general_profit)", "gauge", 1),
    "full_scans": ("hv_ksm_full_scans", "Full scans of every mergeable area (full_scans)",
                   "counter", 1),
    "pages_scanned": ("hv_ksm_pages_scanned", "Pages ksmd scanned (pages_scanned)",
                      "counter", 1),
}

# Per-VM gauges from the snapshot's VM rows: (name, help, key).
VM_GAUGES = (
    ("hv_vm_configured_bytes", "The VM's memory size as QEMU configured it", "configured_bytes"),
    ("hv_vm_min_bytes", "The VM's configured min (guaranteed)", "min_bytes"),
    ("hv_vm_max_bytes", "The VM's max (limit)", "max_bytes"),
    ("hv_vm_shares", "The VM's shares (relative entitlement)", "shares"),
    ("hv_vm_target_bytes", "The VM's target from min-funding revocation with the idle tax",
     "target_bytes"),
    ("hv_vm_balloon_bytes", "The VM's balloon size as the guest sees its memory (actual)",
     "balloon_bytes"),
    ("hv_vm_resident_bytes", "Host memory the VM's QEMU holds (resident)",
     "host_resident_bytes"),
    ("hv_vm_swapped_bytes", "The VM's QEMU memory in host swap", "host_swap_bytes"),
)


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield CounterMetricFamily(name, doc, value=value)


def _one_of(name: str, doc: str, label: str, choices: tuple[str, ...], chosen: str) -> Metric:
    """One 0/1 series per choice: 1 for the chosen one."""
    g = GaugeMetricFamily(name, doc, labels=[label])
    for c in choices:
        g.add_metric([c], 1.0 if c == chosen else 0.0)
    return g


class SnapshotCollector(Collector):
    """Turns ``source()`` (the last snapshot, or None before the first tick) into metrics."""

    def __init__(self, source: Callable[[], dict[str, Any] | None]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # the series depend on the snapshot: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("hv_build", "hv's version", value={"version": __version__})
        snap = self.source()
        if snap is None:
            return
        yield from self._host(snap)
        if snap.get("ksm") is not None:
            yield from self._ksm(snap["ksm"])
        yield from self._vms(snap["vms"])

    @staticmethod
    def _host(snap: dict[str, Any]) -> Iterator[Metric]:
        yield _one_of("hv_state", "The host's memory state (1 for the current one)", "state",
                      STATES, snap["state"])
        yield from _gauge("hv_free_bytes", "Free memory of the pool hv manages",
                          snap["free_bytes"])
        yield from _gauge("hv_pool_bytes", "Memory the managed VMs share (the pool)",
                          snap["pool_bytes"])
        yield from _gauge("hv_managed_vms", "VMs hv manages now", len(snap["vms"]))
        yield from _counter("hv_admission_refusals", "VMs refused by admission control "
                            "(at re-attach or reload)", snap.get("admission_refusals", 0))
        ticks = snap.get("tick")
        if ticks is not None:
            yield SummaryMetricFamily("hv_tick_duration_seconds", "Duration of hv's ticks "
                                      "(collect, decide, act)", count_value=ticks,
                                      sum_value=snap.get("tick_seconds_total", 0.0))
            yield from _gauge("hv_tick_last_duration_seconds", "Duration of the last tick",
                              snap.get("tick_seconds"))

    @staticmethod
    def _ksm(ksm: dict[str, Any]) -> Iterator[Metric]:
        for kernel_name, value in ksm["counters"].items():
            if kernel_name in KSM_COUNTERS:
                name, doc, kind, factor = KSM_COUNTERS[kernel_name]
                make = _counter if kind == "counter" else _gauge
                yield from make(name, doc, value * factor)
        if ksm.get("mode") is not None:
            yield _one_of("hv_ksm_governor_mode", "The KSM governor's mode (1 for the current)",
                          "mode", GOVERNOR_MODES, ksm["mode"])
        yield from _gauge("hv_ksm_pages_to_scan", "Pages ksmd scans per wake-up, as hv set it",
                          ksm.get("pages_to_scan"))
        sleep_ms = ksm.get("sleep_millisecs")
        yield from _gauge("hv_ksm_sleep_seconds", "ksmd's sleep between wake-ups, as hv set it",
                          None if sleep_ms is None else sleep_ms / 1000)
        yield from _counter("hv_ksmd_cpu_seconds", "CPU time of the ksmd kernel thread",
                            ksm.get("ksmd_cpu_seconds"))
        yield from _counter("hv_sharing_scan_cpu_seconds", "CPU time hv's own sharing scan "
                            "spent", ksm.get("scan_cpu_seconds"))
        for key, name, doc in (
                ("potential_pages", "hv_sharing_potential_bytes",
                 "Memory full sharing of the stable duplicates would save"),
                ("realized_pages", "hv_sharing_realized_bytes",
                 "Memory KSM and the zero page save now"),
                ("backlog_pages", "hv_sharing_backlog_bytes",
                 "Stable duplicates KSM has not merged yet")):
            value = ksm.get(key)
            yield from _gauge(name, doc, None if value is None else value * PAGE_SIZE)

    @staticmethod
    def _vms(vms: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        for name, doc, key in VM_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["vm"])
            for vm, row in vms.items():
                if row.get(key) is not None:
                    g.add_metric([vm], row[key])
            yield g
        paused = GaugeMetricFamily("hv_vm_paused_by_hv", "1 while hv holds the VM paused",
                                   labels=["vm"])
        active = GaugeMetricFamily("hv_vm_active_ratio", "The VM's active fraction by "
                                   "estimate (slow, fast, current; used: what the policy "
                                   "counts)", labels=["vm", "estimate"])
        sharing = {k: GaugeMetricFamily(n, d, labels=["vm"]) for k, n, d in (
            ("merging_pages", "hv_vm_shared_bytes", "The VM's memory KSM has merged"),
            ("potential_pages", "hv_vm_sharing_potential_bytes",
             "The VM's fair part of what full sharing would save"),
            ("realized_pages", "hv_vm_sharing_realized_bytes",
             "The VM's fair part of what sharing saves now"))}
        actions = {k: CounterMetricFamily(f"hv_vm_{k}_actions", f"{k.capitalize()} actions hv "
                                          "took on the VM", labels=["vm"])
                   for k in ("balloon", "swap", "pause")}
        paged = CounterMetricFamily("hv_vm_paged_out_bytes", "Memory hv paged out of the VM "
                                    "(hypervisor swap)", labels=["vm"])
        for vm, row in vms.items():
            paused.add_metric([vm], 1.0 if row.get("paused_by_hv") else 0.0)
            for estimate, value in (row.get("active") or {}).items():
                if value is not None:
                    active.add_metric([vm, estimate], value)
            for key, gauge in sharing.items():
                value = (row.get("sharing") or {}).get(key)
                if value is not None:
                    gauge.add_metric([vm], value * PAGE_SIZE)
            for kind, counter in actions.items():
                counter.add_metric([vm], (row.get("actions") or {}).get(kind, 0))
            paged.add_metric([vm], row.get("paged_out_pages", 0) * PAGE_SIZE)
        yield paused
        yield active
        yield from sharing.values()
        yield from actions.values()
        yield paged
