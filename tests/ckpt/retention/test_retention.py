"""Retention with real saves: newest K plus best N by a metric, every-N, pins, crashes and resumes."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointInfo,
    RetentionPolicy,
    SharingPattern,
    StateComponent,
    pin_checkpoint,
    unpin_checkpoint,
)
from ckpt.format.manifest import plain_metrics
from ckpt.io.storage import LocalStorage
from ckpt.retention.catalog import POLICY_NAME, hold, read_policy, scan
from ckpt.retention.rules import infer_greater_is_better, metric_value
from tests.support.files import REPO
from tests.support.workers import Box

NAN, INF = float("nan"), float("inf")


def _components(step: int) -> list[StateComponent]:
    return [StateComponent("model", Box({"w": torch.full((2, 2), float(step))}), SharingPattern.REPLICATED)]


def _save_all(coord: CheckpointCoordinator, metrics: list[dict | None], first_step: int = 1, every: int = 1):
    for i, m in enumerate(metrics):
        step = first_step + i * every
        coord.save(step, _components(step), m)


def _steps_on_disk(run_dir) -> list[int]:
    return [c.step for c in scan(LocalStorage(), str(run_dir))]


def _oracle(history: dict[int, float | None], limit: int, n: int, greater: bool, every: int | None = None,
            extra: set[int] = frozenset()) -> list[int]:
    """What the issue's rules say survives, computed independently of ckpt.retention.rules."""
    steps = sorted(history)
    keep = set(steps[-limit:]) | set(extra)
    scored = [((-v if greater else v), s) for s, v in history.items() if v is not None and math.isfinite(v)]
    keep |= {s for _, s in sorted(scored)[:n]}
    if every:
        keep |= {s for s in steps if s % every == 0}
    return sorted(keep)


@pytest.mark.parametrize("name,expected", [
    ("eval_loss", False), ("loss", False), ("trainLoss", False), ("val/error_rate", False), ("perplexity", False),
    ("ppl", False), ("eval_wer", False), ("cer", False), ("mse", False), ("val_mae", False), ("rmse", False),
    ("eval_accuracy", True), ("top1_acc", True), ("f1", True), ("precision", True), ("recall", True),
    ("auc", True), ("bleu", True), ("rouge1", True), ("map50", True), ("eval_score", True),
    ("mAP", True), ("eval_mAP", True), ("mAP50", True), ("val/mAP@0.5", True), ("bitmapSize", None),
    ("throughput", None), ("accumulated_steps", None), ("loss_score", None), ("bitmap_size", None),
])
def test_metric_direction_is_inferred_from_the_name(name, expected):
    assert infer_greater_is_better(name) is expected


@pytest.mark.parametrize("kwargs,words", [
    ({"save_total_limit": 0}, ["save_total_limit=0", ">= 1"]),
    ({"save_total_limit": True}, ["save_total_limit=True"]),
    ({"save_total_limit": "3"}, ["save_total_limit='3'"]),
    ({"preserve_n_best": -1, "best_model_metric": "loss"}, ["preserve_n_best=-1"]),
    ({"preserve_n_best": 2}, ["preserve_n_best=2", "best_model_metric"]),
    ({"preserve_n_best": 1, "best_model_metric": "throughput"}, ["'throughput'", "best_model_greater_is_better"]),
    ({"best_model_metric": ""}, ["best_model_metric=''"]),
    ({"best_model_metric": "loss", "best_model_greater_is_better": "no"}, ["best_model_greater_is_better='no'"]),
    ({"keep_every_n_steps": 0}, ["keep_every_n_steps=0"]),
])
def test_bad_options_are_refused_with_the_option_and_value(kwargs, words):
    with pytest.raises(ValueError) as info:
        RetentionPolicy(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_describe_names_only_the_rules_in_force():
    assert RetentionPolicy(save_total_limit=2, preserve_n_best=1, best_model_metric="mAP").describe() == (
        "save_total_limit=2, preserve_n_best=1 by mAP (higher is better)")
    for n in (None, 0):
        text = RetentionPolicy(save_total_limit=2, preserve_n_best=n, best_model_metric="eval_loss").describe()
        assert text == "save_total_limit=2, no best-N rule (best_model_metric=eval_loss, lower is better)"


@pytest.mark.parametrize("value", [torch.tensor([1.0, 2.0]), torch.zeros(0), torch.ones(2, 2)])
def test_a_metric_that_is_not_one_number_is_refused_naming_it(tmp_path, value):
    words = rf"metric 'm' is a Tensor of shape \{list(value.shape)}, not a single number"
    with pytest.raises(TypeError, match=words):
        plain_metrics({"ok": 1.0, "m": value})
    coord = CheckpointCoordinator(tmp_path)
    with pytest.raises(CheckpointError, match=words):
        coord.save(1, _components(1), {"m": value})
    coord.save(2, _components(2), {"m": torch.tensor([0.5])})  # one element is one number
    assert scan(LocalStorage(), str(tmp_path))[-1].metrics == {"m": 0.5}


def test_metric_lookup_tries_eval_prefix_and_keeps_zero():
    assert metric_value({"eval_loss": 0.0}, "loss") == ("eval_loss", 0.0)
    assert metric_value({"loss": 2.0, "eval_loss": 1.0}, "loss") == ("loss", 2.0)
    assert metric_value({"eval_loss": "nan"}, "eval_loss") is None
    assert metric_value({"eval_loss": True}, "eval_loss") is None
    assert metric_value({}, "eval_loss") is None
    assert RetentionPolicy(preserve_n_best=1, best_model_metric="throughput",
                           best_model_greater_is_better=True).greater_is_better is True


def test_newest_k_plus_best_n_as_metrics_rise_and_fall(tmp_path, caplog):
    losses = [0.9, 0.5, 0.7, 0.3, 0.8, 0.6, 0.95, 0.85]
    policy = RetentionPolicy(save_total_limit=2, preserve_n_best=2, best_model_metric="eval_loss")
    coord = CheckpointCoordinator(tmp_path, retention=policy)
    with caplog.at_level(logging.INFO, logger="ckpt"):
        _save_all(coord, [{"eval_loss": v} for v in losses])
    history = dict(enumerate(losses, start=1))
    assert _steps_on_disk(tmp_path) == _oracle(history, 2, 2, False) == [2, 4, 7, 8]
    deletions = [r.getMessage() for r in caplog.records if "retention: deleted" in r.getMessage()]
    assert len(deletions) == 4 and len({d.split()[2] for d in deletions}) == 4  # each logged once
    assert all("not among the newest 2" in d and "not among the 2 best by eval_loss" in d for d in deletions)
    assert [(b.rank, b.step, b.value) for b in coord.best()] == [(1, 4, 0.3), (2, 2, 0.5)]
    reasons = {c.step: c.reasons for c in coord.last_retention.decision.kept}
    assert reasons[4] == ("best #1 (eval_loss=0.3)",) and reasons[8] == ("latest", "just saved")
    text = coord.summary()
    assert "#1  checkpoint-00000004  step 4  eval_loss=0.3" in text and "Latest: checkpoint-00000008" in text
    assert json.loads((tmp_path / POLICY_NAME).read_text())["preserve_n_best"] == 2


@pytest.mark.parametrize("limit,n", [(3, None), (4, 2), (5, 1), (3, 3)])
def test_every_save_leaves_what_the_policy_says_for_larger_limits(tmp_path, limit, n):
    losses = [0.9, 0.5, 0.7, 0.3, 0.8, 0.6, 0.95, 0.85, 0.4]
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(
        save_total_limit=limit, preserve_n_best=n, best_model_metric="eval_loss" if n else None))
    for step, loss in enumerate(losses, start=1):  # checked after every save, while fewer than `limit` exist too
        coord.save(step, _components(step), {"eval_loss": loss})
        history = dict(enumerate(losses[:step], start=1))
        assert _steps_on_disk(tmp_path) == _oracle(history, limit, n or 0, False), step


def test_a_limit_above_the_count_keeps_everything():
    infos = [CheckpointInfo(s, f"/r/checkpoint-{s}", {}) for s in (1, 2, 3)]
    decision = RetentionPolicy(save_total_limit=5).decide(infos)
    assert [c.step for c in decision.kept] == [1, 2, 3] and not decision.dropped


def test_ties_go_to_the_older_checkpoint(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(
        save_total_limit=1, preserve_n_best=1, best_model_metric="eval_loss"))
    _save_all(coord, [{"eval_loss": 0.7}, {"eval_loss": 0.5}, {"eval_loss": 0.5}, {"eval_loss": 0.5}, {}])
    assert _steps_on_disk(tmp_path) == [2, 5]
    assert [b.step for b in coord.best(3)] == [2]
    infos = [CheckpointInfo(s, f"/r/checkpoint-{s}", {"eval_loss": v}) for s, v in [(9, 0.5), (3, 0.5), (5, 0.4)]]
    policy = RetentionPolicy(save_total_limit=1, preserve_n_best=2, best_model_metric="eval_loss")
    assert [(b.rank, b.step) for b in policy.decide(infos).best] == [(1, 5), (2, 3)]


def test_nan_inf_and_missing_metrics_never_count_as_best(tmp_path):
    metrics = [{"eval_loss": NAN}, {"eval_loss": -INF}, {"eval_loss": 0.4}, None, {"eval_loss": INF},
               {"other": 0.1}, {"eval_loss": 0.0}, {"eval_loss": 0.9}, {}]
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(
        save_total_limit=2, preserve_n_best=2, best_model_metric="eval_loss"))
    _save_all(coord, metrics)
    assert _steps_on_disk(tmp_path) == [3, 7, 8, 9]  # 0.0 is a value (the best); the others go by age
    assert [(b.step, b.value) for b in coord.best()] == [(7, 0.0), (3, 0.4)]
    dropped = {c.step: c.drop_reason for c in coord.last_retention.decision.checkpoints}
    assert dropped == {3: None, 7: None, 8: None, 9: None}
    first = scan(LocalStorage(), str(tmp_path))
    assert first[-1].metrics == {}


def test_greater_is_better_metric(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(
        save_total_limit=1, preserve_n_best=2, best_model_metric="accuracy"))
    accs = [0.1, 0.9, 0.5, 0.2, 0.7, 0.3]
    _save_all(coord, [{"eval_accuracy": a} for a in accs])  # found through the eval_ prefix
    assert _steps_on_disk(tmp_path) == _oracle(dict(enumerate(accs, 1)), 1, 2, True) == [2, 5, 6]


def test_n_larger_than_the_limit_keeps_up_to_limit_plus_n(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(
        save_total_limit=2, preserve_n_best=5, best_model_metric="eval_loss"))
    losses = [0.1 * i for i in range(1, 11)]  # the best are the oldest
    _save_all(coord, [{"eval_loss": v} for v in losses])
    assert _steps_on_disk(tmp_path) == [1, 2, 3, 4, 5, 9, 10]


def test_limit_one_without_best_keeps_only_the_newest(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(save_total_limit=1))
    for step in (10, 20, 30):
        coord.save(step, _components(step))
        assert _steps_on_disk(tmp_path) == [step]


def test_keep_every_n_steps(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(save_total_limit=2, keep_every_n_steps=300))
    _save_all(coord, [None] * 10, first_step=100, every=100)
    assert _steps_on_disk(tmp_path) == [300, 600, 900, 1000]
    kept = {c.step: c.reasons for c in coord.last_retention.decision.kept}
    assert kept[600] == ("every 300 steps",) and kept[900] == ("latest", "every 300 steps")


def test_pinned_checkpoints_survive_until_unpinned(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(save_total_limit=1))
    coord.save(1, _components(1))
    assert pin_checkpoint(LocalStorage(), str(tmp_path / "checkpoint-00000001"))
    assert not pin_checkpoint(LocalStorage(), str(tmp_path / "checkpoint-00000001"))
    _save_all(coord, [None] * 3, first_step=2)
    assert _steps_on_disk(tmp_path) == [1, 4]
    assert unpin_checkpoint(LocalStorage(), str(tmp_path / "checkpoint-00000001"))
    coord.save(5, _components(5))
    assert _steps_on_disk(tmp_path) == [5]


def test_foreign_folders_and_checkpoints_being_loaded_are_never_touched(tmp_path):
    for name in ("notes", "checkpoint-00000000", "checkpoint-abc", "best-model"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-00000000" / "weights.bin").write_bytes(b"x")  # no manifest: not ours
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(save_total_limit=1))
    coord.save(1, _components(1))
    with hold(str(tmp_path / "checkpoint-00000001"), "being loaded"):
        coord.save(2, _components(2))
        assert _steps_on_disk(tmp_path) == [1, 2]
        assert coord.last_retention.decision.checkpoints[0].reasons == ("being loaded",)
    coord.save(3, _components(3))
    assert _steps_on_disk(tmp_path) == [3]
    assert {"notes", "checkpoint-00000000", "checkpoint-abc", "best-model"} <= set(os.listdir(tmp_path))


class _NoRename(LocalStorage):
    def rename(self, src, dst):
        if dst.endswith(".deleting.partial"):
            raise OSError(13, "Permission denied (injected)", src)
        super().rename(src, dst)


def test_a_failed_deletion_does_not_fail_the_committed_save(tmp_path, caplog):
    coord = CheckpointCoordinator(tmp_path, storage=_NoRename(), retention=RetentionPolicy(save_total_limit=1))
    coord.save(1, _components(1))
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        path = coord.save(2, _components(2))
    assert os.path.basename(path) == "checkpoint-00000002" and _steps_on_disk(tmp_path) == [1, 2]
    assert coord.last_retention.failed[0][0].endswith("checkpoint-00000001")
    assert any("could not delete" in r.getMessage() for r in caplog.records)


def test_unreadable_manifest_goes_by_age_and_policy_record_round_trips(tmp_path):
    policy = RetentionPolicy(save_total_limit=2, preserve_n_best=1, best_model_metric="eval_loss")
    coord = CheckpointCoordinator(tmp_path, retention=policy)
    _save_all(coord, [{"eval_loss": 0.1}, {"eval_loss": 0.5}])
    (tmp_path / "checkpoint-00000001" / "checkpoint_manifest.json").write_text("{not json")
    _save_all(coord, [{"eval_loss": 0.6}, {"eval_loss": 0.7}], first_step=3)
    assert _steps_on_disk(tmp_path) == [2, 3, 4]
    assert read_policy(LocalStorage(), str(tmp_path)) == policy


_CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent
    from ckpt.io.storage import LocalStorage
    from tests.support.workers import Box

    class DiesMidSave(LocalStorage):
        def write_file(self, path, chunks):
            if "checkpoint-00000007.partial" in path:
                os.kill(os.getpid(), signal.SIGKILL)  # killed while writing step 7
            return super().write_file(path, chunks)

    losses = [0.5, 0.2, 0.6, 0.4, 0.9, 0.8, 0.1]
    coord = CheckpointCoordinator(sys.argv[1], storage=DiesMidSave(), retention=RetentionPolicy(
        save_total_limit=2, preserve_n_best=1, best_model_metric="eval_loss"))
    for step, loss in enumerate(losses, start=1):
        state = Box({"w": torch.full((2,), float(step))})
        coord.save(step, [StateComponent("model", state, SharingPattern.REPLICATED)], {"eval_loss": loss})
""")


def test_crash_then_resume_with_another_n_leaves_what_the_policy_says(tmp_path):
    root = REPO
    proc = subprocess.run([sys.executable, "-c", _CRASHING_RUN, str(tmp_path)], cwd=root, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert _steps_on_disk(tmp_path) == [2, 5, 6]  # newest 2 plus the best (0.2 at step 2)
    assert os.path.isdir(tmp_path / "checkpoint-00000007.partial")

    policy = RetentionPolicy(save_total_limit=1, preserve_n_best=2, best_model_metric="eval_loss")
    coord = CheckpointCoordinator(tmp_path, retention=policy)
    box = Box({})
    result = coord.load([StateComponent("model", box, SharingPattern.REPLICATED)])
    assert result.step == 6 and torch.equal(box.state["w"], torch.full((2,), 6.0))
    later = [0.3, 0.7, 0.15, 0.65]
    _save_all(coord, [{"eval_loss": v} for v in later], first_step=7)
    history = {2: 0.2, 5: 0.9, 6: 0.8, 7: 0.3, 8: 0.7, 9: 0.15, 10: 0.65}
    assert _steps_on_disk(tmp_path) == _oracle(history, 1, 2, False, extra={6}) == [2, 6, 9, 10]
    assert not os.path.exists(tmp_path / "checkpoint-00000007.partial")
    assert dict(zip(*[[c.step for c in coord.last_retention.decision.kept],
                      [c.reasons for c in coord.last_retention.decision.kept]], strict=True))[6] == ("resumed from",)
    # A fresh process (no resume) computes the same best set from disk.
    fresh = CheckpointCoordinator(tmp_path, retention=policy)
    assert [b.step for b in fresh.best()] == [b.step for b in coord.best()] == [9, 2]
