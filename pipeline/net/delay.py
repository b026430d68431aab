"""A link's wall-clock delay (--link-delay): messages held until their release
time, in arrival order, as a real link that keeps order (TCP) would."""
from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np


class DelayLine:
    def __init__(self, delay_s: float, jitter_s: float, rng: np.random.Generator):
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.rng = rng
        self._queue: deque[tuple[float, Any]] = deque()
        self._last = float("-inf")

    def push(self, item: Any, now: float) -> None:
        d = self.delay_s
        if self.jitter_s > 0:
            d = max(0.0, d + self.rng.uniform(-self.jitter_s, self.jitter_s))
        # Never before the message ahead of it: jitter stretches, never reorders.
        self._last = max(self._last, now + d)
        self._queue.append((self._last, item))

    def pop_ready(self, now: float) -> list[Any]:
        out = []
        while self._queue and self._queue[0][0] <= now:
            out.append(self._queue.popleft()[1])
        return out

    def pop(self) -> Any:
        """The message at the head, released or not (the caller checked)."""
        return self._queue.popleft()[1]

    def wait_s(self, now: float) -> float | None:
        """Seconds until the next release, or None if nothing is held."""
        return max(0.0, self._queue[0][0] - now) if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)


def straggle(started: float, factor: float) -> None:
    """--slow: having computed since ``started`` (perf_counter), idle so the
    work took ``factor`` times as long, as on a slower machine. The core is
    free meanwhile, which is what a slow neighbour looks like to the rest."""
    if factor > 1.0:
        time.sleep((time.perf_counter() - started) * (factor - 1.0))
