"""Every sharing pattern saved and loaded back bit for bit on real gloo ranks (world sizes 1, 2 and 4)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box, RNGState, draw, make_model, rich_state, same, snapshot


def _components(rank: int, world: int, dispatch: bool):
    model, opt = make_model(seed=0)  # identical on every rank: REPLICATED
    node = rank // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    group_idx = rank // 2
    torch.manual_seed(100 + rank)
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    return [
        StateComponent("model", model, SharingPattern.REPLICATED, validation_level=ValidationLevel.TENSOR),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("per_rank", Box(rich_state(rank)), SharingPattern.PER_RANK),
        # GLOBAL: every rank holds a different value; all must load rank 0's.
        StateComponent("global", Box(rich_state(50 + rank)), SharingPattern.GLOBAL),
        StateComponent("dataset", Box({"pos": torch.tensor([7 + rank])}),
                       lambda: SharingPattern.GLOBAL if dispatch else SharingPattern.PER_RANK),
        StateComponent("stage", Box(rich_state(200 + group_idx)), SharingPattern.PER_GROUP, process_group_name="dp"),
        StateComponent("cache", Box(rich_state(300 + node)), SharingPattern.PER_NODE, required=False),
    ]


def _pairs(world: int) -> list[list[int]]:
    """Ranks two by two (a world of one is one group of one)."""
    return [list(range(r, min(r + 2, world))) for r in range(0, world, 2)]


def _roundtrip(rank: int, world: int, run_dir: str, dispatch: bool) -> dict:
    groups = [dist.new_group(pair) for pair in _pairs(world)]  # every rank creates every group
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": groups[rank // 2]}, timeout=60)
    comps = _components(rank, world, dispatch)
    saved = {c.key: snapshot(c.stateful) for c in comps if c.key != "rng"}
    path = coord.save(step=100, components=comps, metrics={"loss": 2.31})
    after_save = draw()

    # Wreck every live value, then load into fresh objects where the class allows it.
    fresh_model, fresh_opt = make_model(seed=99)
    loaded = [
        StateComponent("model", fresh_model, SharingPattern.REPLICATED),
        StateComponent("optimizer", fresh_opt, SharingPattern.REPLICATED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        *[StateComponent(c.key, Box({}), c.sharing_pattern, process_group_name=c.process_group_name,
                         required=c.required) for c in comps[3:]],
    ]
    torch.manual_seed(12345)
    result = coord.load(loaded, checkpoint="latest")
    after_load = draw()
    expected_global = rich_state(50)  # rank 0's value
    checks = {
        "model": same(saved["model"], fresh_model.state_dict()),
        "optimizer": same(saved["optimizer"], fresh_opt.state_dict()),
        "rng": after_save == after_load,
        "per_rank": same(saved["per_rank"], loaded[3].stateful.state),
        "global": same(expected_global, loaded[4].stateful.state),
        "dataset": same({"pos": torch.tensor([7 if dispatch else 7 + rank])}, loaded[5].stateful.state),
        "stage": same(saved["stage"], loaded[6].stateful.state),
        "cache": same(saved["cache"], loaded[7].stateful.state),
    }
    return {"checks": checks, "path": path, "step": result.step, "loaded": list(result.loaded),
            "metrics": result.metrics}


# World size 1 runs with torch.distributed initialised (gloo): the coordinator must not need a peer.
@pytest.mark.parametrize("world,local_world,dispatch", [(1, 1, True), (2, 2, True), (4, 2, False), (4, 2, True)])
def test_every_pattern_round_trips_bit_for_bit(tmp_path, world, local_world, dispatch):
    results = expect_ok(run_ranks(world, _roundtrip, str(tmp_path), dispatch, env={"LOCAL_WORLD_SIZE": local_world}))
    for rank, res in enumerate(results):
        assert res["checks"] == dict.fromkeys(res["checks"], True), f"rank {rank}: {res['checks']}"
        assert res["step"] == 100 and res["metrics"] == {"loss": 2.31}
    manifest = json.loads((tmp_path / "checkpoint-00000100" / "checkpoint_manifest.json").read_text())
    comps = manifest["components"]
    assert manifest["topology"] == {"world_size": world, "num_nodes": world // local_world,
                                    "local_world_size": local_world,
                                    "process_groups": {"dp": _pairs(world)}}
    assert comps["dataset"]["pattern"] == ("global" if dispatch else "per_rank")
    assert {f["writer_rank"] for f in comps["global"]["files"]} == {0}
    assert {f["owner"] for f in comps["rng"]["files"]} == set(range(world))
    # PER_NODE: local rank 0 of each node writes its node's copy.
    assert {(f["owner"], f["writer_rank"]) for f in comps["cache"]["files"]} == {
        (n, n * local_world) for n in range(world // local_world)}
    # PER_GROUP: one copy per group, written only by that group's members.
    for f in comps["stage"]["files"]:
        assert f["writer_rank"] in comps["stage"]["replica_sets"][f["owner"]]
    assert len({f["owner"] for f in comps["stage"]["files"]}) == len(_pairs(world))


def _split_writes(rank: int, world: int, run_dir: str) -> None:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    torch.manual_seed(0)
    big = {f"w{i}": torch.randn(256, 64 + 8 * (i % 5)) for i in range(24)}  # identical on every rank
    coord.save(step=1, components=[StateComponent("model", Box(big), SharingPattern.REPLICATED)])


def test_replicated_tensors_are_split_evenly_across_four_writers(tmp_path):
    expect_ok(run_ranks(4, _split_writes, str(tmp_path)))
    manifest = json.loads((tmp_path / "checkpoint-00000001" / "checkpoint_manifest.json").read_text())
    files = [f for f in manifest["components"]["model"]["files"] if f["kind"] == "tensors"]
    by_rank = {f["writer_rank"]: f["nbytes"] for f in files}
    assert sorted(by_rank) == [0, 1, 2, 3]
    total = sum(by_rank.values())
    for rank, nbytes in by_rank.items():
        assert 0.22 <= nbytes / total <= 0.28, f"rank {rank} wrote {nbytes / total:.1%} of the tensor bytes"


def _dominant_tensor(rank: int, world: int, run_dir: str) -> bool:
    gen = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(4096, 4096, generator=gen), "head.bias": torch.randn(16, generator=gen)}
    coord = CheckpointCoordinator(run_dir, timeout=60)
    coord.save(step=1, components=[StateComponent("model", Box(state), SharingPattern.REPLICATED)])
    target = Box({"embed.weight": torch.zeros(4096, 4096), "head.bias": torch.zeros(16)})
    coord.load([StateComponent("model", target, SharingPattern.REPLICATED)], in_place=rank % 2 == 0)
    return all(torch.equal(target.state[k], v) for k, v in state.items())


def test_one_dominant_tensor_is_split_across_writers(tmp_path):
    assert expect_ok(run_ranks(4, _dominant_tensor, str(tmp_path))) == [True] * 4
    manifest = json.loads((tmp_path / "checkpoint-00000001" / "checkpoint_manifest.json").read_text())
    files = [f for f in manifest["components"]["model"]["files"] if f["kind"] == "tensors"]
    share = {f["writer_rank"]: f["nbytes"] for f in files}
    total = sum(share.values())
    assert sorted(share) == [0, 1, 2, 3] and max(share.values()) / total < 0.27, share
    chunks = [t["chunk"] for f in files for t in f["tensors"] if t["name"] == "embed.weight"]
    assert len(chunks) == 4 and all(c["shape"] == [4096, 4096] for c in chunks)

    from safetensors.torch import load_file

    from ckpt.cli import main as ckpt_main

    out = tmp_path / "model.safetensors"
    assert ckpt_main(["export", str(tmp_path / "checkpoint-00000001"), "--component", "model", "-o", str(out)]) == 0
    exported = load_file(str(out))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(exported["embed.weight"], torch.randn(4096, 4096, generator=gen))
