"""What a Trainer saves and loads: its components, checkpoint saves (sync or async, with on_save_error), the
resume at the start of train(), reloads for recovery's rollbacks, and the stop a reported divergence causes.

`TrainerCheckpoints` is a base class of trainers.base.Trainer (it uses the trainer's state, coordinator, recovery
and callbacks); it holds no state of its own. A trainer that resumes across layouts overrides `_load_checkpoint`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from ckpt import CheckpointCoordinator, CheckpointError, LoadResult, SaveHandle, StateComponent

from .checkpointing import (
    SAVE_ERROR_KIND,
    load_components,
    resume_target,
    save_failure_entry,
    tolerates,
    warm_start,
)
from .keys import CALLBACK_PREFIX, CHECKPOINT_KIND, TRAIN_LOSS, TRAINER_STATE
from .recovery.events import DIVERGENCE, RecoveryEvent
from .recovery.guard import guard_save
from .recovery.policy import DIVERGENCE_ACTIONS
from .rng import set_seed

log = logging.getLogger("trainers")


class TrainerCheckpoints:
    """The checkpoint half of Trainer: saving, resuming, reloading (mixed into trainers.base.Trainer)."""

    # Provided by Trainer.
    rank: int
    state: Any
    args: Any
    coordinator: CheckpointCoordinator
    recovery: Any
    last_checkpoint: str | None

    # ---- building -------------------------------------------------------------------------------

    def _build_coordinator(self) -> CheckpointCoordinator:
        return CheckpointCoordinator(self.run_dir, process_groups=self.get_process_groups() or None,
                                     timeout=timedelta(seconds=self.args.checkpoint_timeout_s),
                                     retention=self.retention, async_save=self.args.async_save)

    def all_components(self) -> list[StateComponent]:
        """The trainer's components plus one per stateful callback (and recovery's): what every checkpoint holds."""
        own = self.get_state_components()
        clash = [c.key for c in own if c.key.startswith(CALLBACK_PREFIX)]
        if clash:
            raise ValueError(f"get_state_components() returned keys {clash}; the prefix {CALLBACK_PREFIX!r} is "
                             "reserved for callbacks")
        return [*own, *self.callback_handler.components(), *self.recovery.components()]

    # ---- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, metrics: dict[str, float] | None = None) -> str | None:
        """Save every component as checkpoint `global_step` (collective); returns its path once committed (None
        for an async save, which callbacks hear of through on_save when it commits; `last_checkpoint` then names it).

        Diverged weights are saved with their evaluation metrics replaced by NaN (never ranked best), and never
        over an existing checkpoint; returns None when the save is left out for that (or for a rollback), or when
        it failed and args.on_save_error="warn" (the failure is logged and recorded in the log history).
        """
        s = self.state
        recorded: dict[str, Any] | None = {TRAIN_LOSS: self._last_loss, "epoch": s.epoch, "tokens_seen": s.tokens_seen,
                                           **(metrics or {})}
        if self.recovery.enabled:
            recorded = self.recovery.before_save(recorded)
        else:
            recorded = guard_save(self.all_reduce_sum, self.rank, s.global_step, recorded, diverged=self._diverged,
                                  exists=lambda: any(r.step == s.global_step for r in self.coordinator.checkpoints()))
        if recorded is None:
            return None
        self.wait_for_save()  # a failed background save is reported before this one starts
        self._saving_step = s.global_step
        # Newer checkpoints left by a resume or rollback to an older step are set aside by the coordinator's rule
        # (an abandoned timeline); overwrite=True only replaces a step this run saves again (guarded above).
        try:
            saved = self.coordinator.save(s.global_step, self.all_components(), metrics=recorded, overwrite=True)
        except CheckpointError as exc:
            if not tolerates(self.args.on_save_error, exc, self.coordinator):
                raise
            self._record_save_failure(exc)
            return None
        # a host copy of the state as saved (with recovery), taken now: the save may be async
        self.recovery.after_save(self.coordinator.path_for(s.global_step), recorded)
        if isinstance(saved, SaveHandle):  # announced once committed, at the next save or the end of training
            self._in_flight = (saved, recorded)
            return None
        self._announce_save(s.global_step, saved, recorded)
        return saved

    def _announce_save(self, step: int, path: str, metrics: dict[str, Any]) -> None:
        """A save committed: its line in metrics.jsonl (`ckpt report` marks a save that is no longer on disk as
        deleted by retention) and the callbacks' on_save."""
        self.last_checkpoint = path
        self.metrics_logger.append(CHECKPOINT_KIND, {"step": step, "checkpoint": path.rsplit("/", 1)[-1]})
        self.run_callbacks("on_save", checkpoint=path, metrics=metrics)

    def wait_for_save(self) -> None:
        """Wait for a background save; its failure is raised, or recorded with on_save_error="warn". A save that
        committed is announced to the callbacks (on_save) here."""
        in_flight, self._in_flight = self._in_flight, None
        try:
            self.coordinator.wait()
        except CheckpointError as exc:
            if not tolerates(self.args.on_save_error, exc, self.coordinator):
                raise
            self._record_save_failure(exc)
            return
        if in_flight is not None and in_flight[0].path is not None:
            self._announce_save(in_flight[0].step, in_flight[0].path, in_flight[1])

    def _record_save_failure(self, exc: CheckpointError) -> None:
        entry = save_failure_entry(self._saving_step, exc, rank=self.rank, latest=self.coordinator.latest())
        self.state.log_history.append(entry)
        self.metrics_logger.append(SAVE_ERROR_KIND, entry)

    def _resume_or_seed(self, resume: str | int | None) -> str | None:
        """Load the checkpoint to resume from (returns its path), or seed a fresh run (returns None)."""
        resume = resume_target(resume, self.run_dir, self.coordinator.storage.exists)
        latest = self.coordinator.latest()
        # Rank 0's view of the run dir decides, so every rank takes the same branch.
        seen = torch.zeros(2, dtype=torch.float64)
        if self.rank == 0 and latest is not None:
            seen += torch.tensor([1.0, float(latest.step)], dtype=torch.float64)
        has_checkpoint, newest = self.all_reduce_sum(seen).tolist()
        if resume is None or (resume == "latest" and not has_checkpoint):
            if has_checkpoint:
                raise ValueError(f"output_dir {self.run_dir} already holds checkpoints (newest: step {int(newest)}); "
                                 "set resume_from_checkpoint='latest' to continue that run, or use a new output_dir")
            if resume == "latest" and self.rank == 0:
                log.info("no checkpoint in %s yet: starting a fresh run", self.run_dir)
            set_seed(self.args.seed)
            self._last_loss = math.nan
            return None
        result = self.reload(resume)
        if self.rank == 0:
            log.info("resumed from %s at step %d", result.path, self.state.global_step)
            if newest > result.step:
                log.warning("checkpoints after step %d exist in %s; the first save of this run sets them aside as "
                            "an abandoned timeline (run_dir/abandoned/)", result.step, self.run_dir)
        return result.path

    def _load_checkpoint(self, checkpoint: str | int) -> LoadResult:
        """Load every component from `checkpoint` (collective). Trainers that resume across layouts override it."""
        return load_components(self.coordinator, self.all_components(), checkpoint, rank=self.rank)

    def reload(self, checkpoint: str | int) -> LoadResult:
        """Load `checkpoint` (a resume, or recovery's rollback) and pick the loop's bookkeeping up from it."""
        result = self._load_checkpoint(checkpoint)
        if TRAINER_STATE not in result.loaded:  # a checkpoint imported from another format
            warm_start(self, result)
        self.after_load(result.metrics)
        return result

    def after_load(self, metrics: Mapping[str, Any]) -> None:
        """The loop's bookkeeping after every component was loaded (from a checkpoint, or recovery's host copy)."""
        loss = metrics.get(TRAIN_LOSS)
        self._last_loss = float(loss) if isinstance(loss, int | float) else math.nan
        self._clock = (time.perf_counter(), self.state.tokens_seen, self.state.global_step)

    def report_instability(self, event: Any) -> None:
        """A callback saw the run going bad (DivergenceDetector calls this with a dict: reason, metric, value,
        first_bad_step, action). With a recovery policy, recovery acts at the step boundary on every rank;
        without one, "stop" saves (marked diverged) and stops, "abort" stops without saving, "rollback" stops."""
        if self.recovery.enabled:
            self.recovery.report(event)
            return
        self._diverged = True
        info = dict(event) if isinstance(event, Mapping) else {"reason": str(event)}
        shown = RecoveryEvent(DIVERGENCE, self.state.global_step, str(info.pop("action", "stop")),
                              str(info.pop("reason", "divergence")), values=info, allowed=DIVERGENCE_ACTIONS)
        self.run_callbacks("on_instability", event=shown, reason=shown.reason)
        if shown.action == "abort":
            self.control.should_abort_without_save = True
        else:
            if shown.action == "rollback" and self.rank == 0:
                log.warning("divergence at step %d: rollback needs a recovery policy (TrainingArguments.recovery); "
                            "stopping instead", self.state.global_step)
            self.control.should_save = True
        self.control.should_training_stop = True


__all__ = ["TrainerCheckpoints"]
