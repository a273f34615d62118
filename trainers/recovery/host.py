"""What recovery needs from the trainer it serves: the narrow interface a RecoveryController is built with.

trainers.base.Trainer satisfies it; recovery names this Protocol instead of importing trainers.base, so the
dependency runs one way only (the trainer builds on recovery, never the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ckpt import CheckpointCoordinator, LoadResult, StateComponent

    from ..callback_handler import CallbackHandler
    from ..outcomes import StepOutput
    from ..state import TrainerState


class RecoveryHost(Protocol):
    """The trainer as recovery sees it: its identity, state, checkpoints and the few loop services it calls."""

    rank: int
    world_size: int
    args: Any  # the TrainingArguments (not imported: trainers.arguments builds on this package's policy)
    state: TrainerState
    run_dir: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    coordinator: CheckpointCoordinator
    callback_handler: CallbackHandler
    train_loader: Any
    eval_dataset: Any
    last_checkpoint: str | None
    step_in_progress: int | None
    recovery: Any

    def save_checkpoint(self, metrics: dict[str, float] | None = None) -> str | None: ...
    def all_components(self) -> list[StateComponent]: ...
    def evaluate(self) -> dict[str, float]: ...
    def clip_gradients(self) -> torch.Tensor: ...
    def compute_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...
    def current_lr(self) -> float: ...
    def end_step(self, loss: float, grad_norm: float, apply: bool | None = None) -> StepOutput: ...
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor: ...
    def run_callbacks(self, event: str, /, **kwargs: Any) -> None: ...
    def wait_for_save(self) -> None: ...
    def reload(self, checkpoint: str | int) -> LoadResult: ...
    def after_load(self, metrics: Mapping[str, Any]) -> None: ...
