"""Loading at another world size: shared state moves freely; per-rank state is refused clearly."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from tests.support.distributed import expect_ok, failures, run_ranks
from tests.support.workers import Box, make_model, rich_state, same


def _save_at_four(rank: int, world: int, run_dir: str) -> None:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    model, opt = make_model()
    CheckpointCoordinator(run_dir, process_groups={"dp": groups[rank // 2]}, timeout=60).save(1, [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        StateComponent("global", Box(rich_state(0)), SharingPattern.GLOBAL),
        StateComponent("stage", Box(rich_state(10 + rank // 2)), SharingPattern.PER_GROUP, process_group_name="dp"),
        StateComponent("rng", Box({"r": rank}), SharingPattern.PER_RANK),
    ])


def _load_at_two(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": [0, 1]}, timeout=60)
    model, opt = make_model(seed=5)
    shared = [StateComponent("model", model, SharingPattern.REPLICATED),
              StateComponent("optimizer", opt, SharingPattern.REPLICATED),
              StateComponent("global", Box({}), SharingPattern.GLOBAL),
              StateComponent("stage", Box({}), SharingPattern.PER_GROUP, process_group_name="dp")]
    try:
        coord.load([*shared, StateComponent("rng", Box({}), SharingPattern.PER_RANK)])
    except Exception as exc:
        per_rank_error = f"{type(exc).__name__}: {exc}"
    else:
        per_rank_error = None
    result = coord.load(shared, strict=False)
    ref_model, ref_opt = make_model()
    return {"per_rank_error": per_rank_error, "not_requested": list(result.not_requested),
            "equal": [same(ref_model.state_dict(), model.state_dict()), same(ref_opt.state_dict(), opt.state_dict()),
                      same(rich_state(0), shared[2].stateful.state), same(rich_state(10), shared[3].stateful.state)]}


def test_saved_at_four_loads_at_two(tmp_path):
    expect_ok(run_ranks(4, _save_at_four, str(tmp_path)))
    for res in expect_ok(run_ranks(2, _load_at_two, str(tmp_path))):
        assert res["equal"] == [True] * 4
        assert res["not_requested"] == ["rng"]
        assert "component 'rng' is PER_RANK and was saved by 4 ranks; this job has 2" in res["per_rank_error"]


def _load_group_that_no_longer_exists(rank: int, world: int, run_dir: str) -> None:
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": [rank]}, timeout=60)
    coord.load([StateComponent("stage", Box({}), SharingPattern.PER_GROUP, process_group_name="dp")], strict=False)


def test_per_group_with_a_changed_layout_is_refused_clearly(tmp_path):
    expect_ok(run_ranks(4, _save_at_four, str(tmp_path)))
    bad = failures(run_ranks(2, _load_group_that_no_longer_exists, str(tmp_path)))
    assert sorted(bad) == [0, 1]
    assert "this rank's group (0,) is not one of the saved groups" in bad[0].message
    assert "component 'stage'" in bad[0].message


def test_saved_at_four_loads_in_one_process(tmp_path):
    expect_ok(run_ranks(4, _save_at_four, str(tmp_path)))
    model, opt = make_model(seed=5)
    CheckpointCoordinator(tmp_path).load([StateComponent("model", model, SharingPattern.REPLICATED),
                                          StateComponent("optimizer", opt, SharingPattern.REPLICATED)], strict=False)
    ref_model, ref_opt = make_model()
    assert same(ref_model.state_dict(), model.state_dict()) and same(ref_opt.state_dict(), opt.state_dict())
    assert torch.equal(ref_model[0].weight, model[0].weight)


def _save_per_node_at_four(rank: int, world: int, run_dir: str) -> None:
    with CheckpointCoordinator(run_dir, timeout=60) as coord:  # LOCAL_WORLD_SIZE=2: 2 nodes of 2 ranks
        coord.save(1, [StateComponent("cache", Box({"node": torch.tensor([rank // 2])}), SharingPattern.PER_NODE),
                       StateComponent("model", Box({"w": torch.ones(4)}), SharingPattern.REPLICATED)])


def _load_per_node_at_two(rank: int, world: int, run_dir: str) -> dict:
    out = {}
    for local_world in (1, 2):  # 2 nodes of 1 rank, then 1 node of 2 ranks
        cache, model = Box({"node": torch.tensor([-1])}), Box({})
        with CheckpointCoordinator(run_dir, timeout=60, local_world_size=local_world) as coord:
            try:
                coord.load([StateComponent("cache", cache, SharingPattern.PER_NODE),
                            StateComponent("model", model, SharingPattern.REPLICATED)], strict=False)
                out[local_world] = {"type": None}
            except Exception as exc:
                out[local_world] = {"type": type(exc).__name__, "message": str(exc)}
        out[local_world].update(cache=cache.state["node"].tolist(), model=model.state)
    return out


def test_per_node_with_a_changed_node_layout_is_refused_clearly(tmp_path):
    """Without reshard, a rank must never get another node's copy (nor a vague 'no copy for this rank')."""
    expect_ok(run_ranks(4, _save_per_node_at_four, str(tmp_path), env={"LOCAL_WORLD_SIZE": 2}))
    for res in expect_ok(run_ranks(2, _load_per_node_at_two, str(tmp_path))):
        for local_world, now in ((1, "2 nodes of 1 rank"), (2, "1 node of 2 ranks")):
            out = res[local_world]
            assert out["type"] == "CheckpointError", (local_world, out)
            assert "component 'cache' is PER_NODE and was saved by 2 nodes of 2 ranks" in out["message"], out
            assert f"this job has {now}" in out["message"] and "reshard=True" in out["message"], out
            assert out["cache"] == [-1] and out["model"] == {}, "nothing was applied"
