"""A deterministic simulated sensor, for demos, tests and benchmarks.

Why deterministic: two runs of the same agent id produce the same series, so a test
can predict values; different agents get different series (seeded by the id).
"""

from __future__ import annotations

import hashlib
import math
import random
import time

from .base import Sample, Sensor


class SimulatedSensor(Sensor):
    """A temperature-like signal: a slow sine wave plus seeded noise."""

    name = "simulated"

    def __init__(self, agent_id: str, clock=time.time) -> None:
        super().__init__(agent_id)
        seed = int.from_bytes(hashlib.sha256(agent_id.encode()).digest()[:8], "big")
        self._rng = random.Random(seed)
        self._phase = (seed % 3600) / 3600 * 2 * math.pi
        self._base = 20.0 + (seed % 1000) / 100.0  # 20..30 degC, fixed per agent
        self._clock = clock
        self._n = 0

    def read(self) -> list[Sample]:
        self._n += 1
        value = self._base + 2.0 * math.sin(self._phase + self._n / 10.0) + self._rng.gauss(0.0, 0.1)
        return [Sample(sensor="sim_temp", value=round(value, 4), unit="C", sampled_at=self._clock())]
