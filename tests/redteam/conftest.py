"""One attacked fleet for the whole red-team suite (see fleet.py for why)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .fleet import VICTIM, VICTIM_INTERVAL, Fleet, start_fleet


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path_factory.mktemp("redteam"))
    yield fleet
    fleet.close()


@pytest.fixture(autouse=True)
def victim_interval_restored(fleet: Fleet) -> Iterator[None]:
    """A deputy attack that succeeds changes B's interval; put it back (through the
    operator's own `send`) so later tests are judged on their own attack."""
    yield
    if fleet.victim.proc is not None and fleet.victim.stored_interval() != VICTIM_INTERVAL:
        fleet.send(VICTIM, "set_interval", str(VICTIM_INTERVAL))
