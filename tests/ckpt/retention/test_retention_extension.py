"""Retention open to user rules (RetentionPolicy(extra_rules=...)), and Hugging Face's option names
(metric_for_best_model, greater_is_better) in RetentionPolicy, TrainingArguments and `ckpt ls/prune`."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt import CheckpointCoordinator, CheckpointInfo, RetentionPolicy, SharingPattern, StateComponent
from ckpt.cli import main
from trainers import TrainingArguments


def _infos(*steps: int) -> list[CheckpointInfo]:
    return [CheckpointInfo(step=s, path=f"run/checkpoint-{s}", metrics={"eval_loss": 1.0 / s}) for s in steps]


class KeepOdd:
    def keep_reasons(self, checkpoints):
        return {c.path: "odd step" for c in checkpoints if c.step % 2}


def test_rule_classes_are_public():
    for name in ("RetentionRule", "KeepLatest", "KeepBest", "KeepEveryNSteps"):
        assert name in ckpt.__all__ and hasattr(ckpt, name)
    assert isinstance(KeepOdd(), ckpt.RetentionRule)


def test_a_user_rule_keeps_checkpoints_next_to_the_built_in_ones():
    decision = RetentionPolicy(save_total_limit=1, extra_rules=[KeepOdd()]).decide(_infos(1, 2, 3, 4, 6))
    kept = {c.step: c.reasons for c in decision.kept}
    assert kept == {1: ("odd step",), 3: ("odd step",), 6: ("latest",)}
    dropped = {c.step: c.drop_reason for c in decision.dropped}
    assert dropped[2] == "not the newest, kept by no extra rule"


def test_a_rule_without_keep_reasons_is_refused():
    with pytest.raises(ValueError, match=r"extra_rules holds 'newest'.*keep_reasons"):
        RetentionPolicy(extra_rules=["newest"])


def test_extra_rules_are_not_recorded_in_the_policy_file():
    policy = RetentionPolicy(save_total_limit=2, extra_rules=[KeepOdd()])
    assert "extra_rules" not in policy.to_plain()
    assert RetentionPolicy.from_plain(policy.to_plain()) == RetentionPolicy(save_total_limit=2)


def test_hugging_face_names_mean_the_same_policy():
    ours = RetentionPolicy(preserve_n_best=1, best_model_metric="eval_acc", best_model_greater_is_better=True)
    hf = RetentionPolicy(preserve_n_best=1, metric_for_best_model="eval_acc", greater_is_better=True)
    assert ours == hf and ours.to_plain() == hf.to_plain()
    assert hf.best_model_metric == "eval_acc" and ours.metric_for_best_model == "eval_acc"
    assert RetentionPolicy.from_plain({"metric_for_best_model": "eval_loss"}).best_model_metric == "eval_loss"


def test_the_direction_is_resolved_once_at_construction():
    policy = RetentionPolicy(preserve_n_best=1, metric_for_best_model="eval_loss")
    assert policy.greater_is_better is False and policy.best_model_greater_is_better is None
    assert RetentionPolicy(best_model_metric="eval_f1").greater_is_better is True


@pytest.mark.parametrize("kwargs, names", [
    ({"best_model_metric": "eval_loss", "metric_for_best_model": "eval_acc"}, "best_model_metric='eval_loss' and "
                                                                              "metric_for_best_model='eval_acc'"),
    ({"best_model_metric": "eval_loss", "best_model_greater_is_better": False, "greater_is_better": True},
     "best_model_greater_is_better=False and greater_is_better=True"),
])
def test_a_name_and_its_alias_with_different_values_are_an_error(kwargs, names):
    with pytest.raises(ValueError, match="RetentionPolicy: " + names + " name the same option"):
        RetentionPolicy(**kwargs)


def test_training_arguments_accept_the_hugging_face_names(tmp_path):
    hf = TrainingArguments(output_dir=str(tmp_path), max_steps=1, metric_for_best_model="accuracy",
                           greater_is_better=True)
    assert hf.best_model_metric == "accuracy" and hf.metric_key == "eval_accuracy"
    assert hf.best_model_greater_is_better is True
    plain = TrainingArguments(output_dir=str(tmp_path), max_steps=1)
    assert plain.metric_for_best_model == "loss" and plain.greater_is_better is False  # inferred once
    same = TrainingArguments(output_dir=str(tmp_path), max_steps=1, best_model_metric="eval_f1",
                             metric_for_best_model="f1")
    assert same.best_model_metric == "f1"
    with pytest.raises(ValueError, match="best_model_metric='f1' and metric_for_best_model='bleu'"):
        TrainingArguments(output_dir=str(tmp_path), max_steps=1, best_model_metric="f1", metric_for_best_model="bleu")
    with pytest.raises(ValueError, match="best_model_greater_is_better=True and greater_is_better=False"):
        TrainingArguments(output_dir=str(tmp_path), max_steps=1, best_model_greater_is_better=True,
                          greater_is_better=False)


def test_ckpt_ls_takes_metric_for_best_model(tmp_path, capsys):
    run = str(tmp_path / "run")
    model = torch.nn.Linear(2, 1)
    coord = CheckpointCoordinator(run)
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        coord.save(step=step, components=[StateComponent("model", model, SharingPattern.REPLICATED)],
                   metrics={"eval_loss": loss})
    coord.close()
    views = []
    for flag in ("--metric", "--metric-for-best-model"):
        assert main(["ls", run, "--json", "--save-total-limit", "1", "--preserve-n-best", "1", flag, "eval_loss"]) == 0
        views.append(json.loads(capsys.readouterr().out))
    assert views[0] == views[1]
    assert [b["step"] for b in views[1]["best"]] == [2]
