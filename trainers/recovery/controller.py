"""RecoveryController: a trainer's recovery state and decisions, behind a few small hooks in the loop.

The loop calls it for the training step (`training_step`, see step.py), before and after each save
(`before_save`; `after_save` keeps a host copy for rollbacks without a disk read, see memory.py), at each step
boundary (`at_step_boundary`), and when a callback reports instability (`report`). Requests
that can start on some ranks only (a report, a signal) ride on the trainer's own per-step agreements
(`local_requests` / `absorb`), so every rank acts on them at the same boundary. Its state (rollbacks, the
LR ramp, the micro-batch size, the NaN streak, recent gradient norms) is saved with every checkpoint as
the component "recovery".
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ckpt import SharingPattern, StateComponent, read_manifest

from ..divergence import DivergenceDetector
from ..outcomes import RecoveryError as RecoveryError  # re-exported: where it was defined before
from ..outcomes import StepOutput
from . import events as ev
from .actions import divergence_action, emergency_save, rollback
from .events import EventLog, RecoveryEvent, read_events
from .guard import DIVERGED, agree_on_save, mark_diverged
from .host import RecoveryHost
from .lr import LRRamp
from .memory import MIB, HostCopies
from .policy import DIVERGENCE_ACTIONS, RecoveryPolicy
from .rollback import LastGoodGuard
from .signals import StopSignals
from .spikes import RunningMedian
from .step import gate_step, recovered_step
from .watchdog import HEALTH_EXIT_CODE, HealthCheckFailure, HealthWatchdog

log = logging.getLogger("trainers")

COMPONENT = "recovery"
_FORMAT = 1


class RecoveryController:
    """Construct on every rank at the same point (it may create process groups)."""

    enabled = True  # NoRecovery (disabled.py) answers False

    def __init__(self, trainer: RecoveryHost, policy: RecoveryPolicy):
        self.trainer, self.policy = trainer, policy
        self.rank, self.world_size = trainer.rank, trainer.world_size
        if policy.rollback_to == "best" and not trainer.args.preserve_best_model:
            raise ValueError("recovery policy: rollback_to='best' ranks checkpoints by the retention metric; set "
                             "TrainingArguments.preserve_best_model=True, or use rollback_to='last_good'")
        flag = getattr(trainer, "backward_communicates", None)
        self.communicates = bool(flag) if flag is not None else (
            trainer.world_size > 1 and isinstance(trainer.model, DistributedDataParallel))
        self.events = EventLog(trainer.run_dir, enabled=self.rank == 0)
        self.watchdog = HealthWatchdog(self.rank, self.world_size, policy.health_check_interval,
                                       policy.health_check_timeout_s) if (
            policy.health_check_interval > 0 and self.world_size > 1) else None
        self.signals = StopSignals() if policy.handle_signals else None
        self.guard = LastGoodGuard(trainer.coordinator, self.rank)
        self.copies = HostCopies(int(policy.rollback_memory_mb * MIB), self.rank) if (
            policy.rollback_memory_mb > 0) else None
        if policy.detector is not None and not any(isinstance(cb, DivergenceDetector)
                                                   for cb in trainer.callback_handler.callbacks):
            trainer.callback_handler.add(policy.make_detector())
        self.exit = os._exit  # replaced in tests
        # Saved state.
        self.rollbacks = 0
        self.ramp = LRRamp()
        self.micro_batch_size: int | None = None  # None: the whole per-rank batch at once
        self.nan_streak, self.nan_streak_start = 0, None
        self.spike_streak, self.spike_streak_start, self.spike_bad_losses = 0, None, 0
        self.grad_norms = RunningMedian(policy.grad_norm_window)  # every finite norm, applied step or not
        self.losses = RunningMedian(policy.grad_norm_window)  # the mean loss of applied steps
        self.last_target: int | None = None  # the step the last rollback went to
        # [step, batches]: after a rollback with skip_batches, the batches to drop when the replay reaches the
        # step that went bad, so exactly the offending data is not seen again.
        self.pending_skip: list[int] | None = None
        # Per-run bookkeeping.
        self.global_batch: int | None = None
        self._reported: RecoveryEvent | None = None  # a divergence a callback reported here, not yet agreed on
        self._agreed: tuple[str, RecoveryEvent] | None = None  # agreed: act at this step's boundary
        self._diverged: str | None = None  # the agreed divergence action while the weights are diverged
        self._signal = False
        self._last_saved_step: int | None = None

    # ---- state -----------------------------------------------------------------------------------

    def components(self) -> list[StateComponent]:
        return [StateComponent(COMPONENT, self, SharingPattern.GLOBAL, required=False)]

    def state_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "rollbacks": self.rollbacks, "ramp": self.ramp.state_dict(),
                "micro_batch_size": self.micro_batch_size, "nan_streak": self.nan_streak,
                "nan_streak_start": self.nan_streak_start, "spike_streak": self.spike_streak,
                "spike_streak_start": self.spike_streak_start, "grad_norms": self.grad_norms.state_dict(),
                "spike_bad_losses": self.spike_bad_losses, "losses": self.losses.state_dict(),
                "last_target": self.last_target, "pending_skip": self.pending_skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"recovery state has format {state.get('format')!r}; this version reads {_FORMAT}")
        self.rollbacks = int(state["rollbacks"])
        self.ramp.load_state_dict(state["ramp"])
        self.micro_batch_size = state["micro_batch_size"]
        self.nan_streak, self.nan_streak_start = int(state["nan_streak"]), state["nan_streak_start"]
        self.spike_streak, self.spike_streak_start = int(state["spike_streak"]), state["spike_streak_start"]
        self.grad_norms.load_state_dict(state["grad_norms"])
        # Added after format 1 was fixed: absent from older checkpoints.
        self.spike_bad_losses = int(state.get("spike_bad_losses", 0))
        self.losses.load_state_dict(state.get("losses", []))
        self.last_target = state.get("last_target")
        self.pending_skip = state.get("pending_skip")

    # ---- collectives -----------------------------------------------------------------------------

    def reduce(self, values: list[float], what: str = "per-step agreement") -> list[float]:
        """Sum over the ranks (on the watchdog's group when health checks are on)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.watchdog is None:
            return self.trainer.all_reduce_sum(tensor).tolist()
        try:
            return self.watchdog.all_reduce(tensor, what).tolist()
        except HealthCheckFailure as exc:
            self._health_failed(exc)
            raise  # unreachable unless `exit` was replaced

    def _reduce_tensor(self, values: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.reduce(values.tolist(), "save agreement"), dtype=torch.float64)

    def ranks_where(self, flag: bool) -> tuple[int, ...]:
        mask = [0.0] * self.world_size
        mask[self.rank] = float(flag)
        return tuple(r for r, v in enumerate(self.reduce(mask, "event agreement")) if v > 0)

    def dispatch(self, event: RecoveryEvent, *, agree: bool = True, quiet: bool = False) -> str:
        """Show `event` to every callback (they may change its action when `allowed` lists choices), agree on
        rank 0's choice, and record it."""
        original = event.action
        self.trainer.run_callbacks("on_instability", event=event, reason=event.reason)
        if event.allowed and event.action not in event.allowed:
            log.error("on_instability set action=%r for a %s event; allowed: %s. Keeping %r", event.action,
                      event.kind, list(event.allowed), original)
            event.action = original
        if agree and event.allowed and self.world_size > 1:
            code = event.allowed.index(event.action) + 1 if self.rank == 0 else 0
            event.action = event.allowed[int(self.reduce([float(code)], "event agreement")[0]) - 1]
        self.events.record(event)
        if self.rank == 0 and not quiet:
            log.warning("recovery: %s", event.describe())
        return event.action

    # ---- requests that ride on the trainer's agreements --------------------------------------------

    def local_requests(self) -> list[float]:
        rep = self._reported if self.rank == 0 else None
        first_bad = rep.values.get("first_bad_step") if rep is not None else None
        checked = rep.values.get("checked_through") if rep is not None else None
        return [float(self._reported is not None),
                float(DIVERGENCE_ACTIONS.index(rep.action) + 1) if rep is not None else 0.0,
                float(first_bad) + 1.0 if isinstance(first_bad, int) else 0.0,
                float(self.signals is not None and self.signals.received is not None),
                float(checked) + 2.0 if isinstance(checked, int) else 0.0]  # checked may be -1

    def absorb(self, summed: list[float]) -> None:
        reported, code, first_bad, signal, checked = summed
        if reported > 0 and self._agreed is None:
            event = self._reported or RecoveryEvent(ev.DIVERGENCE, self.trainer.state.global_step,
                                                    self.policy.divergence_action, "reported on another rank",
                                                    allowed=DIVERGENCE_ACTIONS)
            event.action = DIVERGENCE_ACTIONS[int(code) - 1] if code > 0 else self.policy.divergence_action
            event.values["first_bad_step"] = int(first_bad) - 1 if first_bad > 0 else event.step
            event.values["checked_through"] = int(checked) - 2 if checked > 0 else None
            event.values["reported_on_ranks"] = int(reported)
            self.events.record(event)
            if self.rank == 0:
                log.warning("recovery: %s", event.describe())
            self.escalate(event.action, event, event.values["first_bad_step"], event.values["checked_through"])
        self._reported = None
        self._signal = self._signal or signal > 0

    def escalate(self, action: str, event: RecoveryEvent, first_bad: int, checked: int | None = None) -> None:
        """Act on an agreed divergence ("rollback", "stop" or "abort") at this step's boundary. `checked`: the
        newest step whose weights a good observation vouches for (None: not known; then first_bad - 2, as for
        per-step observations: step s's loss is computed on the weights of step s - 1)."""
        event.values["first_bad_step"] = first_bad
        event.values["checked_through"] = first_bad - 2 if checked is None else min(checked, first_bad - 1)
        if self._agreed is None:
            self._agreed = (action, event)
        self._diverged = self._diverged or action

    def report(self, info: Mapping[str, Any]) -> None:
        """A callback (DivergenceDetector) saw the run diverge on this rank; acted on at the step boundary."""
        values = {k: info[k] for k in ("metric", "value", "best", "smoothed", "first_bad_step", "last_good_step",
                                       "checked_through") if k in info and info[k] is not None}
        event = RecoveryEvent(ev.DIVERGENCE, self.trainer.state.global_step, self.policy.divergence_action,
                              str(info.get("reason", "divergence")), values=values, allowed=DIVERGENCE_ACTIONS)
        self.trainer.run_callbacks("on_instability", event=event, reason=event.reason)
        if event.action not in DIVERGENCE_ACTIONS:
            log.error("on_instability set action=%r; allowed: %s. Using %r", event.action, DIVERGENCE_ACTIONS,
                      self.policy.divergence_action)
            event.action = self.policy.divergence_action
        if self._reported is None:
            self._reported = event

    # ---- the training step ---------------------------------------------------------------------------

    def training_step(self, batch: Any) -> StepOutput:
        return recovered_step(self, batch)

    def lr_scale(self, step: int) -> float:
        """The factor on the scheduled learning rate for optimizer step `step` (1-based)."""
        return self.ramp.scale(step)

    def gate_step(self, loss: float, grad_norm: float) -> bool:
        """For trainers with their own training_step; see step.gate_step."""
        return gate_step(self, loss, grad_norm)

    def log_fields(self) -> dict[str, Any]:
        t = self.trainer
        return {"lr_scale": self.lr_scale(t.state.global_step + 1),
                "micro_batch_size": self.micro_batch_size or t.args.per_device_train_batch_size,
                "global_batch_size": self.global_batch}

    # ---- saves -----------------------------------------------------------------------------------------

    def before_save(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """The metrics to save with, or None to leave this save out (the same on every rank)."""
        t, step = self.trainer, self.trainer.state.global_step
        rep = self._reported if self.rank == 0 else None
        code = float(DIVERGENCE_ACTIONS.index(rep.action) + 1) if rep is not None else 0.0
        reported, exists, (code,) = agree_on_save(
            self._reduce_tensor, self.rank, diverged=self._reported is not None,
            exists=lambda: any(r.step == step for r in t.coordinator.checkpoints()), extra=[code])
        if reported and self._diverged is None:
            self._diverged = DIVERGENCE_ACTIONS[int(code) - 1] if code > 0 else self.policy.divergence_action
        if self._diverged in ("rollback", "abort"):
            if self.rank == 0:
                log.info("not saving step %d: the run is about to %s", step,
                         "abort" if self._diverged == "abort" else "roll back")
            return None
        if self._diverged is not None:
            if exists:
                if self.rank == 0:
                    log.warning("not saving step %d: the weights are diverged and checkpoint %d exists", step, step)
                return None
            metrics = mark_diverged(metrics)
        else:
            self.guard.update(self._last_good_bound())
        self._last_saved_step = step
        return metrics

    def after_save(self, path: str, metrics: Mapping[str, Any]) -> None:
        """A save of this step was handed to the coordinator: keep a host copy of it (rollback_memory_mb)."""
        if self.copies is not None:  # an async save's staged copy is kept instead of a second one
            self.copies.keep(self.trainer.state.global_step, path, self.trainer.all_components(), metrics,
                             self._last_good_bound(), staged=self.trainer.coordinator.take_staged_state())

    def _last_good_bound(self) -> int | None:
        """While a bad run is in progress (a detector's raw or smoothed value already bad, a NaN or spike
        streak): the newest step whose weights a good observation vouches for, which a rollback target must not
        be newer than. None when nothing is suspect."""
        bounds = []
        for cb in self.trainer.callback_handler.callbacks:
            suspect = cb.suspicion() if isinstance(cb, DivergenceDetector) else None
            if suspect is not None:
                start, checked = suspect
                bounds.append(start - 2 if checked is None else min(checked, start - 1))
        bounds += [start - 2 for start in (self.nan_streak_start, self.spike_streak_start) if start is not None]
        return min(bounds) if bounds else None

    # ---- the step boundary -------------------------------------------------------------------------

    def begin(self, resumed: bool) -> None:
        """At the start of train(): the event file, the signal handlers, and rollbacks made before a restart."""
        self.events.start(fresh=not resumed)
        if resumed:  # a restart resumes from a checkpoint older than its last rollbacks: count them from the log
            logged = sum(e.get("kind") == ev.ROLLBACK for e in read_events(self.trainer.run_dir)) if self.rank == 0 else 0
            self.rollbacks = max(self.rollbacks, int(self.reduce([float(logged)], "start-up agreement")[0]))
            self._warn_if_diverged()
            self._skip_if_due()  # saved at the step before a pending skip: it is due before the next batch
        elif self.policy.can_roll_back and self.trainer.args.max_steps > 0:
            self._save_initial()
        if self.signals is not None:
            self.signals.install()

    def _save_initial(self) -> None:
        """A fresh run saves its initial state as checkpoint 0, so a run that goes bad before its first save
        has something to roll back to (retention rotates it out like any other checkpoint)."""
        path = self.trainer.save_checkpoint()
        if self.rank == 0 and path is not None:
            log.info("recovery: saved the initial state as %s (the rollback target until the first save)", path)

    def _warn_if_diverged(self) -> None:
        """A resume from a checkpoint saved with diverged weights (divergence_action="stop") goes on diverging."""
        if self.rank != 0:
            return
        t = self.trainer
        refs = t.coordinator.checkpoints()
        here = next((r for r in refs if r.step == t.state.global_step), None)
        if here is None or read_manifest(t.coordinator.storage, here.path).metrics.get(DIVERGED) is not True:
            return
        older = [r for r in refs if r.step < here.step and
                 read_manifest(t.coordinator.storage, r.path).metrics.get(DIVERGED) is not True]
        hint = f"resume_from_checkpoint={older[-1].step}" if older else "an earlier checkpoint (see run_dir/abandoned/)"
        log.warning("resumed from %s, which holds diverged weights (saved by divergence_action='stop'); training goes "
                    "on from them. To start again from good weights use %s", here.path, hint)

    def end(self) -> None:
        if self.signals is not None:
            self.signals.uninstall()
        self.guard.release()

    def schedule_skip(self, first_bad: int) -> None:
        """After a rollback: drop `skip_batches` batches when the replay is about to run step `first_bad`."""
        self.pending_skip = [first_bad, self.policy.skip_batches] if self.policy.skip_batches else None
        self._skip_if_due()

    def _skip_if_due(self) -> None:
        if self.pending_skip is None or self.trainer.state.global_step + 1 < self.pending_skip[0]:
            return
        at, count = self.pending_skip
        self.pending_skip = None
        for _ in range(count):
            next(self.trainer.train_loader)
        if self.rank == 0:
            log.info("recovery: skipped %d batches at step %d, where the run went bad before the rollback", count, at)

    def at_step_boundary(self, stop: bool) -> bool:
        """Act on what the ranks agreed during the step; returns whether training stops."""
        self._skip_if_due()
        rolled = False
        if self._agreed is not None:
            action, event = self._agreed
            self._agreed = None
            if action != "rollback":
                return divergence_action(self, action, event)
            why = event.kind if event.reason == event.kind else f"{event.kind}: {event.reason}"
            rollback(self, why, int(event.values["first_bad_step"]), int(event.values["checked_through"]))
            rolled = True
        if self._signal:
            emergency_save(self, self.signals.received if self.signals and self.signals.received else "signal")
            return True
        if self.watchdog is not None and self.watchdog.due(self.trainer.state.global_step):
            try:
                self.watchdog.check()
            except HealthCheckFailure as exc:
                self._health_failed(exc)
        return False if rolled else stop  # a rollback undoes the steps a stop at max_steps counted

    def record_hang(self, step: int, elapsed: float, timeout_s: float) -> None:
        """The trainer's step watchdog found step `step` running past its timeout (from its thread; the process
        exits next): recorded as a failed health check seen by this rank."""
        self.events.record(RecoveryEvent(ev.HEALTH_CHECK_FAILED, step, "exit",
                                         f"step {step} did not finish within {timeout_s:g}s", ranks=(),
                                         values={"during": "step watchdog", "cause": f"{elapsed:.0f}s in the step",
                                                 "timeout_s": timeout_s, "seen_by_rank": self.rank}), write=True)

    def _health_failed(self, exc: HealthCheckFailure) -> None:
        """Record who did not answer, tell the callbacks, and exit non-zero (torchrun restarts the job)."""
        # Inside a step (its agreements), the step being computed; between steps, the one that just ended.
        step = self.trainer.step_in_progress or self.trainer.state.global_step
        event = RecoveryEvent(ev.HEALTH_CHECK_FAILED, step, "exit", str(exc),
                              ranks=exc.missing, values={"during": exc.during, "cause": exc.cause,
                                                         "timeout_s": self.policy.health_check_timeout_s,
                                                         "seen_by_rank": self.rank})
        self.events.record(event, write=True)  # every rank that saw it writes its own view
        log.error("rank %d: recovery: %s; exiting with code %d so that torchrun can restart the job", self.rank,
                  event.describe(), HEALTH_EXIT_CODE)
        try:
            self.trainer.run_callbacks("on_instability", event=event, reason=event.reason)
        except Exception as cb_exc:
            log.error("rank %d: on_instability failed: %r", self.rank, cb_exc)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        self.exit(HEALTH_EXIT_CODE)
