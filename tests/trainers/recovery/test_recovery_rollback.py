"""Where a rollback goes (SimpleTrainer, one process): never into the first bad log window, past a target that
goes bad again at once, to the initial state before the first save, by "best" and "steps_back:N"; the data
skipped after it; giving up when nothing fits; the last good checkpoint pinned from the first suspect value;
and the checkpoints of a stretch that went bad set aside on a "stop"."""

from __future__ import annotations

import os

import pytest
import torch

from ckpt import read_manifest
from ckpt.io.storage import LocalStorage
from tests.support.recovery import DETECTOR, BadLoss, train
from trainers import TrainerCallback
from trainers.divergence import DivergenceDetector
from trainers.recovery import FaultInjection, RecoveryError, RecoveryPolicy, read_events

DIVERGE = {"divergence_step": 25, "divergence_lr_factor": 300}


def rollbacks(run_dir) -> list[dict]:
    return [e["values"] for e in read_events(str(run_dir)) if e["kind"] == "rollback"]


class InfInWeights(TrainerCallback):
    """Writes an Inf into the first weight at the end of `step` (before that step's save), once."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                next(kwargs["model"].parameters()).view(-1)[0] = float("inf")


class Inputs(TrainerCallback):
    """The first input row each training forward pass sees, by step."""

    def __init__(self):
        self.seen: list[tuple[int, tuple[float, ...]]] = []
        self.hooked = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        if not self.hooked:
            kwargs["model"].register_forward_hook(self._hook)
            self.hooked = True

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def _hook(self, module, inputs, output):
        if module.training:
            self.seen.append((self.step, tuple(inputs[0][0].tolist())))


def test_a_checkpoint_inside_the_first_bad_log_window_is_not_a_target(tmp_path):
    # Logs every 4 steps, saves every 2: the LR jumps at step 25, the first bad log line is step 28 (steps
    # 25-28). Checkpoints 26 and 24 hold weights that losses of that bad window were computed on; the last
    # good line (step 24) vouches for the weights of steps 20-23 only.
    policy = RecoveryPolicy(grad_norm_spike_factor=0, detector=DETECTOR)
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE)], logging_steps=4,
                 save_steps=2)
    (rb,) = rollbacks(tmp_path)
    assert rb["first_bad_step"] == 28 and rb["checked_through"] == 23 and rb["to_step"] == 22
    assert t.state.global_step == 40


def test_a_target_that_goes_bad_again_at_once_is_passed_over_for_an_older_one(tmp_path):
    # Checkpoint 8 holds an Inf: the NaN streak (from step 10: step 9's loss happens to stay finite, so step
    # 8's weights look checked) rolls back to 8, which goes bad again before the next save; the second
    # rollback goes to 4 instead of looping on 8 until max_rollbacks.
    policy = RecoveryPolicy(detector=None, lr_ramp_steps=0)
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[InfInWeights(8)], max_steps=16, save_steps=4)
    assert [(rb["to_step"], rb["first_bad_step"]) for rb in rollbacks(tmp_path)] == [(8, 10), (4, 10)]
    assert t.state.global_step == 16
    assert all(torch.isfinite(p).all() for p in t.unwrapped_model.parameters())


def test_before_the_first_save_a_rollback_goes_to_the_initial_state(tmp_path):
    policy = RecoveryPolicy(detector=None)
    t, _ = train(str(tmp_path / "a"), recovery=policy, callbacks=[BadLoss({5, 6, 7})], max_steps=12, save_steps=100)
    (rb,) = rollbacks(tmp_path / "a")
    assert rb["to_step"] == 0 and os.path.basename(rb["to_checkpoint"]) == "checkpoint-00000000"
    assert t.state.global_step == 12
    # Only a policy that can roll back saves the initial state.
    skip, _ = train(str(tmp_path / "b"), recovery=RecoveryPolicy(nan_action="skip", divergence_action="stop",
                                                                  detector=None), max_steps=4, save_steps=100)
    assert [r.step for r in skip.coordinator.checkpoints()] == [4]


def test_rollback_to_best_and_to_steps_back(tmp_path):
    # Saves every 4 steps with an evaluation; the LR jumps at step 25, the detector fires a few lines later.
    common = {"save_steps": 4, "eval_on_save": True, "preserve_best_model": True}
    detector = DETECTOR
    best_policy = RecoveryPolicy(rollback_to="best", grad_norm_spike_factor=0, detector=detector)
    t, _ = train(str(tmp_path / "best"), recovery=best_policy, callbacks=[FaultInjection(**DIVERGE)], **common)
    (rb,) = rollbacks(tmp_path / "best")
    evals = {r.step: read_manifest(LocalStorage(), r.path).metrics.get("eval_loss")
             for r in t.coordinator.checkpoints() if r.step <= rb["to_step"]}
    candidates = {s: v for s, v in evals.items() if isinstance(v, float)}
    assert rb["to_step"] == min(candidates, key=candidates.get) and rb["to_step"] <= rb["checked_through"]
    back_policy = RecoveryPolicy(rollback_to="steps_back:10", grad_norm_spike_factor=0, detector=detector)
    train(str(tmp_path / "back"), recovery=back_policy, callbacks=[FaultInjection(**DIVERGE)], **common)
    (rb,) = rollbacks(tmp_path / "back")
    assert rb["to_step"] == max(s for s in range(0, 41, 4) if s <= rb["from_step"] - 10 and s <= rb["checked_through"])


def test_skip_batches_drops_the_offending_batches_when_the_replay_reaches_them(tmp_path):
    clean = Inputs()
    train(str(tmp_path / "clean"), recovery=RecoveryPolicy(detector=None), callbacks=[clean], max_steps=16,
          save_steps=4)
    batches = dict(clean.seen)  # step -> its batch
    seen = Inputs()
    policy = RecoveryPolicy(detector=None, skip_batches=2)
    train(str(tmp_path / "skip"), recovery=policy, callbacks=[BadLoss({6, 7, 8}), seen], max_steps=12, save_steps=4)
    (rb,) = rollbacks(tmp_path / "skip")
    assert rb["to_step"] == 4 and rb["first_bad_step"] == 6 and rb["skip_at_step"] == 6 and rb["skip_batches"] == 2
    after = [x for _, x in seen.seen[8:]]  # steps 1-8, then the retried steps 5-12 after the rollback
    # Step 5 (good) is replayed; steps 6 and 7's batches are dropped; step 6 gets the batch of step 8.
    assert after == [batches[5]] + [batches[s] for s in range(8, 15)]


class StopAtSecondVisit(TrainerCallback):
    """Stops training the second time `step` ends (after a rollback replayed it)."""

    def __init__(self, step: int):
        self.step, self.visits = step, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.visits += 1
            control.should_training_stop = self.visits == 2


def test_a_pending_skip_survives_a_stop_and_resume_just_before_it(tmp_path):
    # Rolled back to 4 with the skip due at step 6; the run stops after replaying step 5 (its checkpoint holds the
    # pending skip) and a new process resumes: step 6 still gets step 8's batch, as in the uninterrupted run.
    policy = RecoveryPolicy(detector=None, skip_batches=2)
    straight = Inputs()
    train(str(tmp_path / "straight"), recovery=policy, callbacks=[BadLoss({6, 7, 8}), straight], max_steps=12,
          save_steps=4)
    train(str(tmp_path / "split"), recovery=policy, callbacks=[BadLoss({6, 7, 8}), StopAtSecondVisit(5)],
          max_steps=12, save_steps=4)
    resumed = Inputs()
    train(str(tmp_path / "split"), recovery=policy, callbacks=[resumed], max_steps=12, save_steps=4,
          resume_from_checkpoint="latest")
    assert resumed.seen == straight.seen[-len(resumed.seen):] and [s for s, _ in resumed.seen] == list(range(6, 13))


def test_giving_up_when_no_checkpoint_fits(tmp_path):
    policy = RecoveryPolicy(detector=None, rollback_to="steps_back:100")
    with pytest.raises(RecoveryError, match="no committed checkpoint fits rollback_to='steps_back:100'"):
        train(str(tmp_path), recovery=policy, callbacks=[BadLoss({5, 6, 7})], max_steps=12, save_steps=4)
    assert [e["kind"] for e in read_events(str(tmp_path))][-1] == "gave_up"


def test_the_initial_state_that_goes_bad_at_once_ends_the_run_clearly(tmp_path):
    with pytest.raises(RecoveryError, match="went bad again before any save after the rollback to step 0"):
        train(str(tmp_path), recovery=RecoveryPolicy(detector=None), callbacks=[BadLoss({2, 3, 4}, again=True)],
              max_steps=12, save_steps=100)
    assert [rb["to_step"] for rb in rollbacks(tmp_path)] == [0]


def test_the_last_good_checkpoint_is_pinned_from_the_first_suspect_raw_value(tmp_path):
    # The raw value is already bad while the smoothed one is not yet: the suspicion starts there.
    t, _ = train(str(tmp_path), recovery=RecoveryPolicy(detector=DETECTOR), max_steps=4, save_steps=2)
    detector = next(cb for cb in t.callback_handler.callbacks if isinstance(cb, DivergenceDetector))
    detector.raw_bad_since, detector.consecutive = 30, 0
    detector._good(28)  # a good train-loss line at 28 vouches for the weights up to step 27
    assert t.recovery._last_good_bound() == 27
    detector.raw_bad_since = None
    assert t.recovery._last_good_bound() is None
    t.recovery.spike_streak_start = 33  # step 33's loss was computed on step 32's weights
    assert t.recovery._last_good_bound() == 31


def test_a_stop_sets_aside_the_checkpoints_saved_after_the_last_good_observation(tmp_path):
    # patience 4: the bad run (from step 26) spans the save at step 30; "stop" moves it out of reach of a resume
    # from "latest", and the final save at the trigger is marked diverged.
    policy = RecoveryPolicy(divergence_action="stop", grad_norm_spike_factor=0, detector={**DETECTOR, "patience": 4})
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE)])
    steps = [r.step for r in t.coordinator.checkpoints()]
    assert 30 not in steps and steps[-1] == t.state.global_step
    # Set aside as an abandoned timeline, which the retention of the final save then removed (it was not pinned).
    assert os.path.isdir(tmp_path / "abandoned" / f"stop-at-{t.state.global_step}")
    assert not os.path.exists(tmp_path / "checkpoint-00000030")
    assert read_manifest(LocalStorage(), t.coordinator.latest().path).metrics["diverged"] is True
    assert max(s for s in steps if s < t.state.global_step) <= 24
