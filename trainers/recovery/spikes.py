"""Running medians for the per-step checks: gradient-norm spikes, and whether the loss jumped with them (a few
microseconds per step).

Every finite gradient norm enters the history, applied step or not: a skipped step leaves the weights as
they were, so the next norms may stay high, and a history fed by applied steps only would never move again.
The median shrugs off a single spike; a lasting new level is accepted outright after a streak of spikes
whose loss stayed healthy (`keep_last`, called by the step's judge).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

MIN_HISTORY = 10  # values needed before a spike (or a loss jump) can be called
LOSS_JUMP = 0.5  # a step's loss over its running median by this fraction of |median| counts as a bad loss


class RunningMedian:
    """The last `window` finite values, kept sorted as well so the median is a lookup."""

    def __init__(self, window: int):
        self.window = window
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._recent)

    def median(self) -> float | None:
        n = len(self._sorted)
        if n == 0:
            return None
        mid = n // 2
        return self._sorted[mid] if n % 2 else 0.5 * (self._sorted[mid - 1] + self._sorted[mid])

    def is_spike(self, value: float, factor: float) -> bool:
        """Whether `value` exceeds `factor` times the running median (never before MIN_HISTORY values)."""
        if factor <= 0 or len(self._sorted) < MIN_HISTORY or not math.isfinite(value):
            return False
        median = self.median()
        return median is not None and median > 0 and value > factor * median

    def is_jump(self, value: float) -> bool:
        """Whether `value` is over the running median by LOSS_JUMP x |median| (never before MIN_HISTORY values;
        a non-finite value always is)."""
        if not math.isfinite(value):
            return True
        median = self.median()
        if median is None or len(self._sorted) < MIN_HISTORY:
            return False
        return value > median + LOSS_JUMP * abs(median)

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self._recent.append(value)
        bisect.insort(self._sorted, value)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def keep_last(self, n: int) -> None:
        """Forget all but the newest `n` values (a new level, accepted as the baseline)."""
        kept = list(self._recent)[-n:] if n > 0 else []
        self.load_state_dict(kept)

    def state_dict(self) -> list[float]:
        return list(self._recent)

    def load_state_dict(self, values: Any) -> None:
        self._recent.clear()
        self._sorted.clear()
        for value in list(values)[-self.window:]:
            self.add(float(value))


GradNormHistory = RunningMedian  # the name of the gradient-norm history in earlier versions
