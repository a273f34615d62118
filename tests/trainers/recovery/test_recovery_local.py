"""Recovery in one process (SimpleTrainer): rollback with an LR cut and ramp, spikes, NaN actions, OOM retry,
give-up, callbacks changing the action, resume mid-ramp, and diverged weights kept out of "best"."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from ckpt import read_manifest
from ckpt.io.storage import LocalStorage
from tests.support.recovery import DETECTOR, BadLoss, Instability, SendSignal, logged, train
from tests.support.toys import plain, warmup_then_decay
from trainers import TrainerCallback
from trainers.recovery import FaultInjection, RecoveryError, RecoveryPolicy, read_events

DIVERGE = {"divergence_step": 25, "divergence_lr_factor": 300}


def kinds(run_dir) -> list[tuple[int, str, str]]:
    return [(e["step"], e["kind"], e["action"]) for e in read_events(str(run_dir))]


def test_divergence_rolls_back_to_the_last_good_checkpoint_and_ramps_the_lr_back(tmp_path):
    # patience 4: the bad streak (from step 26) spans the save at step 30, which with save_total_limit=1 would
    # delete checkpoint 20, the last good one, unless it is pinned.
    policy = RecoveryPolicy(lr_ramp_steps=10, grad_norm_spike_factor=0, detector={**DETECTOR, "patience": 4})
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE)], save_total_limit=1)
    assert t.state.global_step == 40 and t.recovery.rollbacks == 1
    assert kinds(tmp_path) == [(32, "divergence", "rollback"), (32, "rollback", "rollback"), (20, "lr_change", "scale")]
    rollback = read_events(str(tmp_path))[1]["values"]
    assert rollback["first_bad_step"] == 26 and rollback["to_step"] == 20 and rollback["from_step"] == 32
    # The suspect checkpoint (30) is set aside; nothing pinned is left behind.
    assert [os.path.basename(p) for p in rollback["set_aside"]] == ["checkpoint-00000030"]
    assert rollback["set_aside"][0] == os.path.join(tmp_path, "abandoned", "rollback-1-at-32", "checkpoint-00000030")
    assert not os.path.exists(rollback["set_aside"][0]), "an abandoned checkpoint goes with retention (not pinned)"
    assert [r.step for r in t.coordinator.checkpoints()] == [20, 40]
    assert not any(os.path.exists(os.path.join(r.path, "PINNED")) for r in t.coordinator.checkpoints())
    # The logged LR: x0.5 after the rollback, back to the schedule linearly over 10 steps.
    scale = logged(t, "lr_scale")
    assert [scale[s] for s in (20, 22, 24, 26, 28, 30, 32)] == pytest.approx([1.0, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0])
    lr, schedule = logged(t, "lr"), warmup_then_decay(40)(torch.optim.SGD([torch.zeros(1)], lr=1.0)).lr_lambdas[0]
    for step in range(20, 41, 2):  # the logged value is what the next step uses: schedule x cut
        assert lr[step] == pytest.approx(3e-2 * schedule(step) * scale[step])
    assert all(math.isfinite(v) and v < 3.0 for s, v in logged(t, "loss").items() if s > 32)


def test_a_run_of_gradient_spikes_counts_as_divergence(tmp_path):
    policy = RecoveryPolicy(lr_ramp_steps=10, max_consecutive_spikes=4, detector=None)
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE)])
    events = kinds(tmp_path)
    spikes = [e for e in events if e[1] == "grad_norm_spike"]
    # The first spike (its loss jumped) is skipped; the next ones come from the same weights, so skipping
    # cannot help: they are applied clipped, until the streak with its jumped losses counts as divergence.
    assert [a for _, _, a in spikes] == ["skip", "clip", "clip", "rollback"]
    assert ("rollback" in {k for _, k, _ in events}) and t.state.global_step == 40
    assert read_events(str(tmp_path))[len(spikes)]["values"]["to_step"] == 20


def test_one_nan_step_is_skipped_and_changes_nothing(tmp_path):
    before = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 6:
                before["model"] = plain(kwargs["model"].state_dict())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                before["skipped"] = kwargs["loss"], plain(kwargs["model"].state_dict())

    t, _rec = train(str(tmp_path), recovery=RecoveryPolicy(detector=None), callbacks=[BadLoss({7}), Snapshot()],
                   max_steps=12)
    assert math.isnan(before["skipped"][0]) and before["skipped"][1] == before["model"]
    assert kinds(tmp_path) == [(7, "non_finite", "skip")]
    assert t.optimizer.state[next(iter(t.optimizer.state))]["step"] == 11  # 12 steps, one skipped
    assert 8 not in logged(t, "loss") or math.isfinite(logged(t, "loss")[8])


def test_nan_streaks_escalate_by_nan_action(tmp_path):
    streak = {5, 6, 7}
    policy = RecoveryPolicy(max_consecutive_nan=3, detector=None, lr_ramp_steps=0)
    # From step 6: step 5's loss vouches for the weights of step 4 (checkpoint 4), the rollback target.
    t, _ = train(str(tmp_path / "rollback"), recovery=policy, callbacks=[BadLoss({6, 7, 8})], max_steps=12,
                 save_steps=4)
    assert kinds(tmp_path / "rollback")[:4] == [(6, "non_finite", "skip"), (7, "non_finite", "skip"),
                                              (8, "non_finite", "rollback"), (8, "rollback", "rollback")]
    assert read_events(str(tmp_path / "rollback"))[3]["values"]["to_step"] == 4 and t.state.global_step == 12
    assert logged(t, "lr_scale")[12] == 0.5  # lr_ramp_steps=0: the cut stays
    with pytest.raises(RecoveryError, match="non-finite loss at step 5"):
        train(str(tmp_path / "raise"), recovery=RecoveryPolicy(nan_action="raise", detector=None),
              callbacks=[BadLoss(streak)], max_steps=12)
    with pytest.raises(RecoveryError, match=r"at step 7 .*3 in a row"):
        train(str(tmp_path / "skip"), recovery=RecoveryPolicy(nan_action="skip", detector=None),
              callbacks=[BadLoss(streak)], max_steps=12)
    warned, _ = train(str(tmp_path / "warn"), recovery=RecoveryPolicy(nan_action="warn", detector=None),
                      callbacks=[BadLoss({5})], max_steps=8)
    assert all(torch.isnan(p).all() for p in warned.unwrapped_model.parameters())  # applied, as asked


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_global_batch(tmp_path):
    t, _ = train(str(tmp_path / "a"), recovery=RecoveryPolicy(detector=None),
                 callbacks=[FaultInjection(oom_step=5)], batch=8, max_steps=10)
    assert kinds(tmp_path / "a") == [(5, "oom_retry", "retry")]
    assert logged(t, "micro_batch_size") == {2: 8, 4: 8, 6: 4, 8: 4, 10: 4}
    assert set(logged(t, "global_batch_size").values()) == {8}
    assert t.recovery.micro_batch_size == 4
    with pytest.raises(RecoveryError, match="micro-batch of 1 sample"):
        train(str(tmp_path / "b"), recovery=RecoveryPolicy(detector=None), callbacks=[BadLoss({3}, oom=True, again=True)],
              batch=8, max_steps=6)
    assert [e["values"]["new_micro_batch_size"] for e in read_events(str(tmp_path / "b"))] == [4, 2, 1, 1]


def test_micro_batches_give_the_same_update_as_one_batch(tmp_path):
    # No dropout randomness differs between the runs: compare one step of a model without dropout.
    from tests.support.toys import Regression
    from trainers import SimpleTrainer, TrainingArguments

    finals = []
    for micro in (None, 3):
        args = TrainingArguments(output_dir=str(tmp_path / str(micro)), max_steps=3, per_device_train_batch_size=8,
                                 recovery=RecoveryPolicy(detector=None), seed=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 1))
        t = SimpleTrainer(model, args, train_dataset=Regression(40),
                          loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        t.recovery.micro_batch_size = micro
        t.train()
        finals.append(model[0].weight.detach().clone())
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


def test_max_rollbacks_then_a_clear_error(tmp_path):
    policy = RecoveryPolicy(max_rollbacks=0, grad_norm_spike_factor=0, detector=DETECTOR)
    with pytest.raises(RecoveryError, match="max_rollbacks=0 is reached"):
        train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE)])
    assert kinds(tmp_path)[-1][1:] == ("gave_up", "stop")


def test_on_instability_sees_every_event_and_may_change_the_action(tmp_path):
    watcher = Instability(set_action=("divergence", "abort"))
    policy = RecoveryPolicy(grad_norm_spike_factor=0, detector=DETECTOR)
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE), BadLoss({5}), watcher])
    assert watcher.seen == [("non_finite", 5, "skip"), ("divergence", 28, "rollback")]  # as each arrived
    assert kinds(tmp_path) == [(5, "non_finite", "skip"), (28, "divergence", "abort")]
    assert t.state.global_step == 28 and t.recovery.rollbacks == 0
    assert max(r.step for r in t.coordinator.checkpoints()) == 20  # aborted: nothing diverged was saved


def test_rollbacks_lr_changes_and_signal_saves_reach_the_callbacks_too(tmp_path):
    watcher = Instability()
    policy = RecoveryPolicy(grad_norm_spike_factor=0, detector=DETECTOR)
    t, _ = train(str(tmp_path), recovery=policy, max_steps=36,
                 callbacks=[FaultInjection(**DIVERGE), SendSignal(33, sig=signal.SIGUSR1), watcher])
    assert [k for k, _, _ in watcher.seen] == ["divergence", "rollback", "lr_change", "emergency_save"]
    assert t.state.global_step == 33 and t.coordinator.latest().step == 33  # SIGUSR1: saved, stopped


def test_diverged_weights_are_never_best_and_never_overwrite(tmp_path):
    policy = RecoveryPolicy(divergence_action="stop", grad_norm_spike_factor=0, detector=DETECTOR)
    t, _ = train(str(tmp_path), recovery=policy, callbacks=[FaultInjection(**DIVERGE)], eval_on_save=True,
                 save_total_limit=1, preserve_best_model=True)
    last = t.coordinator.latest()
    assert last.step == t.state.global_step > 25
    metrics = read_manifest(LocalStorage(), last.path).metrics
    assert metrics["diverged"] is True and metrics["eval_loss"] == "nan" and "diverged_eval_loss" in metrics
    assert all(b.step < 25 for b in t.coordinator.best())
    # Without a recovery policy the detector's "stop" marks the save the same way.
    from trainers.divergence import DivergenceDetector

    plain_run, _ = train(str(tmp_path / "plain"), recovery=None, eval_on_save=True, preserve_best_model=True,
                         save_total_limit=1,
                         callbacks=[FaultInjection(**DIVERGE), DivergenceDetector(**DETECTOR, action="stop")])
    metrics = read_manifest(LocalStorage(), plain_run.coordinator.latest().path).metrics
    assert metrics["diverged"] is True and all(b.step < 25 for b in plain_run.coordinator.best())


class StopAfterRollback(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if kwargs["trainer"].recovery.rollbacks and state.global_step >= self.step:
            control.should_training_stop = True


def test_a_resume_mid_ramp_continues_the_ramp_exactly(tmp_path):
    policy = RecoveryPolicy(lr_ramp_steps=10, grad_norm_spike_factor=0, detector=DETECTOR)
    straight, rec = train(str(tmp_path / "a"), recovery=policy, callbacks=[FaultInjection(**DIVERGE)])
    first, _rec1 = train(str(tmp_path / "b"), recovery=policy,
                        callbacks=[FaultInjection(**DIVERGE), StopAfterRollback(26)])
    assert first.state.global_step == 26 and first.recovery.ramp.start_step == 20
    resumed, rec2 = train(str(tmp_path / "b"), recovery=policy, callbacks=[FaultInjection(**DIVERGE)],
                          resume_from_checkpoint="latest")
    assert resumed.recovery.rollbacks == straight.recovery.rollbacks == 1
    assert plain(resumed.unwrapped_model.state_dict()) == plain(straight.unwrapped_model.state_dict())
    assert resumed.state.log_history == straight.state.log_history
    assert rec2.losses == [x for x in rec.losses[-14:]]
