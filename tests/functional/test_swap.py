"""`hv swap create/status/remove` on the real host (a small swap file in tmp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hv.host import swap
from tests.conftest import hv_cli


@pytest.fixture
def state_env(tmp_path: Path) -> dict[str, str]:
    return {"HV_STATE_DIR": str(tmp_path / "state")}


def active_paths() -> set[str]:
    return {a.path for a in swap.areas()}


def test_swap_create_status_remove(tmp_path: Path, state_env: dict[str, str]) -> None:
    path = Path("/var/tmp") / f"hv-test-{tmp_path.name}.swap"  # swapon refuses tmpfs files
    try:
        done = hv_cli("swap", "create", "64M", "--path", str(path), env=state_env)
        assert done.returncode == 0, done.stderr
        assert str(path) in active_paths()
        assert path.stat().st_mode & 0o777 == 0o600

        done = hv_cli("swap", "status", env=state_env)
        assert done.returncode == 0
        line = next(ln for ln in done.stdout.splitlines() if str(path) in ln)
        assert "(created by hv)" in line and "size 64.0M" in line

        # Creating over an existing file, and removing a file hv did not create, are refused.
        again = hv_cli("swap", "create", "64M", "--path", str(path), env=state_env)
        assert again.returncode != 0 and "already exists" in again.stderr
        other = tmp_path / "not-hv.swap"
        other.write_text("x")
        refused = hv_cli("swap", "remove", "--path", str(other), env=state_env)
        assert refused.returncode != 0 and "not a swap file hv created" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and other.exists()

        done = hv_cli("swap", "remove", env=state_env, timeout_s=300)
        assert done.returncode == 0, done.stderr
        assert str(path) not in active_paths() and not path.exists()
        done = hv_cli("swap", "remove", env=state_env)
        assert done.returncode == 0 and "nothing removed" in done.stdout
    finally:
        if str(path) in active_paths():
            hv_cli("swap", "remove", "--path", str(path), env=state_env, timeout_s=300)


def test_swap_create_refuses_tiny(tmp_path: Path, state_env: dict[str, str]) -> None:
    done = hv_cli("swap", "create", "1M", "--path", str(tmp_path / "s"), env=state_env)
    assert done.returncode == 2 and "below the minimum" in done.stderr
    assert not (tmp_path / "s").exists()
