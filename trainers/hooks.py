"""Step hooks: what the training loop calls around every step, one concern per hook.

The loop (trainers/base.py `Trainer.train`) knows only the StepHook protocol: it calls `train_begin` on each
hook in order, `step_begin` / `step_computed` around the computation of each step, `step_end` once the step's
logging, evaluation and saving are done (any hook may ask to stop), and `train_end` in reverse order however
training ends. The metrics file, recovery and the step watchdog are hooks; a trainer adds its own with
`Trainer.add_step_hook`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .liveness import StepWatchdog
from .metrics_log import MetricsLogger


class StepHook(Protocol):
    """One concern of the loop, called at the same points of every step on every rank."""

    def train_begin(self, resumed_step: int | None) -> None:
        """Before the first step; `resumed_step`: the step a resume loaded, None for a fresh run."""

    def step_begin(self, step: int) -> None:
        """Before step `step` (1-based: the step about to be computed) runs."""

    def step_computed(self, step: int) -> None:
        """After step `step` was computed (or failed), before its logging, evaluation and saving."""

    def step_end(self, step: int, stop: bool) -> bool:
        """After the step's logging, evaluation and saving; returns whether training stops (`stop`: so far)."""

    def train_end(self) -> None:
        """After the last step, or on the way out of an error (in reverse order of train_begin)."""


class MetricsHook:
    """metrics.jsonl and the progress bar."""

    def __init__(self, logger: MetricsLogger, last_loss: Callable[[], float | None]):
        self.logger, self.last_loss = logger, last_loss

    def train_begin(self, resumed_step: int | None) -> None:
        self.logger.start(resumed_step)

    def step_begin(self, step: int) -> None:
        """Nothing before a step."""

    def step_computed(self, step: int) -> None:
        """Nothing until the step's work is done."""

    def step_end(self, step: int, stop: bool) -> bool:
        self.logger.progress(step, self.last_loss())
        return stop

    def train_end(self) -> None:
        self.logger.close()


class RecoveryHook:
    """Recovery at the step boundary: rollback, a signal's save, liveness checks (trainers/recovery/)."""

    def __init__(self, recovery: Callable[[], Any]):
        self.recovery = recovery  # read at each call: the trainer's RecoveryController, or NoRecovery

    def train_begin(self, resumed_step: int | None) -> None:
        self.recovery().begin(resumed=resumed_step is not None)

    def step_begin(self, step: int) -> None:
        """Recovery's per-step checks run inside the step (Trainer.end_step)."""

    def step_computed(self, step: int) -> None:
        """Nothing until the step's work is done."""

    def step_end(self, step: int, stop: bool) -> bool:
        return self.recovery().at_step_boundary(stop)

    def train_end(self) -> None:
        self.recovery().end()


class WatchdogHook:
    """Times each step's computation; a step past args.step_timeout_s ends the process (trainers/liveness.py)."""

    def __init__(self, watchdog: StepWatchdog):
        self.watchdog = watchdog

    def train_begin(self, resumed_step: int | None) -> None:
        self.watchdog.start()

    def step_begin(self, step: int) -> None:
        self.watchdog.arm(step)

    def step_computed(self, step: int) -> None:
        self.watchdog.disarm()

    def step_end(self, step: int, stop: bool) -> bool:
        return stop

    def train_end(self) -> None:
        self.watchdog.stop()


__all__ = ["MetricsHook", "RecoveryHook", "StepHook", "WatchdogHook"]
