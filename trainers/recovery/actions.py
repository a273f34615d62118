"""What recovery does at a step boundary: roll back, stop or abort on divergence, save on a signal."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import events as ev
from .events import RecoveryEvent
from .lr import LRRamp
from .rollback import choose_target, set_aside

if TYPE_CHECKING:
    from .controller import RecoveryController

log = logging.getLogger("trainers")


def give_up(ctl: RecoveryController, message: str) -> None:
    """Record why recovery stops, wait for a save in flight, and raise RecoveryError on every rank."""
    from .controller import RecoveryError

    step = ctl.trainer.state.global_step
    ctl.dispatch(RecoveryEvent(ev.GAVE_UP, step, "stop", message, values={"rollbacks": ctl.rollbacks}), quiet=True)
    if ctl.rank == 0:
        log.error("recovery: %s", message)
    ctl.trainer.coordinator.wait()
    raise RecoveryError(message, step=step)


def rollback(ctl: RecoveryController, reason: str, first_bad: int) -> None:
    """Reload the chosen checkpoint (every component, every rank), then cut the LR and ramp it back."""
    t, policy = ctl.trainer, ctl.policy
    step = t.state.global_step
    if ctl.rollbacks >= policy.max_rollbacks:
        give_up(ctl, f"the run went bad again at step {step} ({reason}) after {ctl.rollbacks} rollback(s); "
                     f"max_rollbacks={policy.max_rollbacks} is reached, so training stops. Lower the learning rate, "
                     "look at the data around that step, or raise max_rollbacks in the recovery policy")
    target = -1
    if ctl.rank == 0:
        ref = choose_target(t.coordinator, policy, first_bad, step)
        target = ref.step if ref is not None else -1
    target = int(ctl.reduce([float(target + 1 if ctl.rank == 0 else 0)], "rollback agreement")[0]) - 1
    if target < 0:
        give_up(ctl, f"the run went bad at step {step} ({reason}, first bad observation at step {first_bad}) but no "
                     f"committed checkpoint fits rollback_to={policy.rollback_to!r}; save more often (save_steps) "
                     "or start from an earlier checkpoint")
    scale_now = ctl.lr_scale(step)
    kept = (ctl.rollbacks + 1, ctl.micro_batch_size)
    result = t._reload(target)  # also reloads this controller's saved state, from before the trouble
    ctl.rollbacks, ctl.micro_batch_size = kept
    ctl.ramp = LRRamp(start_step=result.step, start_scale=scale_now * policy.lr_factor, steps=policy.lr_ramp_steps)
    ctl.nan_streak, ctl.nan_streak_start = 0, None
    ctl.spike_streak, ctl.spike_streak_start = 0, None
    ctl._diverged = None
    ctl._last_saved_step = result.step
    moved = set_aside(t.coordinator, result.step, f"rollback-{ctl.rollbacks}-at-{step}") if ctl.rank == 0 else []
    ctl.guard.release()
    for _ in range(policy.skip_batches):
        next(t.train_loader)
    ctl.dispatch(RecoveryEvent(
        ev.ROLLBACK, step, "rollback", reason,
        values={"from_step": step, "to_step": result.step, "to_checkpoint": result.path, "first_bad_step": first_bad,
                "rollback": ctl.rollbacks, "max_rollbacks": policy.max_rollbacks, "set_aside": moved,
                "skipped_batches": policy.skip_batches}), quiet=True)
    ctl.dispatch(RecoveryEvent(
        ev.LR_CHANGE, result.step, "scale", f"learning rate cut after rollback {ctl.rollbacks}",
        values={"lr_scale": ctl.ramp.start_scale, "ramp_steps": policy.lr_ramp_steps, "lr": t.current_lr()}),
        quiet=True)
    if ctl.rank == 0:
        log.warning("recovery: rolled back from step %d to %s (rollback %d of %d); learning rate x%.3g, back to the "
                    "schedule over %d steps", step, result.path, ctl.rollbacks, policy.max_rollbacks,
                    ctl.ramp.start_scale, policy.lr_ramp_steps)


def divergence_action(ctl: RecoveryController, action: str) -> bool:
    """"stop": save (marked diverged, never over an existing checkpoint), then stop; "abort": just stop."""
    t = ctl.trainer
    if action == "stop" and ctl._last_saved_step != t.state.global_step:
        wants_eval = (t.args.eval_on_save or t.args.preserve_best_model) and t.eval_dataset is not None
        t.save_checkpoint(t.evaluate() if wants_eval else None)  # its metrics are marked: never ranked best
    return True


def emergency_save(ctl: RecoveryController, signal_name: str) -> None:
    """Save at this boundary (unless this step was just saved or rolled back to), so the job can stop."""
    t = ctl.trainer
    step = t.state.global_step
    path = None
    if ctl._last_saved_step != step:
        path = t.save_checkpoint()
    t.coordinator.wait()
    ctl.dispatch(RecoveryEvent(ev.EMERGENCY_SAVE, step, "save_and_stop", f"{signal_name} received",
                               values={"checkpoint": path or "none: saved at this step already, or diverged"}),
                 quiet=True)
    if ctl.rank == 0:
        log.warning("recovery: %s received: saved step %d, stopping", signal_name, step)
