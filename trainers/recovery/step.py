"""The training step under a recovery policy.

The batch runs in micro-batches (gradient accumulation, so a smaller micro-batch keeps the global batch).
The ranks then agree, in one small all-reduce, on [out of memory, error, non-finite loss, non-finite
gradient norm, gradient-norm spike, samples, loss sum] (the mean loss judges whether a spike came with a
loss jump). Where the backward pass itself communicates (DDP's gradient
all-reduce), the agreement comes before the last micro-batch's backward, so a rank that ran out of memory
never leaves the others waiting in the gradient exchange; the gradient flags are then decided after it
from the all-reduced gradients' norm, which is the same on every rank. Every rank then takes the same
action: retry with half the micro-batch, skip the optimizer step, apply it, or raise.

`ctl` is the RecoveryController that calls these functions (typed Any: controller.py imports this module).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..outcomes import RecoveryError, StepOutput, TrainingError
from . import events as ev
from .events import RecoveryEvent
from .microbatch import batch_length, is_out_of_memory, release_memory, split_batch
from .policy import DIVERGENCE_ACTIONS

OOM, ERROR, NAN_LOSS, NAN_GRAD, SPIKE, SAMPLES, LOSS = range(7)
N_FLAGS = 7


@dataclass
class Attempt:
    """One pass over the batch's micro-batches on this rank."""

    loss: torch.Tensor | None = None  # the sum of the weighted micro-batch losses so far
    pending: torch.Tensor | None = None  # the last micro-batch's loss when its backward waits for the agreement
    samples: int = 0
    failure: Exception | None = None
    oom: bool = False


def forward_backward(ctl: Any, batch: Any, micro: int) -> Attempt:
    t = ctl.trainer
    pieces = split_batch(batch, micro)
    total = sum(n for _, n in pieces)
    no_sync = getattr(t.model, "no_sync", None) if len(pieces) > 1 else None
    att = Attempt()
    try:
        for i, (piece, n) in enumerate(pieces):
            last = i == len(pieces) - 1
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
                loss = t.compute_loss(t.model, piece)
                if len(pieces) > 1:
                    loss = loss * (n / total)
                att.loss = loss.detach() if att.loss is None else att.loss + loss.detach()
                att.samples += n
                if last and ctl.communicates:
                    att.pending = loss
                    break
                loss.backward()
    except Exception as exc:
        att.failure, att.oom, att.pending = exc, ctl.policy.oom_retry and is_out_of_memory(exc), None
    return att


def recovered_step(ctl: Any, batch: Any) -> StepOutput:
    t = ctl.trainer
    step, n = t.state.global_step + 1, batch_length(batch)
    while True:
        micro = min(ctl.micro_batch_size or n, n)
        att = forward_backward(ctl, batch, micro)
        failed = att.failure is not None
        loss = float(att.loss) if not failed and att.loss is not None else math.nan
        grad_norm = math.nan
        if not failed and not ctl.communicates:
            grad_norm = float(t.clip_gradients())
        flags = [0.0] * N_FLAGS
        flags[OOM], flags[ERROR] = float(att.oom), float(failed and not att.oom)
        flags[NAN_LOSS] = float(not failed and not math.isfinite(loss))
        flags[NAN_GRAD] = float(not failed and not ctl.communicates and not math.isfinite(grad_norm))
        flags[SPIKE] = float(not failed and not ctl.communicates and ctl.grad_norms.is_spike(
            grad_norm, ctl.policy.grad_norm_spike_factor))
        flags[SAMPLES] = float(att.samples if not failed else 0)
        flags[LOSS] = loss if math.isfinite(loss) else 0.0
        agreed = ctl.reduce(flags)
        if agreed[ERROR] > 0:
            ranks = ctl.ranks_where(bool(flags[ERROR]))
            raise TrainingError(f"the training step failed at step {step} on ranks {list(ranks)}"
                                + (f": {att.failure!r}" if att.failure is not None else ""),
                                ranks=ranks, step=step) from att.failure
        if agreed[OOM] == 0:
            break
        att = None  # let the failed attempt's tensors go before the retry
        t.optimizer.zero_grad(set_to_none=True)
        _abandon_backward(ctl)
        release_memory()
        _out_of_memory(ctl, step, micro, n, bool(flags[OOM]))
    ctl.global_batch = int(agreed[SAMPLES])
    if ctl.communicates:
        grad_norm = _synced_backward(ctl, att, step, skip=agreed[NAN_LOSS] > 0 and ctl.policy.nan_action != "warn")
    apply = _judge(ctl, step, loss, grad_norm, agreed, local_bad=not math.isfinite(loss) or (
        not ctl.communicates and not math.isfinite(grad_norm)))
    return t.end_step(loss, grad_norm, apply=apply)


def _abandon_backward(ctl: Any) -> bool:
    """Every rank leaves this step's DDP forward without its backward: make DDP stop expecting that backward
    (else the next backward, even under no_sync(), would start the gradient all-reduce on some ranks only).
    A private torch API (the one DDP's own _update_process_group uses), guarded; False when it is missing."""
    if not ctl.communicates:
        return True
    reset = getattr(getattr(ctl.trainer.model, "reducer", None), "_reset_state", None)
    if reset is None:
        return False
    reset()
    return True


def _synced_backward(ctl: Any, att: Attempt, step: int, *, skip: bool) -> float:
    """The last micro-batch's backward (which all-reduces the gradients), unless the step is skipped anyway."""
    if skip and _abandon_backward(ctl):
        return math.nan
    try:
        att.pending.backward()
    except Exception as exc:
        raise TrainingError(
            f"rank {ctl.rank}: the backward pass failed at step {step} during the gradient exchange ({exc!r}); the "
            "other ranks wait in that exchange until the process group's timeout. Lower the micro-batch "
            "(per_device_train_batch_size) or restart from the latest checkpoint", ranks=(ctl.rank,),
            step=step) from exc
    return float(ctl.trainer.clip_gradients())


def _judge(ctl: Any, step: int, loss: float, grad_norm: float, agreed: list[float], *,
           local_bad: bool) -> bool:
    """Apply the optimizer step? Identical on every rank: it depends on agreed flags and global values only."""
    policy = ctl.policy
    non_finite = agreed[NAN_LOSS] > 0 or agreed[NAN_GRAD] > 0 or (ctl.communicates and not math.isfinite(grad_norm))
    spike = agreed[SPIKE] > 0 or (ctl.communicates and ctl.grad_norms.is_spike(grad_norm, policy.grad_norm_spike_factor))
    if non_finite:
        return _non_finite(ctl, step, loss, grad_norm, local_bad, in_loss=agreed[NAN_LOSS] > 0)
    mean_loss = agreed[LOSS] / ctl.world_size
    ctl.nan_streak, ctl.nan_streak_start = 0, None
    ctl.grad_norms.add(grad_norm)  # spikes too: a skipped step leaves the weights, and maybe the norms, as they were
    if spike:
        return _spike(ctl, step, grad_norm, mean_loss)
    ctl.spike_streak, ctl.spike_streak_start, ctl.spike_bad_losses = 0, None, 0
    ctl.losses.add(mean_loss)
    return True


def _spike(ctl: Any, step: int, grad_norm: float, mean_loss: float) -> bool:
    """A gradient-norm spike. With clipping on (max_grad_norm) the clipped step is applied ("clip"), unless the
    loss jumped too on the first spike of a streak; without clipping it is skipped. A streak of max_consecutive_spikes is divergence (divergence_action, from
    its first spike) only when the loss jumped on at least half of them; otherwise the new norm level is
    accepted as the baseline and the streak ends."""
    policy = ctl.policy
    loss_bad = ctl.losses.is_jump(mean_loss)
    ctl.spike_streak += 1
    ctl.spike_bad_losses += int(loss_bad)
    ctl.spike_streak_start = ctl.spike_streak_start if ctl.spike_streak_start is not None else step
    # A spike whose loss jumped may be one bad batch: skip it. If the next step spikes again from the same
    # weights, the batch was not the cause and skipping again cannot help: apply clipped steps from then on.
    clipping = ctl.trainer.args.max_grad_norm is not None
    action = "clip" if clipping and (not loss_bad or ctl.spike_streak > 1) else "skip"
    at_limit = ctl.spike_streak >= policy.max_consecutive_spikes
    diverged = at_limit and 2 * ctl.spike_bad_losses >= ctl.spike_streak
    median = ctl.grad_norms.median()
    values = {"grad_norm": grad_norm, "median": median, "loss": mean_loss, "loss_jumped": loss_bad,
              "streak_start": ctl.spike_streak_start}
    why = (f"gradient norm over {policy.grad_norm_spike_factor:g}x its running median ({ctl.spike_streak} in a "
           f"row, max_consecutive_spikes={policy.max_consecutive_spikes}; the loss jumped on "
           f"{ctl.spike_bad_losses})")
    rebase = at_limit and not diverged
    if rebase:
        ctl.grad_norms.keep_last(ctl.spike_streak)  # the streak's own norms are the new baseline
        values["new_median"] = ctl.grad_norms.median()
        why += "; the loss stayed healthy: the new gradient-norm level is accepted"
    event = RecoveryEvent(ev.GRAD_NORM_SPIKE, step, policy.divergence_action if diverged else action, why,
                          values=values, allowed=("skip", "clip", "warn", *DIVERGENCE_ACTIONS))
    action = ctl.dispatch(event)
    if action in DIVERGENCE_ACTIONS:
        ctl.escalate(action, event, ctl.spike_streak_start)
    elif action != "skip" and not loss_bad:
        ctl.losses.add(mean_loss)
    if rebase:
        ctl.spike_streak, ctl.spike_streak_start, ctl.spike_bad_losses = 0, None, 0
    return action in ("clip", "warn")


def _non_finite(ctl: Any, step: int, loss: float, grad_norm: float, local_bad: bool, *,
                in_loss: bool) -> bool:
    policy = ctl.policy
    ctl.nan_streak += 1
    ctl.nan_streak_start = ctl.nan_streak_start if ctl.nan_streak_start is not None else step
    at_limit = ctl.nan_streak >= policy.max_consecutive_nan
    action = policy.nan_action
    if action in ("skip", "rollback") and not at_limit:
        action = "skip"
    elif action == "skip":
        action = "raise"
    what = "loss" if in_loss else "gradient norm"
    event = RecoveryEvent(
        ev.NON_FINITE, step, action, f"non-finite {what} ({ctl.nan_streak} in a row, "
        f"max_consecutive_nan={policy.max_consecutive_nan})", ranks=ctl.ranks_where(local_bad),
        values={**({"loss": loss} if local_bad else {}), "grad_norm": grad_norm, "streak": ctl.nan_streak,
                "streak_start": ctl.nan_streak_start}, allowed=("warn", "skip", "raise", "rollback"))
    action = ctl.dispatch(event)
    if action == "raise":
        raise RecoveryError(f"non-finite {what} at step {step} on ranks {list(event.ranks) or 'all'} "
                            f"({ctl.nan_streak} in a row; nan_action={policy.nan_action!r}). Lower the learning rate, "
                            "check the data of that step, or set nan_action='rollback'", ranks=event.ranks, step=step)
    if action == "rollback":
        ctl.escalate("rollback", event, ctl.nan_streak_start)
    return action == "warn"


def _out_of_memory(ctl: Any, step: int, micro: int, n: int, here: bool) -> None:
    """Halve the micro-batch on every rank (or raise at 1 sample)."""
    new = max(1, micro // 2)
    event = RecoveryEvent(
        ev.OOM_RETRY, step, "retry" if micro > 1 else "raise",
        f"out of memory with a micro-batch of {micro}", ranks=ctl.ranks_where(here),
        values={"micro_batch_size": micro, "new_micro_batch_size": new, "accumulation_steps": -(-n // new),
                "per_device_batch_size": n}, allowed=("retry", "raise") if micro > 1 else ())
    if ctl.dispatch(event) == "raise":
        raise RecoveryError(f"out of memory at step {step} on ranks {list(event.ranks)} with a micro-batch of {micro} "
                            "sample(s); nothing smaller is left to try. Use a smaller model, shorter sequences or "
                            "more memory per rank", ranks=event.ranks, step=step)
    ctl.micro_batch_size = new


def gate_step(ctl: Any, loss: float, grad_norm: float) -> bool:
    """For a trainer with its own training_step: after backward and clipping, before the optimizer step, agree
    on NaN/Inf and spikes across the ranks; True when the optimizer step should be applied (inside
    `scaled_lr(optimizer, ctl.lr_scale(step))`). `grad_norm` must be the whole model's norm."""
    step = ctl.trainer.state.global_step + 1
    flags = [0.0] * N_FLAGS
    flags[NAN_LOSS], flags[NAN_GRAD] = float(not math.isfinite(loss)), float(not math.isfinite(grad_norm))
    flags[SPIKE] = float(ctl.grad_norms.is_spike(grad_norm, ctl.policy.grad_norm_spike_factor))
    flags[LOSS] = float(loss) if math.isfinite(loss) else 0.0
    agreed = ctl.reduce(flags)
    saved, ctl.communicates = ctl.communicates, False  # the flags above are agreed: judge by them only
    try:
        return _judge(ctl, step, loss, grad_norm, agreed, local_bad=bool(flags[NAN_LOSS] or flags[NAN_GRAD]))
    finally:
        ctl.communicates = saved
