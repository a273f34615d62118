"""`ckpt ls` with damaged and abandoned checkpoints, `ckpt export` of everything, and the messages for paths
that are not checkpoints."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, pin_checkpoint
from tests.support.cli import run_cli
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box, make_model


def _save(coord: CheckpointCoordinator, step: int) -> None:
    coord.save(step, [StateComponent("c", Box({"v": torch.tensor(float(step))}), SharingPattern.GLOBAL)])


def test_ls_marks_a_damaged_newest_checkpoint_and_never_calls_it_latest(tmp_path, capsys):
    coord = CheckpointCoordinator(tmp_path)
    for step in (1, 2):
        _save(coord, step)
    (tmp_path / "checkpoint-00000002" / "checkpoint_manifest.json").write_text("{not json")
    code, out, _ = run_cli(capsys, "ls", str(tmp_path))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("checkpoint-")}
    assert "DAMAGED, keep: damaged: manifest unreadable, never latest" in lines["checkpoint-00000002"]
    assert "keep: latest" in lines["checkpoint-00000001"]
    assert "damaged (manifest unreadable, never loaded as latest): checkpoint-00000002" in out
    code, out, _ = run_cli(capsys, "ls", str(tmp_path), "--check", "--json")
    data = json.loads(out)
    assert code == 1 and data["damaged"] == ["checkpoint-00000002"]
    rows = {r["name"]: r for r in data["checkpoints"]}
    assert rows["checkpoint-00000002"]["damaged"] and "latest" not in rows["checkpoint-00000002"]["reasons"]
    (tmp_path / "checkpoint-00000002" / "checkpoint_manifest.json").unlink()
    assert run_cli(capsys, "ls", str(tmp_path), "--check")[0] == 0, "a folder without a manifest is not a checkpoint"


def test_ls_shows_abandoned_timelines(tmp_path, capsys):
    coord = CheckpointCoordinator(tmp_path)
    for step in (10, 20, 30):
        _save(coord, step)
    coord.load([StateComponent("c", Box({}), SharingPattern.GLOBAL)], checkpoint=10)
    _save(coord, 20)
    pin_checkpoint(coord.storage, str(tmp_path / "abandoned" / "after-step-10-saved-20" / "checkpoint-00000030"))
    code, out, _ = run_cli(capsys, "ls", str(tmp_path), "--json")
    rows = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    old20 = rows[os.path.join("abandoned", "after-step-10-saved-20", "checkpoint-00000020")]
    old30 = rows[os.path.join("abandoned", "after-step-10-saved-20", "checkpoint-00000030")]
    assert old20["abandoned"] and old30["abandoned"] and not rows["checkpoint-00000020"]["abandoned"]
    assert rows["checkpoint-00000020"]["reasons"] == ["latest"]
    _, text, _ = run_cli(capsys, "ls", str(tmp_path), "--save-total-limit", "1")
    line = next(x for x in text.splitlines() if "after-step-10-saved-20/checkpoint-00000020" in x)
    assert "ABANDONED, would delete: abandoned timeline" in line
    assert "2 committed checkpoints and 2 of abandoned timelines" in text
    code, _, _ = run_cli(capsys, "prune", str(tmp_path), "--save-total-limit", "1", "--force")
    assert code == 0
    assert os.listdir(tmp_path / "abandoned" / "after-step-10-saved-20") == ["checkpoint-00000030"], "pinned: kept"


def _per_rank_save(rank: int, world: int, run_dir: str) -> None:
    model, _ = make_model(seed=0)
    CheckpointCoordinator(run_dir, timeout=60).save(3, [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("stats", Box({"hist": torch.arange(3) + 10 * rank}), SharingPattern.PER_RANK),
        StateComponent("progress", Box({"step": 3, "note": "plain values only"}), SharingPattern.GLOBAL),
    ])


def test_export_without_component_writes_every_tensor_component(tmp_path, capsys):
    expect_ok(run_ranks(2, _per_rank_save, str(tmp_path / "run")))
    ckpt_dir = str(tmp_path / "run" / "checkpoint-00000003")
    out_dir = tmp_path / "exported"
    code, out, err = run_cli(capsys, "export", ckpt_dir, "-o", str(out_dir))
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["model.safetensors", "stats"]
    assert sorted(os.listdir(out_dir / "stats")) == ["rank-0.safetensors", "rank-1.safetensors"]
    model, _ = make_model(seed=0)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in load_file(out_dir / "model.safetensors").items())
    assert torch.equal(load_file(out_dir / "stats" / "rank-1.safetensors")["hist"], torch.arange(3) + 10)
    assert "left out components without tensors: progress" in out
    code, _, err = run_cli(capsys, "export", ckpt_dir, "--component", "progress", "-o", str(tmp_path / "p.safetensors"))
    assert code == 2 and "component 'progress'" in err and "holds no tensors" in err
    assert not (tmp_path / "p.safetensors").exists()


def test_paths_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path, capsys):
    coord = CheckpointCoordinator(tmp_path)
    _save(coord, 1)
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and "nope does not exist" in err and "checkpoint_manifest.json" not in err
    manifest = str(tmp_path / "checkpoint-00000001" / "checkpoint_manifest.json")
    code, _, err = run_cli(capsys, "ls", manifest)
    assert code == 2 and "is a checkpoint's manifest file, not a run directory" in err
    code, out, _ = run_cli(capsys, "inspect", manifest)  # inspect takes a checkpoint's manifest file for its folder
    assert code == 0 and "checkpoint-00000001" in out
