"""ckpt's resharded load: merging saved copies, assembling shard entries, and the errors when it cannot."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    SharingPattern,
    StateComponent,
    local_piece,
    shard_entry,
)
from ckpt.load.reshard import merge_copies
from tests.support.distributed import expect_ok, failures, run_ranks
from tests.support.workers import Box

FULL = torch.arange(48, dtype=torch.float32).reshape(6, 8)


def _rows(index: int, count: int) -> dict:
    """Shard `index` of `count` of FULL along dim 0, as a shard entry."""
    size = FULL.shape[0] // count
    return shard_entry(FULL[index * size:(index + 1) * size].clone(), [index * size, 0], list(FULL.shape))


def test_merge_assembles_shards_and_unions_names():
    copies = {0: {"w": _rows(0, 2), "step": torch.tensor(3.0), "only0": 1},
              1: {"w": _rows(1, 2), "step": torch.tensor(3.0), "only1": [2]}}
    merged = merge_copies("model", copies)
    assert torch.equal(merged["w"]["local"], FULL) and merged["w"]["offsets"] == [0, 0]
    assert merged["only0"] == 1 and merged["only1"] == [2] and float(merged["step"]) == 3.0
    # Cutting this rank's piece out of the assembled tensor, for a new shard count.
    assert torch.equal(local_piece(merged["w"], [2, 0], [2, 8]), FULL[2:4])
    # The same layout: the entry's own piece is given back as is.
    assert torch.equal(local_piece(_rows(1, 2), [3, 0], [3, 8]), FULL[3:6])


def test_merge_refuses_what_cannot_be_merged():
    with pytest.raises(CheckpointError, match=r"component 'rng' cannot be resharded: key 'torch' differs between "
                                              r"the saved copies of rank 0 and rank 1"):
        merge_copies("rng", {0: {"torch": torch.tensor([1])}, 1: {"torch": torch.tensor([2])}})
    with pytest.raises(CheckpointError, match="covering 24 of the 48 elements"):
        merge_copies("model", {0: {"w": _rows(0, 2)}, 1: {"w": _rows(0, 2)}, 2: {"other": 1}})
    bad = _rows(1, 2)
    bad["local"] = bad["local"] + 1
    with pytest.raises(CheckpointError, match="saved twice for the same elements"):
        merge_copies("model", {0: {"w": _rows(1, 2)}, 1: {"w": bad}, 2: {"w": _rows(0, 2)}})
    with pytest.raises(CheckpointError, match="overlap without being the same piece"):
        merge_copies("model", {0: {"w": _rows(0, 2)}, 1: {"w": _rows(1, 3)}})
    with pytest.raises(ValueError, match=r"needs elements 0\.\.3 of dim 0, but the checkpoint gives 3\.\.6"):
        local_piece(_rows(1, 2), [0, 0], [3, 8])
    with pytest.raises(ValueError, match="runs past the global shape"):
        shard_entry(torch.zeros(4, 8), [3, 0], [6, 8])


def _save(rank: int, world: int, run_dir: str) -> None:
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # one group per "tp rank" (rank % 2)
    tp = rank % 2
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": groups[tp]}, timeout=60)
    coord.save(1, [
        StateComponent("model", Box({"w": _rows(tp, 2), "bias": torch.ones(3)}), SharingPattern.PER_GROUP,
                       process_group_name="dp"),
        StateComponent("stage", Box({f"layer{rank}.weight": torch.full((2,), float(rank))}), SharingPattern.PER_RANK),
        StateComponent("rng", Box({"seed": torch.tensor([rank])}), SharingPattern.PER_RANK),
    ])


def _load(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": [rank]}, timeout=60)
    model, stage = Box({}), Box({})
    result = coord.load([StateComponent("model", model, SharingPattern.PER_GROUP, process_group_name="dp"),
                         StateComponent("stage", stage, SharingPattern.PER_RANK)], reshard=True, strict=False)
    try:
        coord.load([StateComponent("rng", Box({}), SharingPattern.PER_RANK)], reshard=True, strict=False)
        rng_error = None
    except CheckpointError as exc:
        rng_error = str(exc)
    size = FULL.shape[0] // world
    mine = local_piece(model.state["w"], [rank * size, 0], [size, FULL.shape[1]])
    return {"piece": torch.equal(mine, FULL[rank * size:(rank + 1) * size]),
            "bias": torch.equal(model.state["bias"], torch.ones(3)), "resharded": list(result.resharded),
            "stage": sorted(stage.state), "stage_values": [float(t[0]) for _, t in sorted(stage.state.items())],
            "rng_error": rng_error}


def _load_without_reshard(rank: int, world: int, run_dir: str) -> None:
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": [rank]}, timeout=60)
    coord.load([StateComponent("model", Box({}), SharingPattern.PER_GROUP, process_group_name="dp")], strict=False)


def test_per_group_shards_and_per_rank_names_load_at_another_world_size(tmp_path):
    expect_ok(run_ranks(4, _save, str(tmp_path)))
    for world in (1, 3):
        for res in expect_ok(run_ranks(world, _load, str(tmp_path))):
            assert res["piece"] and res["bias"], res
            assert res["resharded"] == ["model", "stage"]
            assert res["stage"] == [f"layer{r}.weight" for r in range(4)] and res["stage_values"] == [0, 1, 2, 3]
            assert "component 'rng' cannot be resharded: key 'seed' differs" in res["rng_error"]
    bad = failures(run_ranks(2, _load_without_reshard, str(tmp_path)))
    assert sorted(bad) == [0, 1] and "pass reshard=True" in bad[0].message


def test_mesh_shapes_for_inspect():
    from ckpt.load.reshape import mesh_groups, mesh_picture, parse_shape

    assert mesh_groups([("dp", 2), ("tp", 2)]) == {"dp": [(0, 2), (1, 3)], "tp": [(0, 1), (2, 3)]}
    assert mesh_groups([("dp", 4), ("tp", 2)])["dp"] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert mesh_picture([("dp", 2), ("pp", 2)]).splitlines() == ["     pp0 pp1", "dp0    0   1", "dp1    2   3"]
    assert parse_shape("dp=1, tp=2") == [("dp", 1), ("tp", 2)]
    with pytest.raises(ValueError, match="name=size pairs"):
        parse_shape("dp:2")



# ---- the same ranks forming another group: at dp=1 the dp groups are single ranks, whatever tp is ------------

GRID = torch.arange(32, dtype=torch.float32).reshape(4, 8)  # rows split evenly over 1, 2 or 4 tp ranks


def _grid_rows(index: int, count: int) -> dict:
    size = GRID.shape[0] // count
    return shard_entry(GRID[index * size:(index + 1) * size].clone(), [index * size, 0], list(GRID.shape))


def _dp1_groups(rank: int, world: int) -> dict:
    return {"dp": [rank], "tp": list(range(world))}


def _save_dp1(rank: int, world: int, run_dir: str) -> None:
    """(dp=1, tp=world): dp group (rank,) holds tp shard `rank`; "owner" is a plain value that differs per group."""
    coord = CheckpointCoordinator(run_dir, process_groups=_dp1_groups(rank, world), timeout=60)
    coord.save(1, [StateComponent("model", Box({"w": _grid_rows(rank, world)}), SharingPattern.PER_GROUP,
                                  process_group_name="dp"),
                   StateComponent("owner", Box({"tp_rank": rank}), SharingPattern.PER_GROUP, process_group_name="dp")])


def _load_dp1(rank: int, world: int, run_dir: str) -> dict:
    """(dp=1, tp=world) with fewer ranks than the save: this rank's dp group (rank,) is among the saved ones."""
    coord = CheckpointCoordinator(run_dir, process_groups=_dp1_groups(rank, world), timeout=60)
    model, owner = Box({}), Box({})
    result = coord.load([StateComponent("model", model, SharingPattern.PER_GROUP, process_group_name="dp")],
                        reshard=True, strict=False)
    try:
        coord.load([StateComponent("owner", owner, SharingPattern.PER_GROUP, process_group_name="dp")],
                   reshard=True, strict=False)
        owner_out = f"loaded {owner.state}"
    except CheckpointError as exc:
        owner_out = str(exc)
    size = GRID.shape[0] // world
    piece = local_piece(model.state["w"], [rank * size, 0], [size, GRID.shape[1]])
    return {"resharded": list(result.resharded), "piece": torch.equal(piece, GRID[rank * size:(rank + 1) * size]),
            "owner": owner_out}


@pytest.mark.parametrize(("saved_tp", "new_tp"), [(2, 1), (4, 2)])
def test_per_group_reshards_when_a_saved_group_now_means_another(tmp_path, saved_tp, new_tp):
    """(dp=1, tp=2) -> one rank, (dp=1, tp=4) -> (dp=1, tp=2): this rank's dp group is among the saved groups but
    held only one tp shard; the load must merge every group's copy instead of reading that one."""
    from ckpt.cli.inspection import open_checkpoint
    from ckpt.load.reshape import load_plan

    expect_ok(run_ranks(saved_tp, _save_dp1, str(tmp_path)))
    for res in expect_ok(run_ranks(new_tp, _load_dp1, str(tmp_path))):
        assert res["resharded"] == ["model"] and res["piece"], res
        # A plain per-group value that differs between the saved groups has no place in the new layout: an
        # error, not the copy of whichever saved group has this rank's members.
        assert "component 'owner' cannot be resharded: key 'tp_rank' differs between the saved copies of group 0 " \
               "and group 1" in res["owner"], res["owner"]
    manifest = open_checkpoint(str(tmp_path / "checkpoint-00000001")).manifest
    plan = {c["key"]: c["action"] for c in load_plan(manifest, [("dp", 1), ("tp", new_tp)])}
    assert plan["model"] == "reshard=True: 1 tensors reassembled from their saved shards", plan
    assert plan["owner"].startswith("reshard=True: every copy's values are merged by key"), plan
    same = {c["key"]: c["action"] for c in load_plan(manifest, [("dp", 1), ("tp", saved_tp)])}
    assert same == {"model": "each group reads its saved copy", "owner": "each group reads its saved copy"}, same
