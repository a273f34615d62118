"""Resume in one process: from "latest", a step, or a path; a fresh start when there is nothing to resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ckpt import CheckpointNotFoundError
from tests.support.toys import LossRecorder, Regression, TinyMLP, plain, warmup_then_decay
from trainers import SimpleTrainer, TrainingArguments


def _train(run_dir, resume=None, max_steps=12) -> tuple[SimpleTrainer, LossRecorder]:
    args = TrainingArguments(output_dir=str(run_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             logging_steps=5, save_steps=4, seed=1, resume_from_checkpoint=resume)
    torch.manual_seed(0)
    recorder = LossRecorder()
    trainer = SimpleTrainer(TinyMLP(), args, train_dataset=Regression(30), callbacks=[recorder],
                            lr_scheduler_factory=warmup_then_decay(max_steps))
    trainer.train()
    return trainer, recorder


def test_resume_from_a_step_or_a_path_replays_the_same_run(tmp_path):
    reference, ref_losses = _train(tmp_path / "a")
    final = plain(reference.unwrapped_model.state_dict())
    history = reference.state.log_history
    from_step, losses = _train(tmp_path / "a", resume=4)  # an older checkpoint: 8 and 12 are replaced
    assert plain(from_step.unwrapped_model.state_dict()) == final and from_step.state.log_history == history
    assert losses.losses == ref_losses.losses[4:]
    from_path, losses = _train(tmp_path / "a", resume=os.path.join(tmp_path, "a", "checkpoint-00000008"))
    assert plain(from_path.unwrapped_model.state_dict()) == final and losses.losses == ref_losses.losses[8:]
    # metrics.jsonl drops what the abandoned runs logged past the resume point: no step appears twice.
    with open(os.path.join(tmp_path, "a", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [x["step"] for x in logged if x["kind"] == "train"] == [5, 10, 12]


def test_latest_in_an_empty_run_dir_starts_fresh_and_a_missing_step_is_an_error(tmp_path):
    fresh, _ = _train(tmp_path / "b", resume="latest", max_steps=4)
    reference, _ = _train(tmp_path / "c", max_steps=4)
    assert plain(fresh.unwrapped_model.state_dict()) == plain(reference.unwrapped_model.state_dict())
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint for step 3"):
        _train(tmp_path / "b", resume=3)


def test_a_finished_run_resumed_does_nothing_more(tmp_path):
    _train(tmp_path / "d", max_steps=8)
    again, recorder = _train(tmp_path / "d", resume="latest", max_steps=8)
    assert again.state.global_step == 8 and recorder.losses == [] and recorder.saves == []
