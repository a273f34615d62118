"""A component declared SHARDED whose checkpoint holds per-rank, per-group or per-node copies (or the reverse) is
refused on every rank before anything is applied, with a message that says what was saved and what to do."""

from __future__ import annotations

import pytest
import torch

from ckpt import CheckpointCoordinator, CheckpointError, SharingPattern, StateComponent
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box, same


def _saved_per_rank_loaded_sharded(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    coord.save(1, [StateComponent("model", Box({"w": torch.full((4,), float(rank))}), SharingPattern.PER_RANK)])
    live = Box({"w": torch.full((4,), -1.0)})
    before = {"w": live.state["w"].clone()}
    try:
        coord.load([StateComponent("model", live, SharingPattern.SHARDED)])
    except CheckpointError as exc:
        error = str(exc)
    else:
        error = None
    coord.close()
    return {"error": error, "untouched": same(before, live.state)}


def test_per_rank_copies_declared_sharded_are_refused_on_every_rank(tmp_path):
    results = expect_ok(run_ranks(2, _saved_per_rank_loaded_sharded, str(tmp_path)))
    assert len({r["error"] for r in results}) == 1, "one error, the same on every rank"
    error = results[0]["error"]
    assert error is not None
    assert "component 'model' is declared SHARDED but the checkpoint saved it PER_RANK (one copy per rank)" in error
    assert "Load it as PER_RANK" in error and "strict=False" not in error  # its own advice, not the keys' advice
    assert all(r["untouched"] for r in results)


@pytest.mark.parametrize("declared", [SharingPattern.PER_RANK, SharingPattern.PER_NODE])
def test_sharded_state_declared_per_copy_is_refused_and_nothing_changes(tmp_path, declared):
    with CheckpointCoordinator(tmp_path) as coord:
        coord.save(1, [StateComponent("model", Box({"w": torch.ones(4)}), SharingPattern.SHARDED)])
        live = Box({"w": torch.zeros(4)})
        with pytest.raises(CheckpointError) as info:
            coord.load([StateComponent("model", live, declared)])
    assert f"component 'model' is declared {declared.name}" in str(info.value)
    assert "saved it SHARDED" in str(info.value) and "declare it SHARDED" in str(info.value)
    assert torch.equal(live.state["w"], torch.zeros(4))


def test_whole_tensors_still_load_as_shards_and_back(tmp_path):
    with CheckpointCoordinator(tmp_path) as coord:
        coord.save(1, [StateComponent("model", Box({"w": torch.arange(4.0)}), SharingPattern.REPLICATED)])
        live = Box({"w": torch.zeros(4)})
        coord.load([StateComponent("model", live, SharingPattern.SHARDED)])
    assert torch.equal(live.state["w"], torch.arange(4.0))
