"""The recovery policy (TOML and code), and the small pieces recovery is built from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainers import TrainingArguments
from trainers.recovery import RecoveryEvent, RecoveryPolicy, load_recovery_policy, read_events
from trainers.recovery.events import EventLog
from trainers.recovery.guard import mark_diverged
from trainers.recovery.lr import LRRamp, scaled_lr
from trainers.recovery.microbatch import is_out_of_memory, split_batch
from trainers.recovery.spikes import GradNormHistory

ISSUE_EXAMPLE = """
[recovery]
nan_action = "rollback"          # warn | skip | raise | rollback
max_consecutive_nan = 3
divergence_action = "rollback"   # stop | abort | rollback
rollback_to = "last_good"        # last_good | best | steps_back:N
max_rollbacks = 3                # then stop with a clear message
lr_factor = 0.5                  # LR multiplied by this after a rollback ...
lr_ramp_steps = 200              # ... and ramped back linearly over this many steps
skip_batches = 0                 # data skipped past the spike point after a rollback
grad_norm_spike_factor = 10.0    # skip the step if grad norm > factor x running median
oom_retry = true                 # on out-of-memory, halve the micro-batch, retry
health_check_interval = 100      # steps between collective liveness checks (0 = off)
health_check_timeout_s = 60
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recovery.toml"
    path.write_text(text)
    return str(path)


def test_the_issue_example_is_the_default_policy(tmp_path):
    assert RecoveryPolicy.from_toml(write(tmp_path, ISSUE_EXAMPLE)) == RecoveryPolicy()


def test_a_policy_file_with_a_detector_table(tmp_path):
    policy = RecoveryPolicy.from_toml(write(tmp_path, '[recovery]\nrollback_to = "steps_back:500"\n'
                                                      'lr_ramp_steps = 0\n[recovery.detector]\npatience = 5\n'))
    assert policy.steps_back == 500 and policy.lr_ramp_steps == 0
    assert policy.make_detector().patience == 5 and policy.make_detector().action == "rollback"
    assert RecoveryPolicy.from_toml(write(tmp_path, "[recovery]\ndetector = false\n")).detector is None


@pytest.mark.parametrize("text,match", [
    ("[recovery]\nnan_actoin = 'skip'\n", r"unknown key 'nan_actoin' in \[recovery\] \(did you mean 'nan_action'\?\)"),
    ("[recovery]\nnan_action = 'explode'\n", r"nan_action='explode' must be one of warn, skip, raise, rollback"),
    ("[recovery]\ndivergence_action = 'panic'\n", "divergence_action='panic' must be one of stop, abort, rollback"),
    ("[recovery]\nrollback_to = 'steps_back:0'\n", "rollback_to='steps_back:0' must be"),
    ("[recovery]\nrollback_to = 'yesterday'\n", "rollback_to='yesterday'"),
    ("[recovery]\nmax_rollbacks = -1\n", "max_rollbacks=-1 must be an int >= 0"),
    ("[recovery]\nmax_consecutive_nan = 2.5\n", "max_consecutive_nan=2.5 must be an int >= 1"),
    ("[recovery]\nlr_factor = 1.5\n", r"lr_factor=1.5 must be a number in \(0, 1\]"),
    ("[recovery]\nlr_factor = 0\n", "lr_factor=0"),
    ("[recovery]\ngrad_norm_spike_factor = 0.5\n", "grad_norm_spike_factor=0.5 must be a number > 1"),
    ("[recovery]\noom_retry = 'yes'\n", "oom_retry='yes' must be true or false"),
    ("[recovery]\nhealth_check_timeout_s = 0\n", "health_check_timeout_s=0 must be a number of seconds > 0"),
    ("[recovery]\nhealth_check_interval = -5\n", "health_check_interval=-5"),
    ("[recovery.detector]\npatiense = 3\n", r"unknown key detector.patiense \(did you mean 'patience'\?\)"),
    ("[recovery.detector]\npatience = 0\n", "detector: DivergenceDetector: patience=0"),
    ("[recovery.detector]\naction = 'stop'\n", "divergence_action decides"),
    ("nan_action = 'skip'\n", r"outside the \[recovery\] table"),
    ("[training]\nlr = 1\n", r"outside the \[recovery\] table"),
    ("[recovery\n", "not valid TOML"),
])
def test_bad_files_name_the_key_value_and_fix(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as info:
        RecoveryPolicy.from_toml(path)
    assert str(info.value).startswith(path)


def test_training_arguments_take_a_file_or_a_policy(tmp_path):
    path = write(tmp_path, "[recovery]\nmax_rollbacks = 7\n")
    assert TrainingArguments(output_dir="x", max_steps=1, recovery=path).recovery_policy().max_rollbacks == 7
    policy = RecoveryPolicy(nan_action="skip")
    args = TrainingArguments(output_dir="x", max_steps=1, recovery=policy)
    assert args.recovery_policy() is policy and args.to_dict()["recovery"]["nan_action"] == "skip"
    assert TrainingArguments(output_dir="x", max_steps=1).recovery_policy() is None
    with pytest.raises(ValueError, match=r"TrainingArguments: recovery=.*max_rollbacks=-1"):
        TrainingArguments(output_dir="x", max_steps=1, recovery=write(tmp_path, "[recovery]\nmax_rollbacks = -1\n"))
    with pytest.raises(ValueError, match="does not exist"):
        TrainingArguments(output_dir="x", max_steps=1, recovery=str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="must be the path of a TOML file"):
        TrainingArguments(output_dir="x", max_steps=1, recovery=3)
    assert load_recovery_policy({"lr_factor": 0.25}).lr_factor == 0.25


def test_the_lr_ramp_and_its_scaling_leave_the_schedule_alone():
    ramp = LRRamp(start_step=100, start_scale=0.5, steps=10)
    assert [ramp.scale(s) for s in (101, 106, 111, 500)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    assert LRRamp().scale(7) == 1.0 and LRRamp(start_step=0, start_scale=0.25, steps=0).scale(10**6) == 0.25
    copy = LRRamp()
    copy.load_state_dict(ramp.state_dict())
    assert copy == ramp
    param = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([param], lr=0.1)
    seen = []
    with scaled_lr(opt, 0.5):
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [0.05] and opt.param_groups[0]["lr"] == 0.1


def test_running_median_and_spikes():
    history = GradNormHistory(window=20)
    for v in range(1, 10):
        history.add(float(v))
    assert not history.is_spike(1000.0, 10.0)  # fewer than 10 norms: no verdict yet
    history.add(10.0)
    history.add(math.nan)  # never enters
    assert history.median() == 5.5 and history.is_spike(56.0, 10.0) and not history.is_spike(55.0, 10.0)
    assert not history.is_spike(1e9, 0)
    for _ in range(100):
        history.add(1.0)
    assert len(history) == 20 and history.median() == 1.0
    again = GradNormHistory(window=20)
    again.load_state_dict(history.state_dict())
    assert again.median() == 1.0 and len(again) == 20


def test_split_batch_keeps_structure_and_non_batch_values():
    batch = {"x": torch.arange(10).reshape(5, 2), "y": (torch.arange(5), "tag"), "scale": torch.tensor(2.0)}
    pieces = split_batch(batch, 2)
    assert [n for _, n in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["x"] for p, _ in pieces]), batch["x"])
    assert pieces[2][0]["y"][1] == "tag" and pieces[1][0]["scale"] is batch["scale"]
    assert split_batch(batch, 8) == [(batch, 5)]


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_event_lines_are_strict_json(tmp_path):
    log = EventLog(str(tmp_path), enabled=True)
    log.record(RecoveryEvent("non_finite", 7, "skip", "non-finite loss", ranks=(1,),
                             values={"loss": math.nan, "grad_norm": math.inf}))
    log.record(RecoveryEvent("rollback", 9, "rollback", "divergence"), write=False)  # kept, not written
    line = (tmp_path / "recovery_events.jsonl").read_text().splitlines()
    assert len(line) == 1
    record = json.loads(line[0], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(record) == {"time", "step", "kind", "action", "reason", "ranks", "values"}
    assert record["values"] == {"loss": "nan", "grad_norm": "inf"} and record["ranks"] == [1]
    assert [e["kind"] for e in read_events(str(tmp_path))] == ["non_finite"] and len(log.events) == 2
    EventLog(str(tmp_path), enabled=True).start(fresh=True)
    assert read_events(str(tmp_path)) == [] and (tmp_path / "recovery_events.jsonl.previous").exists()


def test_diverged_metrics_are_never_finite():
    marked = mark_diverged({"eval_loss": 1.2, "train_loss": 3.0})
    assert math.isnan(marked["eval_loss"]) and marked["diverged_eval_loss"] == 1.2 and marked["train_loss"] == 3.0
    assert marked["diverged"] is True


def test_first_bad_step_reaches_back_to_the_raw_jump_the_ema_lags_behind():
    from trainers.divergence import DivergenceDetector

    d = DivergenceDetector(warmup=4)  # smoothing 0.3, threshold 1.0, patience 3
    values = [3.6, 2.2, 2.0, 1.6, 1.4, 1.2, 3.0, 3.2, 3.1, 3.1, 3.1, 3.1, 3.1]
    fired = [50 * (i + 1) for i, v in enumerate(values) if d.observe(v, step=50 * (i + 1))]
    assert fired and d.first_bad_step == 350  # the jump, not the step the smoothed value crossed the threshold
    again = DivergenceDetector(warmup=4)
    again.load_state_dict(d.state_dict())
    assert again.raw_bad_since == d.raw_bad_since
