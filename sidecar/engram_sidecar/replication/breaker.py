"""Reconnect backoff and the circuit breaker, on an injected clock and random source.

Backoff follows the seed's ladder (100 ms -> 1 s -> 10 s -> 60 s) with "equal jitter": half the
step fixed, half random, so peers that lost a node together don't redial it in lockstep.
The breaker opens after `failures` consecutive failures (the replica shows Degraded) and lets one
half-open probe through once the current backoff step has passed; a success closes it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class Backoff:
    steps: Sequence[float] = (0.1, 1.0, 10.0, 60.0)
    rand: Callable[[], float] = field(default=random.random)
    attempt: int = 0

    def next_delay(self) -> float:
        step = self.steps[min(self.attempt, len(self.steps) - 1)]
        self.attempt += 1
        return step / 2 + step / 2 * self.rand()

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class CircuitBreaker:
    failures_to_open: int = 3
    clock: Callable[[], float] = field(default=lambda: 0.0)
    consecutive_failures: int = 0
    opened_at: float | None = None
    retry_at: float = 0.0

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() >= self.retry_at else "open"

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def record_success(self) -> bool:
        """Returns True when this success closed an open breaker."""
        was_open = self.opened_at is not None
        self.consecutive_failures = 0
        self.opened_at = None
        return was_open

    def record_failure(self, retry_after: float) -> bool:
        """Count a failure; `retry_after` is when a half-open probe may go. True if it opened."""
        self.consecutive_failures += 1
        self.retry_at = self.clock() + retry_after
        if self.opened_at is None and self.consecutive_failures >= self.failures_to_open:
            self.opened_at = self.clock()
            return True
        return False

    def open_for(self) -> float:
        return 0.0 if self.opened_at is None else self.clock() - self.opened_at
