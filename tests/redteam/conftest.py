"""One attacked fleet for the whole red-team suite (see fleet.py for why)."""

from __future__ import annotations

from typing import Iterator

import pytest

from .fleet import Fleet, start_fleet


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path_factory.mktemp("redteam"))
    yield fleet
    fleet.close()
