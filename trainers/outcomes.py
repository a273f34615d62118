"""What a training step reports, what the ranks agree on after it, and the errors a failed step raises on every
rank (recovery's included)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TrainingError(RuntimeError):
    """A training step failed on some rank; raised on every rank. `ranks` are the ranks that failed."""

    def __init__(self, message: str, *, ranks: Sequence[int] = (), step: int | None = None):
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.step = step


class RecoveryError(TrainingError):
    """Recovery gave up (max_rollbacks reached, nothing to roll back to, NaNs that do not stop); on every rank."""


@dataclass(frozen=True)
class StepOutput:
    """What one training step reports: this rank's loss and the gradient norm before clipping."""

    loss: float
    grad_norm: float
    skipped: bool = False  # the optimizer step was left out (recovery: a NaN or a gradient-norm spike)


@dataclass(frozen=True)
class StepConsensus:
    """One step as every rank agrees on it (summed across ranks, so identical everywhere)."""

    loss: float  # mean over ranks
    tokens: int
    stop: bool
    save: bool
    evaluate: bool
    abort: bool
    failed_ranks: tuple[int, ...]
