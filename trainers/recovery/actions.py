"""What recovery does at a step boundary: roll back, stop or abort on divergence, save on a signal.

`ctl` is the RecoveryController that calls these functions (typed Any: controller.py imports this module).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..outcomes import RecoveryError
from . import events as ev
from .events import RecoveryEvent
from .lr import LRRamp
from .memory import restore
from .rollback import choose_target

log = logging.getLogger("trainers")


def give_up(ctl: Any, message: str) -> None:
    """Record why recovery stops, wait for a save in flight, and raise RecoveryError on every rank."""
    step = ctl.trainer.state.global_step
    ctl.dispatch(RecoveryEvent(ev.GAVE_UP, step, "stop", message, values={"rollbacks": ctl.rollbacks}), quiet=True)
    if ctl.rank == 0:
        log.error("recovery: %s", message)
    ctl.trainer.coordinator.wait()
    raise RecoveryError(message, step=step)


def rollback(ctl: Any, reason: str, first_bad: int, checked: int) -> None:
    """Reload the chosen checkpoint (every component, every rank), then cut the LR and ramp it back."""
    t, policy = ctl.trainer, ctl.policy
    step, started = t.state.global_step, time.perf_counter()
    if ctl.rollbacks >= policy.max_rollbacks:
        give_up(ctl, f"the run went bad again at step {step} ({reason}) after {ctl.rollbacks} rollback(s); "
                     f"max_rollbacks={policy.max_rollbacks} is reached, so training stops. Lower the learning rate, "
                     "look at the data around that step, or raise max_rollbacks in the recovery policy")
    t.wait_for_save()  # a save in flight commits first: it may be the target, and the stretch after it is set aside
    target, passed_over = -1, -1
    if ctl.rank == 0:
        ref, over = choose_target(t.coordinator, policy, checked, step, again=ctl.last_target)
        target, passed_over = (ref.step if ref is not None else -1), (over if over is not None else -1)
    agreed = ctl.reduce([float(target + 1), float(passed_over + 1)] if ctl.rank == 0 else [0.0, 0.0],
                        "rollback agreement")
    target, passed_over = int(agreed[0]) - 1, int(agreed[1]) - 1
    if target < 0:
        again = (f"; the run went bad again before any save after the rollback to step {passed_over}, so only "
                 "older checkpoints fit") if passed_over >= 0 else ""
        give_up(ctl, f"the run went bad at step {step} ({reason}, first bad observation at step {first_bad}, newest "
                     f"weights a good observation vouches for: step {checked}) but no committed checkpoint fits rollback_to="
                     f"{policy.rollback_to!r}{again}; save more often (save_steps) or start from an earlier "
                     "checkpoint")
    scale_now = ctl.lr_scale(step)
    kept = (ctl.rollbacks + 1, ctl.micro_batch_size)
    to_step, to_path, source = reload(ctl, target)  # also reloads this controller's state, from before the trouble
    ctl.rollbacks, ctl.micro_batch_size = kept
    ctl.last_target = to_step
    ctl.ramp = LRRamp(start_step=to_step, start_scale=scale_now * policy.lr_factor, steps=policy.lr_ramp_steps)
    ctl.nan_streak, ctl.nan_streak_start = 0, None
    ctl.spike_streak, ctl.spike_streak_start, ctl.spike_bad_losses = 0, None, 0
    ctl._diverged = None
    ctl._last_saved_step = to_step
    # The coordinator's one rule for going back: newer checkpoints are an abandoned timeline (run_dir/abandoned/).
    moved = t.coordinator.abandon_newer(to_step, f"rollback-{ctl.rollbacks}-at-{step}")
    ctl.guard.release()
    ctl.schedule_skip(first_bad)
    ctl.dispatch(RecoveryEvent(
        ev.ROLLBACK, step, "rollback", reason,
        values={"from_step": step, "to_step": to_step, "to_checkpoint": to_path, "first_bad_step": first_bad,
                "checked_through": checked, **({"passed_over": passed_over} if passed_over >= 0 else {}),
                "rollback": ctl.rollbacks, "max_rollbacks": policy.max_rollbacks,
                "set_aside": moved, "skip_batches": policy.skip_batches,
                **({"skip_at_step": first_bad} if policy.skip_batches else {}),
                "restored_from": source, "restore_s": round(time.perf_counter() - started, 4)}), quiet=True)
    ctl.dispatch(RecoveryEvent(
        ev.LR_CHANGE, to_step, "scale", f"learning rate cut after rollback {ctl.rollbacks}",
        values={"lr_scale": ctl.ramp.start_scale, "ramp_steps": policy.lr_ramp_steps, "lr": t.current_lr()}),
        quiet=True)
    if ctl.rank == 0:
        log.warning("recovery: rolled back from step %d to %s (rollback %d of %d); learning rate x%.3g, back to the "
                    "schedule over %d steps", step, to_path, ctl.rollbacks, policy.max_rollbacks,
                    ctl.ramp.start_scale, policy.lr_ramp_steps)


def reload(ctl: Any, target: int) -> tuple[int, str, str]:
    """Load checkpoint `target` on every rank: from the host copies when every rank holds one (no disk read),
    else from the disk. Returns (its step, its path, "memory" or "disk")."""
    t = ctl.trainer
    if ctl.copies is not None:  # the policy, so the branch, is the same on every rank
        held = ctl.copies.get(target)
        failed = held is None
        if held is not None:
            try:
                restore(held, t.all_components())
            except Exception as exc:  # every component is loaded from the disk below, over what was applied
                log.warning("rank %d: recovery: restoring step %d from host memory failed (%r); loading it from the "
                            "disk", ctl.rank, target, exc)
                failed = True
        missing = ctl.reduce([float(failed)], "rollback agreement")[0]
        if missing == 0:
            t.after_load(held.metrics)
            ctl.copies.forget_after(target)
            return held.step, held.path, "memory"
        if ctl.rank == 0:
            log.info("recovery: %d rank(s) hold no host copy of step %d; loading it from the disk", int(missing),
                     target)
    result = t.reload(target)
    if ctl.copies is not None:
        ctl.copies.forget_after(result.step)
    return result.step, result.path, "disk"


def divergence_action(ctl: Any, action: str, event: RecoveryEvent | None = None) -> bool:
    """"stop": set aside the checkpoints no good observation vouches for (a resume from "latest" would pick
    them), save (marked diverged, never over an existing checkpoint), then
    stop; "abort": just stop."""
    t = ctl.trainer
    if action == "stop":
        checked = event.values.get("checked_through") if event is not None else None
        if isinstance(checked, int):  # agreed on every rank
            moved = t.coordinator.abandon_newer(checked, f"stop-at-{t.state.global_step}",
                                                before_step=t.state.global_step)
            if moved and ctl.rank == 0:
                log.warning("recovery: moved %d checkpoint(s) newer than step %d (the newest weights a good "
                            "observation vouches for) to %s", len(moved), checked, os.path.dirname(moved[0]))
        if ctl._last_saved_step != t.state.global_step:
            wants_eval = (t.args.eval_on_save or t.args.preserve_best_model) and t.eval_dataset is not None
            t.save_checkpoint(t.evaluate() if wants_eval else None)  # its metrics are marked: never ranked best
    return True


def emergency_save(ctl: Any, signal_name: str) -> None:
    """Save at this boundary (unless this step was just saved or rolled back to), so the job can stop."""
    t = ctl.trainer
    step = t.state.global_step
    path, before = None, t.last_checkpoint
    if ctl._last_saved_step != step:
        path = t.save_checkpoint()
    t.wait_for_save()  # an async save is committed (and announced) before the job stops
    if path is None and t.last_checkpoint != before:
        path = t.last_checkpoint
    ctl.dispatch(RecoveryEvent(ev.EMERGENCY_SAVE, step, "save_and_stop", f"{signal_name} received",
                               values={"checkpoint": path or "none: saved at this step already, or diverged"}),
                 quiet=True)
    if ctl.rank == 0:
        log.warning("recovery: %s received: saved step %d, stopping", signal_name, step)
