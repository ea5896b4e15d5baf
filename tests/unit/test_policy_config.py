"""The TOML configuration (hv.policy.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hv.errors import ConfigError, UsageError
from hv.policy.config import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_SHARES,
    Config,
    load_config,
    parse_config,
)
from hv.policy.states import Thresholds
from hv.units import GiB, MiB

HOST = 24 * GiB

FULL = """
[host]
managed = "20G"
tax_rate = 0.5
sample_pages = 200
sample_period_s = 15
thresholds_pct = {high = 8, soft = 5, hard = 3, low = 1.5}
hysteresis_pct = 0.25
poll_interval_s = 0.5

[vm.web]
socket = "/run/web/qmp.sock"
min = "128M"
max = "512M"
shares = 2000

[vm.batch]
min = 0
max = "1G"
"""


def parse(text: str) -> Config:
    return parse_config(text, "hv.toml", HOST)


def test_full_file() -> None:
    c = parse(FULL)
    h = c.host
    assert h.managed_bytes == 20 * GiB
    assert h.tax_rate == 0.5
    assert h.sample_pages == 200
    assert h.sample_period_s == 15.0
    assert h.thresholds == Thresholds(8, 5, 3, 1.5)
    assert h.hysteresis_pct == 0.25
    assert h.poll_interval_s == 0.5
    web = c.vm("web")
    assert (web.socket, web.min_bytes, web.max_bytes, web.shares) == (
        "/run/web/qmp.sock", 128 * MiB, 512 * MiB, 2000)
    batch = c.vm("batch")
    assert (batch.socket, batch.min_bytes, batch.max_bytes, batch.shares) == (
        None, 0, 1 * GiB, DEFAULT_SHARES)
    assert [v.name for v in c.vms] == ["web", "batch"]


def test_empty_file_gives_the_papers_defaults() -> None:
    h = parse("").host
    assert h.managed_bytes == HOST
    assert h.tax_rate == 0.75
    assert h.sample_pages == 100
    assert h.sample_period_s == 30.0
    assert h.thresholds == Thresholds(6, 4, 2, 1)
    assert h.hysteresis_pct == 0.5
    assert h.poll_interval_s == DEFAULT_POLL_INTERVAL_S
    assert (h.reclaim, h.hypervisor_swap) == ("balloon+swap", True)
    assert parse("").vms == ()


def test_reclaim_by_balloon_only_turns_hypervisor_swap_off() -> None:
    h = parse('[host]\nreclaim = "balloon"\n').host
    assert (h.reclaim, h.hypervisor_swap) == ("balloon", False)
    assert parse('[host]\nreclaim = "balloon+swap"\n').host.hypervisor_swap


def test_partial_thresholds_keep_the_other_defaults() -> None:
    h = parse("[host]\nthresholds_pct = {high = 10}\n").host
    assert h.thresholds == Thresholds(10, 4, 2, 1)


def test_attached_vm_may_leave_max_to_the_vm() -> None:
    vm = parse('[vm.a]\nsocket = "/s"\nmin = "64M"\n').vm("a")
    assert vm.max_bytes is None


def test_sizes_may_be_plain_bytes() -> None:
    vm = parse("[vm.a]\nmin = 1048576\nmax = 2097152\n").vm("a")
    assert (vm.min_bytes, vm.max_bytes) == (MiB, 2 * MiB)


def test_frozen() -> None:
    c = parse(FULL)
    with pytest.raises(AttributeError):
        c.host.tax_rate = 0.1  # type: ignore[misc]


def test_unknown_vm_lookup_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="nope"):
        parse(FULL).vm("nope")


BAD = [
    # (toml text, key the message must name, words it must contain)
    ('[host]\nidle_collect_s = 30\n', "host.idle_collect_s", "between 0"),
    ('[host]\nidle_collect_s = -1\n', "host.idle_collect_s", "between 0"),
    ('[host]\nidle_collect_s = nan\n', "host.idle_collect_s", "finite"),
    ('[vm.a]\nmin = "600M"\nmax = "512M"\n', "vm.a.min", "larger than max"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nshares = 0\n', "vm.a.shares", "more than 0"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nshares = -5\n', "vm.a.shares", "more than 0"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nshares = 1.5\n', "vm.a.shares", "whole number"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nshares = "10"\n', "vm.a.shares", "whole number"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nshares = true\n', "vm.a.shares", "whole number"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nmemory = "1G"\n', "vm.a.memory", "unknown key"),
    ('[vm.a]\nmin = "-1M"\nmax = "2M"\n', "vm.a.min", "negative"),
    ('[vm.a]\nmin = -1\nmax = "2M"\n', "vm.a.min", "negative"),
    ('[vm.a]\nmin = "1M"\nmax = "lots"\n', "vm.a.max", "cannot parse size"),
    ('[vm.a]\nmin = "1M"\nmax = 1.5\n', "vm.a.max", "size"),
    ('[vm.a]\nmin = "1M"\nmax = 0\n', "vm.a.max", "more than 0"),
    ('[vm.a]\nmax = "1G"\n', "vm.a.min", "required"),
    ('[vm.a]\nmin = "1M"\n', "vm.a.max", "required"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nsocket = 3\n', "vm.a.socket", "string"),
    ('[vm.a]\nmin = "1M"\nmax = "2M"\nsocket = ""\n', "vm.a.socket", "string"),
    ('vm = 3\n', "vm", "table"),
    ('[vm]\na = 3\n', "vm.a", "table"),
    ('[vm."bad name"]\nmin = 0\nmax = "1M"\n', "vm.bad name", "VM name"),
    ('[vm.a]\nsocket = "/s"\nmin = 0\n[vm.b]\nsocket = "/s"\nmin = 0\n', "vm.b.socket",
     "already"),
    ('[hots]\nmanaged = "1G"\n', "hots", "unknown key"),
    ('[host]\ntax = 0.5\n', "host.tax", "unknown key"),
    ('[host]\ntax_rate = 1.0\n', "host.tax_rate", "below 1"),
    ('[host]\ntax_rate = -0.1\n', "host.tax_rate", "at least 0"),
    ('[host]\ntax_rate = "high"\n', "host.tax_rate", "number"),
    ('[host]\nmanaged = "30G"\n', "host.managed", "more than the host"),
    ('[host]\nmanaged = "-1G"\n', "host.managed", "negative"),
    ('[host]\nmanaged = 0\n', "host.managed", "more than 0"),
    ('[host]\nsample_pages = 0\n', "host.sample_pages", "at least 1"),
    ('[host]\nsample_pages = 10.5\n', "host.sample_pages", "whole number"),
    ('[host]\nsample_period_s = 0\n', "host.sample_period_s", "more than 0"),
    ('[host]\npoll_interval_s = -1\n', "host.poll_interval_s", "more than 0"),
    ('[host]\nthresholds_pct = {high = 6, soft = 6, hard = 2, low = 1}\n',
     "host.thresholds_pct", "strictly decreasing"),
    ('[host]\nthresholds_pct = {high = 3}\n', "host.thresholds_pct", "strictly decreasing"),
    ('[host]\nthresholds_pct = {high = 6, soft = 4, hard = 2, low = 0}\n',
     "host.thresholds_pct.low", "between 0 and 100"),
    ('[host]\nthresholds_pct = {high = 6, medium = 5}\n', "host.thresholds_pct.medium",
     "unknown key"),
    ('[host]\nthresholds_pct = 6\n', "host.thresholds_pct", "table"),
    ('[host]\nhysteresis_pct = -0.5\n', "host.hysteresis_pct", "at least 0"),
    ('[host]\nhysteresis_pct = 95\n', "host.hysteresis_pct", "below"),
    ('host = 1\n', "host", "table"),
    ('[host]\nreclaim = "swap"\n', "host.reclaim", "must be 'balloon+swap' or 'balloon'"),
    ('[host]\nreclaim = false\n', "host.reclaim", "non-empty string"),
]


@pytest.mark.parametrize(("text", "key", "words"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_is_one_line_naming_file_and_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"hv.toml: {key}:"), message
    assert words in message, message


def test_invalid_toml_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse("[host\n")
    message = str(info.value)
    assert message.startswith("hv.toml: not valid TOML") and "\n" not in message


def test_min_larger_than_max_message_is_readable() -> None:
    with pytest.raises(ConfigError) as info:
        parse('[vm.web]\nmin = "600M"\nmax = "512M"\n')
    assert str(info.value) == "hv.toml: vm.web.min: 600.0M is larger than max 512.0M"


def test_load_config_reads_the_file_and_resolves_relative_sockets(tmp_path: Path) -> None:
    path = tmp_path / "hv.toml"
    path.write_text('[vm.a]\nsocket = "qmp-a.sock"\nmin = "64M"\n')
    c = load_config(path, HOST)
    assert c.source == str(path)
    assert c.vm("a").socket == str(tmp_path / "qmp-a.sock")


def test_load_config_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", HOST)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hv.toml"
    path.write_text("[host]\nshares = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, HOST)
    assert str(info.value).startswith(f"{path}: host.shares: unknown key")
