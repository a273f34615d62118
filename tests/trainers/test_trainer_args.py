"""TrainingArguments validation and the eval/save schedule it implies."""

from __future__ import annotations

import dataclasses
import pydoc

import pytest

from ckpt import ValidationLevel
from trainers import TrainingArguments
from trainers.arguments import field_help
from trainers.schedule import plan_step, planned_steps


def _args(**kw) -> TrainingArguments:
    return TrainingArguments(**{"output_dir": "runs/x", "max_steps": 100, **kw})


def test_eval_on_save_forces_an_evaluation_at_every_save():
    args = _args(max_steps=1300, eval_steps=250, save_steps=1000, eval_on_save=True, save_total_limit=3,
                 preserve_best_model=True, preserve_n_best=2, save_on_train_end=False)
    steps = planned_steps(args)
    assert [s for s, p in steps if p.evaluate] == [250, 500, 750, 1000, 1250]
    assert [s for s, p in steps if p.save] == [1000]
    # Misaligned: evaluation every 300 steps, and at the save step too.
    misaligned = _args(max_steps=2000, eval_steps=300, save_steps=1000, eval_on_save=True)
    assert [s for s, p in planned_steps(misaligned) if p.evaluate] == [300, 600, 900, 1000, 1200, 1500, 1800, 2000]
    assert [s for s, p in planned_steps(misaligned) if p.save] == [1000, 2000]


def test_misaligned_best_model_schedule_without_eval_on_save_is_rejected_clearly():
    with pytest.raises(ValueError) as info:
        _args(max_steps=2000, eval_steps=300, save_steps=1000, preserve_best_model=True)
    message = str(info.value)
    for part in ("preserve_best_model=True", "save_steps=1000", "eval_steps=300", "multiple of eval_steps",
                 "eval_on_save=True", "eval_steps=250", "'eval_loss'"):
        assert part in message, part
    with pytest.raises(ValueError, match="needs an evaluation at every save step"):
        _args(save_steps=10, preserve_best_model=True)
    # Aligned, or forced by eval_on_save: accepted.
    _args(eval_steps=250, save_steps=1000, preserve_best_model=True)
    _args(eval_steps=300, save_steps=1000, preserve_best_model=True, eval_on_save=True)


def test_without_best_model_only_the_newest_are_kept():
    policy = _args(save_steps=10, save_total_limit=3).retention_policy()
    assert policy.save_total_limit == 3 and not policy.preserve_n_best and policy.best_model_metric is None
    best = _args(save_steps=10, eval_steps=5, save_total_limit=3, preserve_best_model=True, preserve_n_best=2,
                 best_model_metric="accuracy").retention_policy()
    assert (best.preserve_n_best, best.best_model_metric, best.greater_is_better) == (2, "eval_accuracy", True)


@pytest.mark.parametrize("field,value,needle", [
    ("max_steps", 0, "max_steps=0 must be an int >= 1"),
    ("logging_steps", 2.5, "logging_steps=2.5"),
    ("save_steps", 0, "save_steps=0 must be an int >= 1, or None"),
    ("eval_on_save", "yes", "eval_on_save='yes' must be True or False"),
    ("max_grad_norm", -1.0, "max_grad_norm=-1.0"),
    ("resume_from_checkpoint", -3, "resume_from_checkpoint=-3 must be \"latest\""),
    ("ddp_backend", "mpi", "ddp_backend='mpi' must be one of"),
    ("replica_validation", "tensor", "must be a ckpt.ValidationLevel"),
    ("output_dir", "", "output_dir='' must be a non-empty path"),
])
def test_bad_values_name_the_option_the_value_and_the_fix(field, value, needle):
    with pytest.raises(ValueError) as info:
        _args(**{field: value})
    assert needle in str(info.value) and str(info.value).startswith("TrainingArguments: ")


def test_unknown_metric_direction_is_rejected_by_the_retention_policy():
    with pytest.raises(ValueError, match="best_model_greater_is_better"):
        _args(save_steps=10, eval_steps=10, preserve_best_model=True, best_model_metric="wibble")
    _args(save_steps=10, eval_steps=10, preserve_best_model=True, best_model_metric="wibble",
          best_model_greater_is_better=True)


def test_arguments_are_frozen_and_plain():
    args = _args(replica_validation=ValidationLevel.QUICK)
    with pytest.raises(AttributeError):
        args.max_steps = 5  # type: ignore[misc]
    assert args.to_dict()["replica_validation"] == "quick" and args.metric_key == "eval_loss"


def test_callback_requests_and_the_end_of_training():
    args = _args(max_steps=50, save_steps=20, eval_steps=None)
    assert plan_step(args, 7, has_eval=True).save is False
    assert plan_step(args, 7, has_eval=True, want_save=True).save is True
    end = plan_step(args, 50, has_eval=True)
    assert end.save and end.stop and end.log and not end.evaluate
    early = plan_step(args, 13, has_eval=True, want_stop=True)
    assert early.save and early.stop and not early.log  # the partial log window carries over a resume
    abort = plan_step(args, 20, has_eval=True, want_abort=True)
    assert abort.stop and not abort.save
    best = _args(max_steps=50, save_steps=20, eval_steps=10, preserve_best_model=True)
    assert plan_step(best, 13, has_eval=True, want_stop=True).evaluate  # every checkpoint gets its metric


def test_every_option_is_documented_at_run_time():
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(TrainingArguments)}
    assert [name for name, text in helps.items() if len(text.strip()) < 10] == []
    shown = pydoc.render_doc(TrainingArguments, renderer=pydoc.plaintext)  # what help(TrainingArguments) prints
    flat = " ".join(shown.split())
    for name, text in helps.items():
        assert f"{name}: " in shown and " ".join(text.split()) in flat, name


def test_on_save_error_takes_raise_or_warn():
    assert _args().on_save_error == "raise" and _args(on_save_error="warn").on_save_error == "warn"
    with pytest.raises(ValueError, match=r"on_save_error='ignore' must be one of \['raise', 'warn'\]"):
        _args(on_save_error="ignore")
