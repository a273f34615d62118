"""The `ckpt` command with a live job, policy flags laid over the run's recorded policy, JSON errors, and
the views the audit found untested: export progress, pinned status in `ls`, a dtype change in `diff`, and
`ls --json` best after a resume with another N."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent
from tests.support.cli import run_cli
from tests.support.files import REPO
from tests.support.workers import Box

LOSSES = [0.9, 0.4, 0.7, 0.6, 0.8]
POLICY = RetentionPolicy(save_total_limit=3, preserve_n_best=1, best_model_metric="eval_loss")


def _json(capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = run_cli(capsys, *argv, "--json")
    return code, json.loads(out)


def _comps(step: int) -> list[StateComponent]:
    return [StateComponent("model", Box({"w": torch.full((64,), float(step))}), SharingPattern.REPLICATED)]


def _save(run_dir, policy: RetentionPolicy | None, losses=LOSSES, first: int = 1) -> None:
    with CheckpointCoordinator(run_dir, retention=policy) as coord:
        for step, loss in enumerate(losses, start=first):
            coord.save(step * 100, _comps(step), {"eval_loss": loss})


def _steps(run_dir) -> list[int]:
    return sorted(int(n.split("-")[1]) for n in os.listdir(run_dir) if n.startswith("checkpoint-"))


HOLDER = """
    import sys
    from ckpt import CheckpointCoordinator
    coord = CheckpointCoordinator(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.read()  # hold the run dir until the test closes our stdin
    coord.close()
"""


def test_prune_refuses_while_a_live_job_holds_the_run_dir_and_force_overrides(tmp_path, capsys):
    _save(tmp_path, None)  # no policy while training: all 5 kept
    job = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path)], cwd=REPO, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert job.stdout.readline().strip() == "ready", job.stderr.read()
        flags = ["--save-total-limit", "1"]
        code, out, err = run_cli(capsys, "prune", str(tmp_path), *flags)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert f"pid {job.pid}" in err and "--force" in err and "live job" in err
        assert _steps(tmp_path) == [100, 200, 300, 400, 500]
        code, data = _json(capsys, "prune", str(tmp_path), *flags)
        assert code == 2 and f"pid {job.pid}" in data["error"] and _steps(tmp_path) == [100, 200, 300, 400, 500]
        code, out, err = run_cli(capsys, "prune", str(tmp_path), *flags, "--dry-run")  # only prints: allowed
        assert code == 0 and "4 would delete" in out and f"pid {job.pid}" in err
        assert _steps(tmp_path) == [100, 200, 300, 400, 500]
        code, data = _json(capsys, "prune", str(tmp_path), *flags, "--force")
        assert code == 0 and data["forced"] and data["lock_holder"]["pid"] == job.pid
        assert _steps(tmp_path) == [500]
    finally:
        job.communicate(input="", timeout=120)
    assert job.returncode == 0


def test_prune_releases_the_lock_it_takes(tmp_path, capsys):
    _save(tmp_path, POLICY)
    assert run_cli(capsys, "prune", str(tmp_path))[0] == 0
    with CheckpointCoordinator(tmp_path, retention=POLICY) as coord:  # would raise RunDirInUseError if kept
        coord.save(600, _comps(6), {"eval_loss": 0.5})


def test_policy_flags_replace_only_their_part_of_the_recorded_policy(tmp_path, capsys):
    _save(tmp_path, POLICY)  # keeps 200 (best, 0.4), 300, 400, 500
    assert _steps(tmp_path) == [200, 300, 400, 500]
    code, data = _json(capsys, "ls", str(tmp_path), "--save-total-limit", "1")
    assert data["policy"] == {**POLICY.to_plain(), "save_total_limit": 1}
    assert data["policy_sources"] == {"save_total_limit": "command line", "preserve_n_best": "recorded by the run",
                                      "best_model_metric": "recorded by the run"}
    assert data["policy_source"].startswith("--save-total-limit from the command line, the rest recorded")
    assert [(r["step"], r["keep"]) for r in data["checkpoints"]] == [(200, True), (300, False), (400, False),
                                                                     (500, True)]
    code, out, _ = run_cli(capsys, "prune", str(tmp_path), "--save-total-limit", "1")
    assert code == 0 and out.startswith("policy: save_total_limit=1, preserve_n_best=1 by eval_loss (lower is better)")
    assert "--save-total-limit from the command line" in out.splitlines()[0]
    assert _steps(tmp_path) == [200, 500], "the recorded best-N rule still applies"
    code, data = _json(capsys, "ls", str(tmp_path), "--preserve-n-best", "0", "--keep-every-n-steps", "0")
    assert data["policy"]["preserve_n_best"] == 0 and data["policy"]["keep_every_n_steps"] is None
    assert [r["keep"] for r in data["checkpoints"]] == [True, True]  # 2 newest of 2 (recorded limit 3)
    code, data = _json(capsys, "ls", str(tmp_path), "--metric", "eval_acc")
    assert data["policy"]["best_model_metric"] == "eval_acc" and data["policy_sources"]["best_model_metric"] == \
        "command line"


def test_policy_flags_on_a_run_without_a_recorded_policy_come_from_the_command_line(tmp_path, capsys):
    _save(tmp_path, None)
    code, data = _json(capsys, "ls", str(tmp_path), "--save-total-limit", "2")
    assert code == 0 and data["policy_source"] == "command line"
    assert data["policy_sources"] == {"save_total_limit": "command line"}


@pytest.mark.parametrize("flags,words", [
    (["--save-total-limit", "0"], ["--save-total-limit 0", "at least 1"]),
    (["--preserve-n-best", "-1"], ["--preserve-n-best -1"]),
    (["--keep-every-n-steps", "-5"], ["--keep-every-n-steps -5"]),
    (["--metric", "throughput"], ["--metric throughput", "--greater-is-better", "--lower-is-better"]),
    (["--preserve-n-best", "2"], ["--preserve-n-best 2", "needs --metric"]),
    (["--metric", " "], ["--metric"]),
    (["--save-total-limit", "x"], ["--save-total-limit", "'x'"]),
])
def test_policy_errors_name_the_flags_in_text_and_json(tmp_path, capsys, flags, words):
    _save(tmp_path, None, losses=LOSSES[:2])
    code, out, err = run_cli(capsys, "ls", str(tmp_path), *flags)
    assert code == 2 and out == "" and all(w in err for w in words), err
    assert "best_model" not in err and "RetentionPolicy" not in err
    code, out, err = run_cli(capsys, "prune", str(tmp_path), *flags, "--json")
    data = json.loads(out)
    assert code == 2 and data["exit_status"] == 2 and data["command"] == "prune"
    assert all(w in data["error"] for w in words), data


def test_a_recorded_option_in_an_error_names_the_file(tmp_path, capsys):
    policy = RetentionPolicy(save_total_limit=2, preserve_n_best=1, best_model_metric="throughput",
                             best_model_greater_is_better=True)
    _save(tmp_path, policy, losses=LOSSES[:2])
    code, out, err = run_cli(capsys, "ls", str(tmp_path), "--metric", "speed")  # a new metric drops the direction
    assert code == 2 and out == "" and "--metric speed" in err and "--greater-is-better" in err
    code, data = _json(capsys, "ls", str(tmp_path), "--metric", "eval_loss")
    assert code == 0 and data["policy"]["best_model_greater_is_better"] is None
    code, data = _json(capsys, "ls", str(tmp_path), "--save-total-limit", "1")
    assert code == 0 and data["policy"]["best_model_greater_is_better"] is True


def test_json_errors_for_other_commands(tmp_path, capsys):
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "nope"), "--json")
    assert code == 2 and err == "" and json.loads(out)["error"] == f"{tmp_path / 'nope'} does not exist"


def test_export_shows_progress_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    _save(tmp_path, None, losses=LOSSES[:1])
    ckpt, out = str(tmp_path / "checkpoint-00000100"), str(tmp_path / "m.safetensors")
    code, _, err = run_cli(capsys, "export", ckpt, "--component", "model", "-o", out)
    assert code == 0 and err == ""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, _, err = run_cli(capsys, "export", ckpt, "--component", "model", "-o", out)
    assert code == 0 and "export: 100%" in err
    code, _, err = run_cli(capsys, "export", ckpt, "--component", "model", "-o", out, "--json")
    assert code == 0 and err == ""


def test_ls_shows_pinned_status(tmp_path, capsys):
    _save(tmp_path, RetentionPolicy(save_total_limit=1))
    assert _steps(tmp_path) == [500]
    _save(tmp_path, RetentionPolicy(save_total_limit=1), losses=[0.5], first=6)  # 500 goes, 600 stays
    assert run_cli(capsys, "pin", str(tmp_path / "checkpoint-00000600"))[0] == 0
    _save(tmp_path, RetentionPolicy(save_total_limit=1), losses=[0.5], first=7)
    code, data = _json(capsys, "ls", str(tmp_path))
    rows = {r["step"]: r for r in data["checkpoints"]}
    assert rows[600]["pinned"] and rows[600]["reasons"] == ["pinned"] and not rows[700]["pinned"]
    code, out, _ = run_cli(capsys, "ls", str(tmp_path))
    line = next(ln for ln in out.splitlines() if ln.startswith("checkpoint-00000600"))
    assert line.endswith("keep: pinned")
    run_cli(capsys, "unpin", str(tmp_path / "checkpoint-00000600"))
    code, out, _ = run_cli(capsys, "ls", str(tmp_path))
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("checkpoint-00000600"))
    assert "would delete: not the newest" in line


def test_diff_reports_a_dtype_change(tmp_path, capsys):
    with CheckpointCoordinator(tmp_path) as coord:
        coord.save(1, [StateComponent("m", Box({"w": torch.ones(3), "k": torch.ones(2)}), SharingPattern.GLOBAL)])
        coord.save(2, [StateComponent("m", Box({"w": torch.ones(3, dtype=torch.bfloat16), "k": torch.ones(2)}),
                                      SharingPattern.GLOBAL)])
    a, b = str(tmp_path / "checkpoint-00000001"), str(tmp_path / "checkpoint-00000002")
    code, report = _json(capsys, "diff", a, b)
    rows = {t["name"]: t for t in report["components"][0]["tensors"]}
    assert code == 1 and rows["w"] == {"copy": "", "name": "w", "status": "dtype changed", "a": "float32[3]",
                                       "b": "bfloat16[3]"}
    assert rows["k"]["status"] == "same"
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1 and any(ln.split() == ["m", "-", "w", "dtype", "changed", "float32[3]", "->", "bfloat16[3]"]
                             for ln in out.splitlines()), out


def test_ls_json_best_equals_coord_best_after_a_resume_with_another_n(tmp_path, capsys):
    _save(tmp_path, RetentionPolicy(save_total_limit=1, preserve_n_best=3, best_model_metric="eval_loss"))
    assert _steps(tmp_path) == [200, 300, 400, 500]  # 0.4, 0.7, 0.6 best; 500 latest
    policy = RetentionPolicy(save_total_limit=1, preserve_n_best=2, best_model_metric="eval_loss")
    with CheckpointCoordinator(tmp_path, retention=policy) as coord:
        coord.load(_comps(0))
        for step, loss in [(600, 0.5), (700, 0.3)]:
            coord.save(step, _comps(step), {"eval_loss": loss})
        expected = [(b.rank, b.step, b.path, b.metric, b.value) for b in coord.best()]
    code, data = _json(capsys, "ls", str(tmp_path))
    assert code == 0 and data["policy"]["preserve_n_best"] == 2
    assert [(b["rank"], b["step"], b["path"], b["metric"], b["value"]) for b in data["best"]] == expected
    assert [e[1] for e in expected] == [700, 200]
