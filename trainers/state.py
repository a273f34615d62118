"""TrainerState: where the loop is (step, epoch, tokens) and what it logged; saved with every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_FORMAT = 1
_SAVED = ("global_step", "epoch", "tokens_seen", "log_history", "best_metric", "best_step", "window_loss_sum",
          "window_grad_norm_sum", "window_steps")


@dataclass
class TrainerState:
    """The loop's progress. Every saved field is identical on every rank (so DDP can replicate it).

    Fields that are not saved (`max_steps`, `world_size`, `is_world_process_zero`) describe the job.
    """

    global_step: int = 0
    """Optimizer steps done so far."""
    epoch: float = 0.0
    """Passes over the training data so far, fractional within an epoch."""
    tokens_seen: int = 0
    """Tokens (elements of each batch's first tensor, or what Trainer.count_tokens says) over all ranks."""
    log_history: list[dict[str, Any]] = field(default_factory=list)
    """Every log line and evaluation, as plain numbers (no timings: they differ between ranks)."""
    best_metric: float | None = None
    """Best value of the retention metric seen in an evaluation (when preserve_best_model is set)."""
    best_step: int | None = None
    """Step of best_metric."""
    window_loss_sum: float = 0.0
    """Sum of the per-step loss (mean over ranks) since the last log line; kept so logs survive a resume."""
    window_grad_norm_sum: float = 0.0
    """Sum of the per-step gradient norm since the last log line."""
    window_steps: int = 0
    """Steps since the last log line."""
    max_steps: int = 0
    world_size: int = 1
    is_world_process_zero: bool = True

    def state_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **{name: getattr(self, name) for name in _SAVED}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"trainer state has format {state.get('format')!r}; this version reads {_FORMAT}")
        missing = [name for name in _SAVED if name not in state]
        if missing:
            raise ValueError(f"trainer state lacks {missing}; was it written by another trainer version?")
        for name in _SAVED:
            value = state[name]
            setattr(self, name, [dict(entry) for entry in value] if name == "log_history" else value)

    def reset_window(self) -> None:
        self.window_loss_sum = 0.0
        self.window_grad_norm_sum = 0.0
        self.window_steps = 0
