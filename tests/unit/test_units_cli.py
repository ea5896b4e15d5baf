"""Fast tests of sizes, the CLI's parsing and output, and the accelerator probe image."""

from __future__ import annotations

import struct

import pytest

from hv import cli, units
from hv.errors import UsageError
from hv.qemu import accel, vm
from hv.units import GiB, KiB, MiB, format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("512M", 512 * MiB), ("512MiB", 512 * MiB), ("1G", GiB), ("1.5G", 3 * GiB // 2),
    ("64k", 64 * KiB), (" 2 g ", 2 * GiB), ("100b", 100)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12Q", "-5M", "", "M", "1.5.3G", "0.3K", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512 * MiB) == "512.0M"
    assert format_size(3 * GiB // 2) == "1.50G"
    assert format_size(100) == "100B"
    assert format_size(-2 * MiB) == "-2.00M"


def test_table_aligns_and_marks_missing() -> None:
    out = units.table([["a", 1, None], ["bbb", 22, "x"]], ["VM", "N", "V"]).splitlines()
    assert out[0].split() == ["VM", "N", "V"]
    assert out[1].split() == ["a", "1", "-"]
    assert len({line.index("N") if i == 0 else None for i, line in enumerate(out)} - {None}) == 1


def test_cli_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["balloon", "vm1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required" in err[0]
    assert cli.main(["balloon", "vm1", "-5M"]) == 2
    assert "negative" in capsys.readouterr().err


def test_launch_param_parsing() -> None:
    assert cli._params(["ws=40:60,120", "hv.rate=2"]) == {"ws": "40:60,120", "rate": "2"}
    with pytest.raises(UsageError):
        cli._params(["novalue"])


def test_probe_rom_layout() -> None:
    rom = accel.probe_rom(1234)
    assert len(rom) == 65536
    assert rom[0] == 0xFA and struct.unpack("<I", rom[3:7])[0] == 1234
    assert rom[0xFFF0:0xFFF5] == bytes([0xEA, 0, 0, 0, 0xF0])  # reset vector -> f000:0000


def test_ramblock_and_gpa2hva_parsing() -> None:
    ramblock = (
        "              Block Name    PSize              Offset               Used              Total\n"
        "                    ram0    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000\n"
        "                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000\n")
    sizes = {m.group(1): int(m.group(3), 16) for m in vm._RAMBLOCK_RE.finditer(ramblock)}
    assert sizes == {"ram0": 128 * MiB, "pc.bios": 256 * KiB}
    m = vm._GPA2HVA_RE.search("Host virtual address for 0x0 (ram0) is 0x7f483be00000\r\n")
    assert m is not None and m.group(1) == "ram0" and int(m.group(2), 16) == 0x7F483BE00000


def test_balloon_floor() -> None:
    assert vm.balloon_floor(128 * MiB) == 96 * MiB
    assert vm.balloon_floor(8 * GiB) == GiB


@pytest.mark.parametrize("text", ["9" * 400 + "G", "99999999999999G", "8388608T", "9223372036854775808"])
def test_huge_sizes_are_one_clear_error(text: str) -> None:
    from hv.units import parse_size
    with pytest.raises(UsageError, match="too large|too many digits"):
        parse_size(text)


def test_sizes_are_exact() -> None:
    from hv.units import MAX_SIZE_BYTES, parse_size
    assert parse_size("1.5G") == 3 * 512 * 1024 * 1024
    assert parse_size(str(MAX_SIZE_BYTES)) == MAX_SIZE_BYTES
    with pytest.raises(UsageError, match="whole number"):
        parse_size("0.1K")


@pytest.mark.parametrize("key", ["poll_interval_s", "sample_period_s", "tax_rate", "hysteresis_pct"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_config_refuses_non_finite_numbers(key: str, value: str) -> None:
    from hv.errors import ConfigError
    from hv.policy.config import parse_config
    with pytest.raises(ConfigError, match=f"host.{key}: must be a finite number"):
        parse_config(f"[host]\n{key} = {value}\n", "hv.toml", 1 << 34)
