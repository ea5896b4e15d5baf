"""Sizes and durations: any text gives a size in [0, C long] or one UsageError line.

Sizes go through :func:`hv.units.parse_size` (CLI arguments and config strings);
durations are the CLI's ``--wait`` and ``--period`` (seconds, checked before anything
changes) and the config's ``*_s`` keys (tests/property/test_config.py).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv import cli
from hv.errors import UsageError
from hv.units import MAX_SIZE_BYTES, format_size, parse_size
from tests.property.conftest import examples, one_line

UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

# Text that looks like a size often enough to reach every branch of the parser.
size_like = st.one_of(
    st.text(max_size=40),
    st.builds(lambda sign, digits, frac, sp, unit, tail: f"{sign}{digits}{frac}{sp}{unit}{tail}",
              st.sampled_from(["", "-", "+", " ", "0x"]),
              st.text("0123456789", min_size=0, max_size=60),
              st.sampled_from(["", ".", ".5", ".25", ".0001", ".999999999999"]),
              st.sampled_from(["", " ", "\t"]),
              st.sampled_from(["", "k", "M", "g", "T", "P", "Q", "KiB", "mib", "GB", "b", "B"]),
              st.sampled_from(["", " ", "x", "\n", "e3", "nan"])),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "NaN M", "∞", "１２M", "٣G", "1_000M"]),
)


@settings(max_examples=examples("pure"))
@given(size_like)
def test_any_text_is_a_size_in_range_or_one_line(text: str) -> None:
    try:
        value = parse_size(text)
    except UsageError as exc:
        one_line(exc)
        return
    assert isinstance(value, int) and 0 <= value <= MAX_SIZE_BYTES


@settings(max_examples=examples("pure"))
@given(st.integers(min_value=0, max_value=2**70), st.sampled_from(sorted(UNITS)),
       st.sampled_from(["", "iB", "B"]), st.booleans())
def test_whole_sizes_are_exact(n: int, unit: str, tail: str, upper: bool) -> None:
    text = f"{n}{unit.upper() if upper else unit}{tail if unit not in ('', 'b') else ''}"
    want = n * UNITS[unit]
    if want > MAX_SIZE_BYTES:
        with pytest.raises(UsageError, match="too large|too many digits"):
            parse_size(text)
    else:
        assert parse_size(text) == want


@settings(max_examples=examples("pure"))
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(["k", "m", "g", "t"]))
def test_fractional_sizes_are_exact_or_refused(whole: int, frac: int, unit: str) -> None:
    text = f"{whole}.{frac}{unit}"
    exact = Fraction(f"{whole}.{frac}") * UNITS[unit]
    if exact.denominator == 1:
        assert parse_size(text) == exact
    else:
        with pytest.raises(UsageError, match="whole number of bytes"):
            parse_size(text)


@settings(max_examples=examples("pure"))
@given(st.one_of(st.integers(-2**80, 2**80), st.floats(allow_nan=True, allow_infinity=True)))
def test_format_size_prints_any_number(n: float) -> None:
    text = format_size(n)
    assert text and "\n" not in text
    if isinstance(n, int) and 0 <= n <= MAX_SIZE_BYTES:
        value = parse_size(text) if text.endswith("B") else None
        assert value is None or value == n


# -- durations: hv balloon --wait, hv sample --period ------------------------------------

duration_like = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-1", "-0", "0", "0.0", "1e-400",
                     "5", "2.5", " 3", "3s", "", "--", "-x", "1,5", "0x10", "1_0"]),
    st.text(max_size=12),
)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@settings(max_examples=examples("cli"))
@given(text=duration_like)
def test_balloon_wait_is_checked_first_in_one_line(text: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HV_RUN_DIR", str(tmp_path))  # empty: no VM "nosuchvm"
    code, err = run_cli(["balloon", "nosuchvm", "256M", "--wait", text], capsys)
    lines = err.splitlines()
    assert code == 2 or code == 1, err
    assert len(lines) == 1 and lines[0].startswith("hv: error: "), err
    try:
        wait = float(text)
    except ValueError:
        return  # argparse's own one line
    if "unrecognized arguments" in err:
        return  # "-1e+16" looks like an option to argparse: its own one line, exit 2
    if not (math.isfinite(wait) and wait >= 0):
        assert "--wait" in err and code == 2, err  # refused before any VM is looked up
    elif "--wait" not in err:
        assert "nosuchvm" in err, err


@settings(max_examples=examples("cli"))
@given(text=duration_like)
def test_sample_period_is_checked_first_in_one_line(text: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HV_RUN_DIR", str(tmp_path))
    code, err = run_cli(["sample", "nosuchvm", "--period", text], capsys)
    lines = err.splitlines()
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("hv: error: "), err
    try:
        period = float(text)
    except ValueError:
        return
    if "unrecognized arguments" in err:
        return
    if not (math.isfinite(period) and period > 0):
        assert "--period" in err and code == 2, err
