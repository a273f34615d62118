"""`ckpt export --format hf|torch|dcp` of checkpoints written by 4 real gloo ranks: four pipeline stages
(PER_RANK), DP x TP (PER_GROUP shard entries, each TP shard held by two data-parallel groups), and a REPLICATED
model whose largest tensor was cut into element ranges written by different ranks. Each export is the full
model, under its real names, equal to what the job trained."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, read_manifest
from ckpt.cli import main
from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import run
from tests.support.toys import plain
from tests.support.workers import Box

BIG = 9 << 20  # float32 elements (36 MiB): over 2 x the planner's smallest chunk, so it is cut across writers


def _parallel(rank: int, world: int, cfg: dict, run_dir: str) -> dict:
    torch.set_num_threads(1)
    return run(cfg, run_dir, total=4)["model"]


@pytest.mark.parametrize("cfg", [{"kind": "pipeline", "schedule": "gpipe", "micro": 4},
                                 {"kind": "tp", "dp": 2, "size": 2}], ids=["pipeline-4-stages", "dp2-x-tp2"])
def test_hf_export_reassembles_the_full_model_from_a_four_rank_job(tmp_path, cfg):
    per_rank = expect_ok(run_ranks(4, _parallel, cfg, str(tmp_path / "run"), timeout=400))
    whole = {name: t for model in per_rank for name, t in model.items()}  # each stage's names, or full TP tensors
    ck = str(tmp_path / "run" / "checkpoint-00000004")
    pattern = read_manifest(ck).components["model"].pattern
    assert pattern is (SharingPattern.PER_RANK if cfg["kind"] == "pipeline" else SharingPattern.SHARDED)
    out = tmp_path / "hf"
    assert main(["export", ck, "--format", "hf", "-o", str(out)]) == 0
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(whole)
    for name, t in whole.items():
        assert plain(exported[name]) == t, name


def _replicated(rank: int, world: int, run_dir: str) -> None:
    torch.manual_seed(0)  # the same values on every rank, as DDP keeps them
    model = Box({"embed.weight": torch.randn(BIG), "head.weight": torch.randn(64, 8), "head.bias": torch.randn(64)})
    with CheckpointCoordinator(run_dir, timeout=120) as coord:
        coord.save(5, [StateComponent("model", model, SharingPattern.REPLICATED)])


def test_a_replicated_model_split_across_four_writers_exports_whole(tmp_path, capsys):
    expect_ok(run_ranks(4, _replicated, str(tmp_path / "run"), timeout=400))
    torch.manual_seed(0)
    expected = {"embed.weight": torch.randn(BIG), "head.weight": torch.randn(64, 8), "head.bias": torch.randn(64)}
    ck = str(tmp_path / "run" / "checkpoint-00000005")
    files = read_manifest(ck).components["model"].files
    writers = {f.writer_rank for f in files for t in f.tensors if t.name == "embed.weight"}
    assert len(writers) > 1, "the large tensor was meant to be cut across writers"
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", ck, "--format", "hf", "-o", str(out), "--max-shard-size", "1MB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert result["pattern"] == "replicated" and sorted(index["weight_map"]) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(load_file(str(out / index["weight_map"][name]))[name], value), name
    assert main(["export", ck, "--format", "torch", "--component", "model", "-o", str(tmp_path / "m.pt")]) == 0
    full = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(full[k], v) for k, v in expected.items())
    assert main(["export", ck, "--format", "dcp", "--component", "model", "-o", str(tmp_path / "dcp")]) == 0
    template = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp.load(template, checkpoint_id=str(tmp_path / "dcp"))
    assert all(torch.equal(template[k], v) for k, v in expected.items())
