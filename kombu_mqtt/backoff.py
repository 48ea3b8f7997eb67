"""The project's one retry/poll delay schedule: exponential, capped, with full jitter.

Why here: the MQTT transport needs it and `kombu_mqtt` may import nothing of the
project's other packages, while every other package may import `kombu_mqtt`; so this is
the one place all of them can share. It is standard library only (no paho, no kombu
code of its own) so pure retry loops (the agent's outbox flush, the chain writer, the
receipt poll) can use it. kombu's own helpers do not fit: `retry_over_time` grows
linearly without jitter, and Celery's `get_exponential_backoff_interval` works in whole
seconds.

Why full jitter (a delay drawn uniformly from [0, d]): after a broker restart every agent
reconnects at once; with equal jitter ([d/2, d]) they still arrive in waves, full jitter
spreads them over the whole window, and the cap keeps the longest wait bounded.
Polls (waiting for a receipt, not retrying a failure) use `jitter=False`.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays `first * factor**n` capped at `cap`; with jitter each is uniform in [0, that].

    `next()` returns the delay before the next attempt, `reset()` after a success.
    """

    def __init__(self, first: float, cap: float, *, factor: float = 2.0, jitter: bool = True,
                 rng: random.Random | None = None) -> None:
        if first < 0 or factor < 1:
            raise ValueError(f"backoff needs first >= 0 and factor >= 1 (got first={first}, factor={factor})")
        # a cap below the first delay means "never wait longer than first"
        self.first, self.cap, self.factor, self.jitter = first, max(cap, first), factor, jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before retry number `attempt` (0 = first retry)."""
        if self.factor == 1 or self.first == 0:
            return min(self.cap, self.first)
        delay = self.first
        for _ in range(attempt):  # no float overflow for large attempt numbers
            delay *= self.factor
            if delay >= self.cap:
                return self.cap
        return min(self.cap, delay)

    def next(self) -> float:
        delay = self.ceiling(self.attempt)
        self.attempt += 1
        return self.rng.uniform(0.0, delay) if self.jitter else delay

    def reset(self) -> None:
        self.attempt = 0
