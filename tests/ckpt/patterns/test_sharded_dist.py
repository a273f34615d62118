"""SHARDED on real gloo ranks: FSDP2 and 2-D meshes saved shard by shard and loaded exactly at other world
sizes and layouts, with no flags; each rank reads only the bytes its own shards need."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ckpt import SerializationError, read_manifest
from ckpt.format.tensor_io import ST_TO_DTYPE
from ckpt.patterns.boxes import Box, whole
from ckpt.patterns.sharded import Target, plan_reads
from tests.support.distributed import expect_ok, run_ranks
from tests.support.sharded import load_worker, refuse_worker, save_worker


def _same(saved: dict, loaded: dict) -> None:
    for name, value in saved.items():
        if "/" in name and name not in loaded:  # optimizer state, not loaded by a 2-D model
            continue
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value), name
    assert loaded["extra"]["epoch"] == 3 and loaded["extra"]["name"] == "run"
    assert np.array_equal(loaded["extra"]["table"], np.arange(6.0, dtype=np.float32))


def _roundtrip(tmp_path, save: tuple[int, str], loads: list[tuple[int, str]], form: str = "index",
               async_save: bool = False) -> None:
    run_dir = str(tmp_path / "run")
    saved = expect_ok(run_ranks(save[0], save_worker, run_dir, save[1], form, async_save))
    for rank_values in saved[1:]:  # every rank saw the same full values
        assert all(np.array_equal(rank_values[k], saved[0][k]) for k in saved[0])
    for world, layout in loads:
        optim = "2d" not in (save[1], layout)
        for loaded in expect_ok(run_ranks(world, load_worker, run_dir, layout, form, optim)):
            _same(saved[0], loaded)


def test_fsdp_two_ranks_to_plain_one_rank_and_to_four(tmp_path):
    _roundtrip(tmp_path, (2, "fsdp"), [(1, "plain"), (4, "fsdp")])


def test_plain_one_rank_to_fsdp_two_ranks_by_name(tmp_path):
    _roundtrip(tmp_path, (1, "plain"), [(2, "fsdp")], form="fqn")


def test_async_fsdp_save_loads_exactly(tmp_path):
    _roundtrip(tmp_path, (2, "fsdp"), [(1, "plain")], form="fqn", async_save=True)


@pytest.mark.slow
def test_fsdp_four_to_two_by_name(tmp_path):
    _roundtrip(tmp_path, (4, "fsdp"), [(2, "fsdp")], form="fqn")


@pytest.mark.slow
def test_2d_mesh_to_1d_and_back(tmp_path):
    _roundtrip(tmp_path / "a", (4, "2d"), [(2, "fsdp"), (1, "plain")])
    _roundtrip(tmp_path / "b", (2, "fsdp"), [(4, "2d")])


def test_manifest_pieces_and_reads_only_own_bytes(tmp_path):
    run_dir = str(tmp_path / "run")
    expect_ok(run_ranks(2, save_worker, run_dir, "fsdp", "index"))
    manifest = read_manifest(os.path.join(run_dir, "checkpoint-00000001"))
    model = manifest.components["model"]
    assert manifest.format_version == 3 and model.tensors is not None
    w = model.tensors["0.weight"]
    assert w.shape == (7, 5) and w.dtype == "F32"
    # FSDP2 puts rows 0..3 on rank 0 and 4..6 on rank 1; each wrote its own rows, once.
    assert sorted((p.offsets, p.lengths) for p in w.pieces) == [((0, 0), (4, 5)), ((4, 0), (3, 5))]
    assert {p.file for p in w.pieces} == {"model/shards-rank-00000.safetensors", "model/shards-rank-00001.safetensors"}
    # The plain tensor of the extra component is written once (split across holders only when large).
    assert len(manifest.components["extra"].tensors["table"].pieces) == 1
    # A rank of 4 needs rows 2..3 of 0.weight (FSDP2's split of 7 rows: 2, 2, 2, 1): exactly its bytes.
    target = Box((2, 0), (2, 5))
    reads = plan_reads("model", model.tensors, {"0.weight": Target(target)})
    assert sum(r.end - r.begin for r in reads) == target.numel * 4
    # The whole tensor needs every saved byte of it, no more.
    reads = plan_reads("model", model.tensors, {"0.weight": Target(whole((7, 5)))})
    assert sum(r.end - r.begin for r in reads) == 35 * ST_TO_DTYPE["F32"].itemsize


def test_dtensor_in_another_pattern_is_refused_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    results = run_ranks(2, refuse_worker, str(run_dir))
    for r in results:
        assert r.type_name == SerializationError.__name__
        assert "component 'model', key '0.weight' is a DTensor" in r.message and "SHARDED" in r.message
    assert not [n for n in os.listdir(run_dir) if n.startswith("checkpoint-")]


@pytest.mark.parametrize("world", [2])
def test_plain_tensors_of_a_sharded_component_are_checked_as_replicas(tmp_path, world):
    results = run_ranks(world, _drifted_worker, str(tmp_path / "run"))
    assert all(r.type_name == "ReplicationError" and "'table'" in r.message for r in results)


def _drifted_worker(rank: int, world: int, run_dir: str) -> None:
    from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
    from tests.support.workers import Box as Plain  # not ckpt.patterns.boxes.Box

    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, [StateComponent("extra", Plain({"table": torch.arange(3.0) + rank}), SharingPattern.SHARDED)])


def test_cli_export_diff_and_inspect_across_shardings(tmp_path, capsys):
    from safetensors.torch import load_file

    from ckpt.cli import main

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    saved = expect_ok(run_ranks(2, save_worker, a, "fsdp", "fqn"))[0]
    expect_ok(run_ranks(1, save_worker, b, "plain", "fqn"))
    ca, cb = os.path.join(a, "checkpoint-00000001"), os.path.join(b, "checkpoint-00000001")
    # The same weights saved by 2 FSDP2 ranks and by 1 plain rank: no differences, by value.
    capsys.readouterr()
    assert main(["diff", ca, cb, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical"], [c for c in report["components"] if c["status"] != "same"]
    # Export reassembles the full tensors under their real names.
    out = str(tmp_path / "model.safetensors")
    assert main(["export", ca, "--component", "model", "-o", out]) == 0
    exported = load_file(out)
    assert sorted(exported) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(np.array_equal(exported[k].numpy(), saved[k]) for k in exported)
    # The Hugging Face layout too: full tensors by name, in shards with an index when over --max-shard-size.
    hf = str(tmp_path / "hf")
    assert main(["export", ca, "--format", "hf", "--component", "model", "--max-shard-size", "100", "-o", hf]) == 0
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name, shard in weight_map.items():
        assert np.array_equal(load_file(os.path.join(hf, shard))[name].numpy(), saved[name])
    pt = str(tmp_path / "model.pt")
    assert main(["export", ca, "--format", "torch", "--component", "model", "-o", pt]) == 0
    whole = torch.load(pt, weights_only=True)
    assert sorted(whole) == sorted(weight_map) and all(np.array_equal(whole[k].numpy(), saved[k]) for k in whole)
    # inspect --at world=4 names the byte ranges each rank reads: from the one saved rank that holds its rows
    # (these pieces are smaller than a digest block, so a rank reads its saved rank's pieces whole to check them).
    capsys.readouterr()
    assert main(["inspect", ca, "--at", "world=4", "--json"]) == 0
    plan = {c["key"]: c for c in json.loads(capsys.readouterr().out)["load_at"]["components"]}
    reads = plan["model"]["reads"]
    files = [f"model/shards-rank-0000{r}.safetensors" for r in (0, 0, 1, 1)]
    assert [list(r["ranges"]) for r in reads] == [[f] for f in files]
    assert all(r["target_bytes"] <= r["read_bytes"] for r in reads)
    assert main(["inspect", ca, "--at", "world=1"]) == 0
    assert "bytes each rank reads" in capsys.readouterr().out


def test_sigkill_during_a_sharded_save_leaves_the_previous_latest(tmp_path):
    from ckpt import CheckpointCoordinator, LocalStorage, SharingPattern, StateComponent, list_checkpoints
    from ckpt.testing import SIGKILL, Fault
    from tests.support.distributed import failures
    from tests.support.sharded import build, full_values, killed_worker

    run_dir = str(tmp_path / "run")
    fault = Fault(op="write_file", match="shards-rank-00001", rank=1, error=SIGKILL)
    bad = failures(run_ranks(2, killed_worker, run_dir, fault, timeout=120))
    assert bad[1].type_name == "RankDied" and "SIGKILL" in bad[1].message
    assert "rank 1" in bad[0].message
    assert [r.step for r in list_checkpoints(LocalStorage(), run_dir)] == [10]
    # The previous latest loads exactly into a plain model in one process.
    model = build("plain", seed=5)
    with CheckpointCoordinator(run_dir) as coord:
        assert coord.load([StateComponent("model", model, SharingPattern.SHARDED)]).step == 10
    expected = full_values(build("plain", seed=0), None)
    assert all(np.array_equal(v, expected[k]) for k, v in full_values(model, None).items())


def test_a_shard_held_by_several_ranks_is_checked_across_them(tmp_path):
    from tests.support.sharded import drifted_2d_worker

    results = run_ranks(4, drifted_2d_worker, str(tmp_path / "run"))
    for r in results:
        assert r.type_name == "ReplicationError", r
        assert "'0.weight' (ranks [2])" in r.message and "Nothing was saved" in r.message
