"""The loop as a user meets it: every hook in order, retention on disk, options that would silently do nothing,
resume targets typed on a command line, saves that fail, the progress bar and the default log line."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    read_manifest,
)
from ckpt.io.storage import LocalStorage
from ckpt.testing import Fault, FaultyStorage
from tests.support.distributed import expect_ok, run_ranks
from tests.support.files import REPO
from tests.support.toys import LossRecorder, Regression, TinyMLP
from trainers import DDPTrainer, SimpleTrainer, TrainerCallback, TrainingArguments
from trainers.callbacks import EVENTS
from trainers.checkpointing import tolerates


def _args(run_dir, **kw) -> TrainingArguments:
    return TrainingArguments(**{"output_dir": str(run_dir), "max_steps": 6, "per_device_train_batch_size": 4,
                                "logging_steps": 2, **kw})


_EVAL = Regression(10, seed=2)


def _simple(run_dir, callbacks=(), eval_dataset: Any = _EVAL, loss_fn=None, **kw) -> SimpleTrainer:
    torch.manual_seed(0)
    return SimpleTrainer(TinyMLP(), _args(run_dir, **kw), train_dataset=Regression(40), eval_dataset=eval_dataset,
                         callbacks=list(callbacks), loss_fn=loss_fn)


def _checkpoints(run_dir) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"checkpoint-\d+", n))


# ---- hooks ------------------------------------------------------------------------------------------------


class EveryHook(TrainerCallback):
    """Records (hook, global_step, reason) for every hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Any]] = []
        self.kwargs_seen: set[str] = set()


def _recording(event: str):
    def hook(self, args, state, control, **kwargs: Any) -> None:
        self.calls.append((event, state.global_step, kwargs.get("reason")))
        self.kwargs_seen |= {k for k in ("trainer", "model", "optimizer", "lr_scheduler") if k in kwargs}

    return hook


for _event in EVENTS:
    setattr(EveryHook, _event, _recording(_event))


def test_every_hook_is_called_in_order(tmp_path):
    def nan_at_step_4(model, batch):
        loss = model(*batch)
        # Step 4 (3 steps done) reports a NaN loss with finite, zero gradients: no recovery policy is set.
        return loss * 0.0 + float("nan") if model.training and trainer.state.global_step == 3 else loss

    hooks = EveryHook()
    trainer = _simple(tmp_path, [hooks], loss_fn=nan_at_step_4, eval_steps=3, save_steps=3)
    trainer.train()
    expected = [("on_train_begin", 0, None)]
    for n in range(1, 7):
        expected += [("on_step_begin", n - 1, None)]
        expected += [("on_instability", 4, "non_finite_loss")] if n == 4 else []
        expected += [("on_step_end", n, None), ("on_step_agreed", n, None)]
        expected += [("on_log", n, None)] if n % 2 == 0 else []
        expected += [("on_evaluate", n, None), ("on_save", n, None)] if n % 3 == 0 else []
    expected += [("on_train_end", 6, None)]
    assert hooks.calls == expected
    assert {e for e, _, _ in hooks.calls} == set(EVENTS)
    assert hooks.kwargs_seen == {"trainer", "model", "optimizer", "lr_scheduler"}


# ---- retention --------------------------------------------------------------------------------------------


def test_without_best_model_only_the_newest_checkpoints_remain(tmp_path):
    _simple(tmp_path, max_steps=10, save_steps=2, save_total_limit=2, preserve_best_model=False).train()
    assert _checkpoints(tmp_path) == ["checkpoint-00000008", "checkpoint-00000010"]


class Opposite(Regression):
    """Evaluation against -y: the better the model fits the training data, the worse its eval_loss."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], -self.y[i]


def test_newest_three_and_the_best_one_remain(tmp_path):
    trainer = _simple(tmp_path, eval_dataset=Opposite(16, seed=3), max_steps=12, save_steps=2, eval_on_save=True,
                      save_total_limit=3, preserve_best_model=True, preserve_n_best=1)
    state = trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in state.log_history if "eval_loss" in e}
    assert sorted(evals) == [2, 4, 6, 8, 10, 12]
    best = min(evals, key=evals.__getitem__)
    assert best not in (8, 10, 12), f"the best checkpoint must be an old one for this test to mean anything: {evals}"
    assert _checkpoints(tmp_path) == [f"checkpoint-{s:08d}" for s in sorted({best, 8, 10, 12})]
    assert [b.step for b in trainer.coordinator.best()] == [best]


# ---- options that would do nothing -------------------------------------------------------------------------


def test_evaluation_options_without_eval_data_are_refused_or_warned(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"eval_steps=3 asks for an evaluation every 3 steps, but the trainer has "
                                         r"no eval_dataset; pass eval_dataset, or set eval_steps=None"):
        _simple(tmp_path / "a", eval_dataset=None, eval_steps=3)
    with pytest.raises(ValueError, match=r"preserve_best_model=True .* no eval_dataset"):
        _simple(tmp_path / "b", eval_dataset=None, save_steps=2, eval_steps=2, preserve_best_model=True)
    with caplog.at_level(logging.WARNING, logger="trainers"):
        _simple(tmp_path / "c", eval_dataset=None, save_steps=3, eval_on_save=True).train()
    assert any("eval_on_save=True, but the trainer has no eval_dataset" in r.getMessage() for r in caplog.records)
    assert _checkpoints(tmp_path / "c") == ["checkpoint-00000003", "checkpoint-00000006"]


def test_a_resume_step_given_as_text_means_that_step(tmp_path):
    _simple(tmp_path, save_steps=3).train()
    recorder = LossRecorder()
    state = _simple(tmp_path, [recorder], save_steps=3, resume_from_checkpoint="3").train()
    assert state.global_step == 6 and [s for s, _ in recorder.losses] == [4, 5, 6]
    with pytest.raises(CheckpointNotFoundError, match=r"no committed checkpoint for step 4 .*committed steps: "
                                                      r"\[3, 6\]"):
        _simple(tmp_path, save_steps=3, resume_from_checkpoint="4").train()


# ---- saves that fail ----------------------------------------------------------------------------------------


class FaultyDisk(SimpleTrainer):
    """SimpleTrainer whose checkpoints go through ckpt.testing's FaultyStorage."""

    faults: tuple[Fault, ...] = ()

    def _build_coordinator(self) -> CheckpointCoordinator:
        self.storage = FaultyStorage(faults=self.faults)
        return CheckpointCoordinator(self.run_dir, storage=self.storage, retention=self.retention,
                                     async_save=self.args.async_save)


def _faulty(run_dir, **kw) -> FaultyDisk:
    FaultyDisk.faults = (Fault(op="write_file", match="checkpoint-00000004", rank=0, error=errno.ENOSPC),)
    torch.manual_seed(0)
    return FaultyDisk(TinyMLP(), _args(run_dir, save_steps=2, **kw), train_dataset=Regression(40))


def test_a_failed_save_raises_by_default(tmp_path):
    trainer = _faulty(tmp_path)
    with pytest.raises(CheckpointError, match="No space left on device"):
        trainer.train()
    assert trainer.state.global_step == 4 and _checkpoints(tmp_path) == ["checkpoint-00000002"]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_is_recorded_and_training_goes_on_with_warn(tmp_path, caplog, async_save):
    trainer = _faulty(tmp_path, on_save_error="warn", async_save=async_save)
    with caplog.at_level(logging.WARNING, logger="trainers"):
        state = trainer.train()
    assert trainer.storage.fired and state.global_step == 6
    assert _checkpoints(tmp_path) == ["checkpoint-00000002", "checkpoint-00000006"]
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]
    read_manifest(LocalStorage(), os.path.join(tmp_path, "checkpoint-00000002"))  # the earlier one is intact
    failed = [e for e in state.log_history if "save_error" in e]
    assert [e["step"] for e in failed] == [4] and "No space left on device" in failed[0]["save_error"]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        recorded = [json.loads(line) for line in f if '"save_error"' in line]
    assert [(r["kind"], r["step"]) for r in recorded] == [("save_error", 4)]
    assert any("save of step 4 failed on every rank; training goes on" in r.getMessage() for r in caplog.records)


def _ddp_disk_full(rank: int, world: int, run_dir: str) -> dict:
    class FaultyDDP(DDPTrainer):
        def _build_coordinator(self) -> CheckpointCoordinator:
            self.storage = FaultyStorage(faults=[Fault(op="write_file", match="checkpoint-00000004", rank=1,
                                                       error=errno.ENOSPC)])
            return CheckpointCoordinator(self.run_dir, storage=self.storage, retention=self.retention)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = FaultyDDP(TinyMLP(), _args(run_dir, save_steps=2, on_save_error="warn"), train_dataset=Regression(40))
    state = trainer.train()
    return {"step": state.global_step, "fired": list(trainer.storage.fired),
            "failed": [e for e in state.log_history if "save_error" in e],
            "checkpoints": [r.step for r in trainer.coordinator.checkpoints()]}


def test_a_disk_full_on_one_rank_fails_the_save_on_every_rank_and_training_goes_on(tmp_path):
    results = expect_ok(run_ranks(2, _ddp_disk_full, str(tmp_path)))
    assert results[0]["fired"] == [] and results[1]["fired"]  # only rank 1's disk was full
    for r in results:
        assert r["step"] == 6 and r["checkpoints"] == [2, 6]
        assert [e["step"] for e in r["failed"]] == [4] and "rank" in r["failed"][0]["save_error"]
    read_manifest(LocalStorage(), os.path.join(tmp_path, "checkpoint-00000002"))


def test_warn_never_swallows_a_timeout_or_a_coordinator_that_refuses_further_use(tmp_path):
    coord = CheckpointCoordinator(str(tmp_path))
    assert tolerates("warn", CheckpointError("disk full"), coord)
    assert not tolerates("raise", CheckpointError("disk full"), coord)
    assert not tolerates("warn", CollectiveTimeoutError("timed out", phase="write"), coord)
    coord.close()
    assert not coord.usable and not tolerates("warn", CheckpointError("disk full"), coord)


# ---- what the user sees -------------------------------------------------------------------------------------


def test_the_progress_bar_on_stderr(tmp_path, capsys):
    _simple(tmp_path, max_steps=4, progress_bar=True).train()
    err = capsys.readouterr().err
    assert "\r[" + "#" * 7 + "." * 23 + "] 1/4 loss " in err
    assert "\r[" + "#" * 30 + "] 4/4 loss " in err and err.endswith("\n")
    _simple(tmp_path / "quiet", max_steps=4, progress_bar=False).train()
    assert "/4" not in capsys.readouterr().err


_SCRIPT = """
import logging, sys, torch
sys.path.insert(0, {root!r})
from tests.support.toys import Regression, TinyMLP
from trainers import SimpleTrainer, TrainingArguments

def train(run_dir):
    args = TrainingArguments(output_dir=run_dir, max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             progress_bar=False)
    SimpleTrainer(TinyMLP(), args, train_dataset=Regression(40)).train()

train(sys.argv[1] + "/unconfigured")
logging.basicConfig(level=logging.INFO, format="configured %(name)s: %(message)s")
train(sys.argv[1] + "/configured")
logging.getLogger().setLevel(logging.WARNING)  # the user's level now rules the trainer's lines too
train(sys.argv[1] + "/quiet")
"""


def test_the_log_line_is_shown_without_logging_configured_and_only_once_with_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT.format(root=REPO))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "train step" in line]
    # Nothing configured: the trainer's own stderr handler shows the line. Configured (even after the first
    # trainer attached that handler): the user's handler shows it, and only once; at WARNING, not at all.
    assert [line.startswith("configured ") for line in lines] == [False, False, True, True], lines
    pattern = (r"trainers: train step 2/4 \| epoch [\d.]+ \| loss \d+\.\d{4} \| lr \d\.\d{3}e-\d\d \| "
               r"grad_norm \d+\.\d{4} \| tokens_seen \d+ \| tokens/s [\d,]+\.\d \| steps/s [\d,]+\.\d")
    assert re.search(pattern, lines[0]) and re.search(pattern, lines[2]), lines
