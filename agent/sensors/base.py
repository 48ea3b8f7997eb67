"""The sensor driver interface: one small protocol every driver implements.

Why so small: drivers run inside a single-concurrency worker on small devices; a
driver only turns "read now" into readings. Sequence numbers, storage and sending
belong to the outbox, never to a driver.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One measured value, before the outbox gives it a sequence number."""

    sensor: str  # e.g. "cpu_temp"; becomes reading["sensor"]
    value: float
    unit: str
    sampled_at: float  # unix seconds


class Sensor(abc.ABC):
    """A driver: constructed with the agent id, read() returns zero or more samples."""

    name: str = "sensor"

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id

    @abc.abstractmethod
    def read(self) -> list[Sample]:
        """Measure now. Raise SensorError when the hardware cannot be read."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles; most drivers hold none."""


class SensorError(Exception):
    """A driver could not read its source; the message names the source."""
