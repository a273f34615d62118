"""The `ckpt` command against real checkpoints: ls, inspect, verify, diff, export, prune, pin, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent
from tests.support.cli import run_cli
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box, make_model

LOSSES = [0.9, 0.4, 0.7, 0.6, 0.8]


def _json_cli(capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = run_cli(capsys, *argv, "--json")
    return code, json.loads(out)


def _save_run(run_dir, policy: RetentionPolicy | None = None) -> torch.nn.Module:
    model, opt = make_model(seed=0)
    coord = CheckpointCoordinator(run_dir, retention=policy)
    for step, loss in enumerate(LOSSES, start=1):
        with torch.no_grad():
            model[0].bias += 1.0
        comps = [StateComponent("model", model, SharingPattern.REPLICATED),
                 StateComponent("optimizer", opt, SharingPattern.REPLICATED),
                 StateComponent("progress", Box({"step": step, "seen": torch.tensor([step * 8])}), SharingPattern.GLOBAL)]
        coord.save(step * 100, comps, {"eval_loss": loss, "lr": 0.1})
    return model


@pytest.fixture
def run(tmp_path):
    policy = RetentionPolicy(save_total_limit=2, preserve_n_best=1, best_model_metric="eval_loss")
    model = _save_run(tmp_path / "run", policy)
    return tmp_path / "run", model


def _two_rank_save(rank: int, world: int, run_dir: str) -> None:
    model, _ = make_model(seed=0)
    coord = CheckpointCoordinator(run_dir, process_groups={"solo": [rank]}, timeout=60)
    coord.save(7, [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("stats", Box({"hist": torch.arange(3) + 10 * rank, "n": rank}), SharingPattern.PER_RANK),
        StateComponent("stage", Box({"w": torch.full((2,), float(rank))}), SharingPattern.PER_GROUP,
                       process_group_name="solo"),
    ])


@pytest.fixture(scope="module")
def two_rank_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_rank")
    expect_ok(run_ranks(2, _two_rank_save, str(run_dir)))
    return run_dir / "checkpoint-00000007"


def test_ls_shows_why_each_checkpoint_is_kept_and_flags_partials(run, capsys):
    run_dir, _ = run
    (run_dir / "checkpoint-00000600.partial").mkdir()
    (run_dir / "checkpoint-00000600.partial" / "half.safetensors").write_bytes(b"x" * 10)
    code, data = _json_cli(capsys, "ls", str(run_dir))
    assert code == 0 and data["policy_source"] == "recorded by the run"
    rows = {r["step"]: r for r in data["checkpoints"]}
    assert sorted(rows) == [200, 400, 500, 600]
    assert rows[200]["reasons"] == ["best #1 (eval_loss=0.4)"] and rows[200]["metrics"]["eval_loss"] == 0.4
    assert rows[500]["reasons"] == ["latest"] and rows[400]["next_to_go"] and not rows[500]["next_to_go"]
    assert rows[600]["partial"] and not rows[600]["keep"]
    assert all(r["nbytes"] > 0 for r in rows.values())
    code, out, _ = run_cli(capsys, "ls", str(run_dir))
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["CHECKPOINT", "STEP"]
    status_col = lines[1].index("STATUS")
    assert [ln[status_col:].split(":")[0] for ln in lines[2:]] == ["keep", "keep", "keep", "PARTIAL"]
    assert "best #1 (eval_loss=0.4)" in lines[2]
    code, data = _json_cli(capsys, "ls", str(run_dir), "--save-total-limit", "1")  # over the recorded best-1
    assert [r["keep"] for r in data["checkpoints"][:3]] == [True, False, True]
    assert data["policy_sources"]["save_total_limit"] == "command line"
    assert data["policy_sources"]["preserve_n_best"] == "recorded by the run"


def test_inspect_shows_components_and_tensors(run, capsys):
    run_dir, _ = run
    ckpt = str(run_dir / "checkpoint-00000500")
    code, data = _json_cli(capsys, "inspect", ckpt, "--tensors")
    assert code == 0 and data["step"] == 500 and data["topology"]["world_size"] == 1
    comps = {c["key"]: c for c in data["components"]}
    assert comps["model"]["pattern"] == "replicated" and comps["model"]["validation_level"] == "tensor"
    assert comps["model"]["tensors"] == 4 and comps["model"]["writer_ranks"] == [0]
    assert comps["progress"]["pattern"] == "global" and comps["progress"]["tensors"] == 1
    shapes = {t["name"]: (t["dtype"], t["shape"]) for t in data["tensor_list"] if t["component"] == "model"}
    assert shapes["0.weight"] == ("float32", [32, 16])
    code, out, _ = run_cli(capsys, "inspect", ckpt, "--tensors")
    assert code == 0 and "COMPONENT" in out and "0.weight" in out and "float32" in out


def test_verify_catches_a_flipped_byte_and_a_missing_file(run, capsys):
    run_dir, _ = run
    ckpt = run_dir / "checkpoint-00000500"
    code, out, _ = run_cli(capsys, "verify", str(ckpt))
    assert code == 0 and out.startswith("OK: all")
    target = next((ckpt / "model").glob("*.safetensors"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    (ckpt / "progress" / "global.msgpack").unlink()
    code, out, _ = run_cli(capsys, "verify", str(ckpt))
    assert code == 1 and "FAILED: 2 of" in out
    assert f"model/{target.name}" in out and "progress/global.msgpack" in out
    code, report = _json_cli(capsys, "verify", str(ckpt))
    bad = {f["path"]: f["status"] for f in report["files"] if f["status"] != "ok"}
    assert code == 1 and bad == {f"model/{target.name}": "digest mismatch", "progress/global.msgpack": "missing"}


def test_verify_shows_progress_only_on_a_terminal(run, capsys, monkeypatch):
    ckpt = str(run[0] / "checkpoint-00000500")
    assert run_cli(capsys, "verify", ckpt)[2] == ""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, _, err = run_cli(capsys, "verify", ckpt)
    assert code == 0 and "verify: 100%" in err


def test_diff_reports_changes_per_tensor(tmp_path, capsys):
    coord = CheckpointCoordinator(tmp_path)
    coord.save(1, [StateComponent("m", Box({"w": torch.zeros(3), "gone": torch.ones(2), "s": torch.ones(2),
                                            "same": torch.ones(1), "n": 1}), SharingPattern.GLOBAL),
                   StateComponent("old", Box({"x": torch.ones(1)}), SharingPattern.GLOBAL)])
    coord.save(2, [StateComponent("m", Box({"w": torch.tensor([0.0, -0.5, 0.25]), "new": torch.ones(2),
                                            "s": torch.ones(3), "same": torch.ones(1), "n": 2}), SharingPattern.GLOBAL)])
    a, b = str(tmp_path / "checkpoint-00000001"), str(tmp_path / "checkpoint-00000002")
    code, report = _json_cli(capsys, "diff", a, b)
    assert code == 1 and not report["identical"]
    comps = {c["key"]: c for c in report["components"]}
    assert comps["old"]["status"] == "removed"
    rows = {t["name"]: t for t in comps["m"]["tensors"]}
    assert rows["w"]["status"] == "changed" and rows["w"]["max_abs_diff"] == 0.5
    assert rows["gone"]["status"] == "removed" and rows["new"]["status"] == "added"
    assert rows["s"]["status"] == "shape changed" and rows["same"]["status"] == "same"
    assert comps["m"]["non_tensor_state_changed"] == [""]
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert "max |a-b| = 0.5" in out and "(whole component)" in out
    assert run_cli(capsys, "diff", a, a)[0] == 0


def test_export_gives_a_safetensors_file_equal_to_the_model(two_rank_ckpt, tmp_path, capsys):
    model, _ = make_model(seed=0)
    out = tmp_path / "model.safetensors"
    code, result = _json_cli(capsys, "export", str(two_rank_ckpt), "--component", "model", "-o", str(out))
    assert code == 0 and result["tensors"] == 4
    loaded = load_file(str(out))
    expected = model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_export_per_rank_and_per_group_copies(two_rank_ckpt, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    code, _, err = run_cli(capsys, "export", str(two_rank_ckpt), "--component", "stats", "-o", out)
    assert code == 2 and "--rank R" in err and "--concat-dim" in err and "Traceback" not in err
    _, result = _json_cli(capsys, "export", str(two_rank_ckpt), "--component", "stats", "-o", out, "--rank", "1")
    assert torch.equal(load_file(out)["hist"], torch.arange(3) + 10) and result["left_out_non_tensor"] == ["n"]
    run_cli(capsys, "export", str(two_rank_ckpt), "--component", "stats", "-o", out, "--concat-dim", "0")
    assert torch.equal(load_file(out)["hist"], torch.tensor([0, 1, 2, 10, 11, 12]))
    run_cli(capsys, "export", str(two_rank_ckpt), "--component", "stage", "-o", out, "--group", "1")
    assert torch.equal(load_file(out)["w"], torch.ones(2))
    code, _, err = run_cli(capsys, "export", str(two_rank_ckpt), "--component", "stats", "-o", out, "--rank", "5")
    assert code == 2 and "no copy for --rank 5" in err


def test_prune_applies_a_policy_offline(tmp_path, capsys):
    _save_run(tmp_path)  # no policy while training: all 5 kept
    code, out, _ = run_cli(capsys, "prune", str(tmp_path), "--save-total-limit", "1", "--preserve-n-best", "1",
                            "--metric", "eval_loss", "--dry-run")
    actions = [line.split("  ")[0] for line in out.splitlines()[2:-1]]
    assert code == 0 and actions.count("would delete") == 3 and len(os.listdir(tmp_path)) == 6  # 5 + the run dir's lock
    assert run_cli(capsys, "pin", str(tmp_path / "checkpoint-00000100"))[1].startswith("pinned")
    code, data = _json_cli(capsys, "prune", str(tmp_path), "--save-total-limit", "1", "--preserve-n-best", "1",
                           "--metric", "eval_loss")
    assert code == 0 and sorted(os.path.basename(d["path"]) for d in data["deleted"]) == [
        "checkpoint-00000300", "checkpoint-00000400"]
    assert all(d["reason"].startswith("not the newest, not the best by eval_loss") for d in data["deleted"])
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "checkpoint-00000100", "checkpoint-00000200",
                                            "checkpoint-00000500"]
    code, data = _json_cli(capsys, "unpin", str(tmp_path / "checkpoint-00000100"))
    assert data == {"path": str(tmp_path / "checkpoint-00000100"), "pinned": False, "changed": True}
    code, _, err = run_cli(capsys, "prune", str(tmp_path))
    assert code == 2 and "no recorded retention policy" in err


@pytest.mark.parametrize("case", ["missing", "file", "plain_dir", "run_dir", "corrupt", "partial", "component"])
def test_errors_are_one_line_without_a_traceback(run, tmp_path, capsys, case):
    run_dir, _ = run
    (tmp_path / "plain").mkdir()
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "checkpoint-00000009"
    bad.mkdir()
    (bad / "checkpoint_manifest.json").write_text('{"format_version": 1, "step": "x"')
    argv = {"missing": ["inspect", str(tmp_path / "nope")], "file": ["verify", str(tmp_path / "afile")],
            "plain_dir": ["inspect", str(tmp_path / "plain")], "run_dir": ["verify", str(run_dir)],
            "corrupt": ["inspect", str(bad)], "partial": ["ls", str(run_dir / "checkpoint-00000500")],
            "component": ["export", str(run_dir / "checkpoint-00000500"), "--component", "nope", "-o",
                          str(tmp_path / "o.safetensors")]}[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"ckpt {argv[0]}: error: ")
    assert "Traceback" not in err


def test_the_console_script_is_installed(run):
    exe = shutil.which("ckpt")
    assert exe is not None, "the ckpt console script is not on PATH (pip install -e .)"
    proc = subprocess.run([exe, "ls", str(run[0]), "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [c["step"] for c in json.loads(proc.stdout)["checkpoints"]] == [200, 400, 500]
