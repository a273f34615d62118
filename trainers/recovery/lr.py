"""The learning-rate cut after a rollback and its linear ramp back, applied around each optimizer step.

The scale multiplies whatever the optimizer's param groups hold (the scheduler's value) for the optimizer
step only, and the scheduled values are put back after it: schedulers keep computing from their own
state, the optimizer's saved state holds scheduled values, and the ramp is two numbers saved with the
recovery state, so a resume mid-ramp continues it exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LRRamp:
    """Scale `start_scale` for the first step after `start_step`, rising linearly to 1 over `steps` steps."""

    start_step: int | None = None
    """The step the run was rolled back to (None: no cut in force)."""
    start_scale: float = 1.0
    steps: int = 0
    """Ramp length; 0 keeps start_scale for good."""

    def scale(self, step: int) -> float:
        """The factor for optimizer step `step` (1-based: the step being computed)."""
        if self.start_step is None:
            return 1.0
        if self.steps == 0:
            return self.start_scale
        progress = min(1.0, max(0.0, (step - self.start_step - 1) / self.steps))
        return self.start_scale + (1.0 - self.start_scale) * progress

    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "start_scale": self.start_scale, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_step = state["start_step"]
        self.start_scale, self.steps = float(state["start_scale"]), int(state["steps"])


@contextlib.contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Multiply every param group's "lr" by `scale` inside the block, and restore the exact values after it."""
    if scale == 1.0:
        yield
        return
    saved = [group.get("lr") for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved, strict=True):
        if lr is not None:
            group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            if lr is not None:
                group["lr"] = lr


def finish_step(optimizer: torch.optim.Optimizer, lr_scheduler: Any, apply: bool, scale: float) -> None:
    """The end of a training step every rank agreed on: the optimizer step (at `scale` times the scheduled
    learning rate) when `apply`, then the scheduler step and zeroed gradients either way."""
    if apply:
        with scaled_lr(optimizer, scale):
            optimizer.step()
    if lr_scheduler is not None:
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
