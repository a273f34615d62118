"""The running median of recent gradient norms, for the spike check (a few microseconds per step)."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

MIN_HISTORY = 10  # norms needed before a spike can be called


class GradNormHistory:
    """The last `window` gradient norms of applied steps, kept sorted as well so the median is a lookup."""

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

    def is_spike(self, norm: float, factor: float) -> bool:
        """Whether `norm` exceeds `factor` times the running median (never before MIN_HISTORY norms)."""
        if factor <= 0 or len(self._sorted) < MIN_HISTORY or not math.isfinite(norm):
            return False
        median = self.median()
        return median is not None and median > 0 and norm > factor * median

    def add(self, norm: float) -> None:
        if not math.isfinite(norm):
            return
        self._recent.append(norm)
        bisect.insort(self._sorted, norm)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def state_dict(self) -> list[float]:
        return list(self._recent)

    def load_state_dict(self, norms: Any) -> None:
        self._recent.clear()
        self._sorted.clear()
        for norm in list(norms)[-self.window:]:
            self.add(float(norm))
