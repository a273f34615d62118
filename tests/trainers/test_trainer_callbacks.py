"""Callbacks: saved by stable name, restored on resume, and steering the loop through control flags."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest
import torch

from ckpt import CheckpointError, SharingPattern, StateComponent, read_manifest
from tests.support.toys import Counter, LossRecorder, Regression, TinyMLP
from trainers import SimpleTrainer, TrainerCallback, TrainingArguments, TrainingError


def _trainer(run_dir, callbacks, **kw) -> SimpleTrainer:
    args = TrainingArguments(**{"output_dir": str(run_dir), "max_steps": 12, "per_device_train_batch_size": 4,
                                "logging_steps": 4, "save_steps": 6, **kw})
    torch.manual_seed(0)
    return SimpleTrainer(TinyMLP(), args, train_dataset=Regression(40), eval_dataset=Regression(10, seed=2),
                         callbacks=callbacks)


class Noted(TrainerCallback):
    """Stateful, PER_RANK, and named by its class."""

    sharing_pattern = SharingPattern.PER_RANK

    def __init__(self) -> None:
        self.notes: list[str] = []

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        self.notes.append(f"saved {state.global_step}")

    def state_dict(self) -> dict[str, Any]:
        return {"notes": list(self.notes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.notes = list(state["notes"])


def _read(path: str) -> Any:
    return read_manifest(_storage(), path)


def _storage():
    from ckpt.io.storage import LocalStorage  # the tests may look inside; the trainers may not

    return LocalStorage()


def test_callback_state_round_trips_and_is_restored_by_name_not_position(tmp_path):
    a, b, noted = Counter("fast"), Counter("slow"), Noted()
    first = _trainer(tmp_path, [a, LossRecorder(), b, noted], max_steps=6)
    first.train()
    b.steps = 100  # make the two counters tell apart
    first.save_checkpoint()  # overwrite step 6 with the changed counter
    manifest = _read(os.path.join(tmp_path, "checkpoint-00000006"))
    assert {"callback.fast", "callback.slow", "callback.Noted"} <= set(manifest.components)
    assert "callback.LossRecorder" not in manifest.components  # not stateful: not saved
    assert manifest.components["callback.Noted"].pattern is SharingPattern.PER_RANK
    assert manifest.components["callback.fast"].pattern is SharingPattern.GLOBAL

    # Resume with the list in another order and new objects: each gets its own state back by name.
    a2, b2, noted2 = Counter("fast"), Counter("slow"), Noted()
    resumed = _trainer(tmp_path, [noted2, b2, a2], max_steps=12, resume_from_checkpoint="latest")
    resumed.train()
    assert a2.steps == 12 and b2.steps == 106
    assert a2.seen[:6] == a.seen and len(a2.seen) == 12
    assert noted2.notes == ["saved 6", "saved 12"]  # the note of a save is made after it is written


def test_two_stateful_callbacks_of_one_class_need_state_keys(tmp_path):
    with pytest.raises(ValueError, match=r"both be saved as 'callback.Counter'.*state_key"):
        _trainer(tmp_path, [Counter(), Counter()])
    with pytest.raises(TypeError, match="pass an instance, Counter"):
        _trainer(tmp_path, [Counter])


def test_a_callback_added_after_the_checkpoint_starts_fresh_with_a_warning(tmp_path, caplog):
    _trainer(tmp_path, [], max_steps=6).train()
    late = Counter()
    with caplog.at_level(logging.WARNING, logger="trainers"):
        _trainer(tmp_path, [late], max_steps=8, resume_from_checkpoint="latest").train()
    assert late.steps == 2
    assert any("no state for callbacks ['Counter']" in r.getMessage() and "start fresh" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_removed_stateful_callback_is_ignored_with_a_warning(tmp_path, caplog):
    _trainer(tmp_path, [Counter(), Noted(), Counter("slow")], max_steps=6).train()
    kept = Counter("slow")
    with caplog.at_level(logging.WARNING, logger="trainers"):
        state = _trainer(tmp_path, [kept], max_steps=12, resume_from_checkpoint="latest").train()
    assert state.global_step == 12 and kept.steps == 12  # the callback still there got its state back
    warned = [r.getMessage() for r in caplog.records if "does not have" in r.getMessage()]
    assert len(warned) == 1 and "callbacks ['Counter', 'Noted']" in warned[0], caplog.text
    assert "callback.Counter" not in _read(os.path.join(tmp_path, "checkpoint-00000012")).components


class WithExtra(SimpleTrainer):
    """Saves one more component than SimpleTrainer."""

    def get_state_components(self) -> list[StateComponent]:
        return [*super().get_state_components(), StateComponent("extra", Counter(), SharingPattern.GLOBAL)]


def test_other_components_the_run_does_not_have_still_fail_the_resume(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4)
    WithExtra(TinyMLP(), args, train_dataset=Regression(40)).train()
    resumed = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match=r"holds components \['extra'\] that no rank passed to load"):
        SimpleTrainer(TinyMLP(), resumed, train_dataset=Regression(40)).train()


class Steer(TrainerCallback):
    """Asks for a save at step 3, an evaluation at step 5, and a stop once it sees an evaluation at 8."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        control.should_save = state.global_step == 3
        control.should_evaluate = state.global_step == 5

    def on_evaluate(self, args, state, control, **kwargs: Any) -> None:
        self.events.append(("evaluate", state.global_step))
        if state.global_step == 8:
            control.should_training_stop = True  # early stopping, decided after an evaluation

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self.events.append(("end", state.global_step))


def test_control_flags_steer_the_loop(tmp_path):
    steer = Steer()
    state = _trainer(tmp_path, [steer], max_steps=20, eval_steps=4, save_steps=None).train()
    assert steer.events == [("save", 3), ("evaluate", 4), ("evaluate", 5), ("evaluate", 8), ("save", 8), ("end", 8)]
    assert state.global_step == 8
    assert [e["step"] for e in state.log_history if "loss" in e] == [4, 8]


class Abort(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        control.should_abort_without_save = state.global_step == 5


def test_abort_without_save_writes_nothing_more(tmp_path):
    recorder = LossRecorder()
    state = _trainer(tmp_path, [Abort(), recorder], max_steps=20, save_steps=4).train()
    assert state.global_step == 5 and recorder.saves == [4]


class Broken(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if state.global_step == 2:
            raise KeyError("boom")


def test_a_failing_callback_fails_the_step_with_the_rank(tmp_path):
    with pytest.raises(TrainingError, match=r"a callback failed at step 2 on ranks \[0\]") as info:
        _trainer(tmp_path, [Broken()]).train()
    assert info.value.ranks == (0,) and isinstance(info.value.__cause__, KeyError)


def test_logging_and_metrics_file(tmp_path):
    state = _trainer(tmp_path, [], max_steps=12, eval_steps=6).train()
    train = [e for e in state.log_history if "loss" in e]
    assert [e["step"] for e in train] == [4, 8, 12]
    assert set(train[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_seen"}
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [(x["kind"], x["step"]) for x in lines] == [("train", 4), ("eval", 6), ("checkpoint", 6), ("train", 8),
                                                       ("train", 12), ("eval", 12), ("checkpoint", 12)]
    assert [x["checkpoint"] for x in lines if x["kind"] == "checkpoint"] == ["checkpoint-00000006",
                                                                              "checkpoint-00000012"]
    assert lines[0]["tokens_per_s"] > 0 and lines[0]["loss"] == train[0]["loss"]


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path):
    _trainer(tmp_path, [], max_steps=6).train()
    with pytest.raises(ValueError, match=r"already holds checkpoints .*resume_from_checkpoint='latest'"):
        _trainer(tmp_path, []).train()


class Agreed(TrainerCallback):
    """Records on_step_agreed; raises KeyError at `fail_at`."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.seen: list[tuple[int, float, bool]] = []
        self.fail_at = fail_at

    def on_step_agreed(self, args, state, control, **kwargs: Any) -> None:
        self.seen.append((state.global_step, kwargs["loss"], kwargs["skipped"]))
        if state.global_step == self.fail_at:
            raise KeyError("agreed boom")


def test_on_step_agreed_sees_every_steps_agreed_loss(tmp_path):
    agreed, recorder = Agreed(), LossRecorder()
    _trainer(tmp_path, [agreed, recorder]).train()
    assert [s for s, _, _ in agreed.seen] == list(range(1, 13))
    assert [loss for _, loss, _ in agreed.seen] == [loss for _, loss in recorder.losses]  # one rank: its own loss
    assert not any(skipped for _, _, skipped in agreed.seen)


@pytest.mark.parametrize("fail_at", [2, 12])
def test_a_failing_on_step_agreed_fails_the_run_at_the_next_agreement(tmp_path, fail_at):
    agreed = Agreed(fail_at=fail_at)
    with pytest.raises(TrainingError, match="failed at step") as info:
        _trainer(tmp_path, [agreed]).train()
    assert info.value.ranks == (0,) and isinstance(info.value.__cause__, KeyError)
    assert agreed.seen[-1][0] == fail_at  # the next agreement raised it: no later step was agreed on
