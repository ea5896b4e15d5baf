"""The fault suite's shared fixture: host swap for admission and hard states."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.functional.hvrun import swap_fixture


@pytest.fixture(scope="module")
def host_swap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Admission reserves swap for max - min of every VM; hard states page out."""
    yield from swap_fixture(tmp_path_factory)
