"""Callbacks: hooks into the training loop, and the control flags they use to steer it.

Every hook gets `(args, state, control, **kwargs)`; kwargs always hold `trainer`, `model`, `optimizer` and
`lr_scheduler`, plus what the event is about (see each hook). A hook may set flags on `control` (or return
a TrainerControl). Flags are combined across ranks after every step, so a flag set on any rank steers
every rank the same way.

A callback that has `state_dict()` and `load_state_dict()` is saved with every checkpoint as its own
component `callback.<name>`, where the name is its `state_key` attribute or else its class name, and
restored on resume. Its sharing pattern is GLOBAL (rank 0's copy) unless it sets `sharing_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import TrainerState


@dataclass
class TrainerControl:
    """What the loop should do next. `should_save`/`should_evaluate` apply to the current step only."""

    should_training_stop: bool = False
    """End training after this step (the end-of-training save still happens)."""
    should_save: bool = False
    """Save a checkpoint at this step."""
    should_evaluate: bool = False
    """Evaluate at this step."""
    should_abort_without_save: bool = False
    """End training after this step without saving anything more."""

    def reset_step_flags(self) -> None:
        self.should_save = False
        self.should_evaluate = False


class TrainerCallback:
    """Base class for callbacks; override the hooks you need. Every hook runs on every rank.

    `args` is the trainer's TrainingArguments (typed Any: trainers.arguments builds on this module, through the
    recovery policy's DivergenceDetector)."""

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> TrainerControl | None:
        """Before the first step (after a resume has restored state). kwargs: `resumed_from` (path or None)."""

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> TrainerControl | None:
        """Before each training step; `state.global_step` is the number of steps done so far."""

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl | None:
        """After each optimizer step. kwargs: `loss` (this rank's loss, a float), `grad_norm`."""

    def on_step_agreed(self, args: Any, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> TrainerControl | None:
        """After each step's agreement across ranks. kwargs: `loss` (the mean of the ranks' losses: identical on
        every rank), `grad_norm` (this rank's), `skipped` (recovery left the optimizer step out). A flag set here
        is agreed on with the next step's."""

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl,
               **kwargs: Any) -> TrainerControl | None:
        """After a log line. kwargs: `logs` (the entry appended to state.log_history, plus throughput)."""

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl | None:
        """After an evaluation. kwargs: `metrics` (eval_<name> -> value, identical on every rank)."""

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> TrainerControl | None:
        """After a checkpoint is committed. kwargs: `checkpoint` (its path), `metrics`."""

    def on_instability(self, args: Any, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> TrainerControl | None:
        """Something looks wrong. With a recovery policy: every recovery decision, as kwargs `event` (a
        trainers.recovery.RecoveryEvent; set `event.action` to one of `event.allowed` to change the decision)
        and `reason`. Without one: a non-finite loss or gradient norm on this rank (`reason`, `loss`,
        `grad_norm`), or a reported divergence (`event`, `reason`). See docs/recovery.md.
        """

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl | None:
        """After the last step and the final save."""


EVENTS = ("on_train_begin", "on_step_begin", "on_step_end", "on_step_agreed", "on_log", "on_evaluate", "on_save",
          "on_instability", "on_train_end")


def is_stateful(callback: object) -> bool:
    """Whether a callback is saved with checkpoints (it has state_dict() and load_state_dict())."""
    return callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))
