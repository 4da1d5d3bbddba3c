"""Bounded step timings: fixed rings, so a run of any length keeps constant memory."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

#: timing samples a run keeps per timer: the medians in a RunResult are over the most recent
#: steps of that `run()` call (all of them in runs up to this length)
TIMING_SAMPLES = 4096


class RecentTimes:
    """The last `size` durations (seconds) in a fixed ring: bounded however long a run is.

    Args:
        size: samples kept (older ones are overwritten).
    """

    def __init__(self, size: int = TIMING_SAMPLES) -> None:
        self._buf = np.zeros(size, np.float64)
        self._n = 0

    def append(self, seconds: float) -> None:
        """Record one duration (seconds)."""
        self._buf[self._n % self._buf.size] = seconds
        self._n += 1

    def clear(self) -> None:
        """Forget every sample."""
        self._n = 0

    def median_ms(self) -> float | None:
        """Median of the kept samples in milliseconds (None when there are none)."""
        if self._n == 0:
            return None
        return 1e3 * float(np.median(self._buf[: min(self._n, self._buf.size)]))


@dataclass
class Timers:
    """The rings a session keeps: optimizer steps, single forwards, population calls."""

    step: RecentTimes = field(default_factory=RecentTimes)
    forward: RecentTimes = field(default_factory=RecentTimes)
    population: RecentTimes = field(default_factory=RecentTimes)

    @classmethod
    def count(cls) -> int:
        """Number of rings (for the memory plan)."""
        return len(fields(cls))

    def clear(self) -> None:
        """Forget every sample of every ring."""
        self.step.clear()
        self.forward.clear()
        self.population.clear()
