"""Coordination between ranks at growing world sizes: a rank other than 0 exchanges the same bytes whatever the
world size, and a save's plan is reused only while no rank's declarations change (real gloo ranks)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box


def _components(rank: int, tensors: int = 4, extra_on: int | None = None) -> list[StateComponent]:
    comps = [StateComponent("model", Box({f"w{i}": torch.full((8,), float(i)) for i in range(tensors)}),
                            SharingPattern.REPLICATED),
             StateComponent("rng", Box({"seed": rank}), SharingPattern.PER_RANK),
             StateComponent("data", Box({"epoch": 1}), SharingPattern.GLOBAL)]
    if extra_on == rank:
        comps.append(StateComponent("extra", Box({"only": torch.tensor([rank])}), SharingPattern.PER_RANK,
                                    required=False))
    return comps


def _manifest(run_dir: str, step: int) -> dict:
    with open(os.path.join(run_dir, f"checkpoint-{step:08d}", "checkpoint_manifest.json")) as f:
        return json.load(f)


def _save_with_changes(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    last = world - 1
    # step 1: first plan; 2: same declarations; 3: a PER_RANK component added on the last rank only;
    # 4: the same as 3; 5: the planner's tensors change (a tensor more in the replicated model); 6: as at first.
    steps = {1: _components(rank), 2: _components(rank), 3: _components(rank, extra_on=last),
             4: _components(rank, extra_on=last), 5: _components(rank, tensors=5), 6: _components(rank)}
    generations, prepare_collectives = {}, {}
    for step, comps in steps.items():
        coord.comm.reset_stats()
        coord.save(step, comps)
        generations[step] = coord._plan.generation
        prepare_collectives[step] = coord.comm.stats["prepare"].collectives
    loaded = Box({})
    coord.load([StateComponent("extra", loaded, SharingPattern.PER_RANK, required=False)], checkpoint=3,
               strict=False)
    coord.close()
    return {"generations": generations, "prepare_collectives": prepare_collectives,
            "extra": loaded.state.get("only", torch.tensor([-1])).tolist()}


@pytest.mark.parametrize("world", [2, 4])
def test_plan_is_reused_until_a_rank_changes_its_declarations(tmp_path, world):
    results = expect_ok(run_ranks(world, _save_with_changes, str(tmp_path)))
    for res in results:
        # Every rank holds the same plan after each save: new at 1, 3, 5, 6; reused at 2 and 4.
        assert res["generations"] == {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 4}, res
        # A reused plan sends no files to anyone (one collective fewer: the scatter).
        counts = res["prepare_collectives"]
        assert counts[2] == counts[4] == counts[1] - 1 and counts[3] == counts[5] == counts[6] == counts[1], res
    # The change on one rank reached the plan: its new component was written, recorded, and loads back there.
    files = {f["path"]: f["writer_rank"] for f in _manifest(str(tmp_path), 3)["components"]["extra"]["files"]}
    assert set(files.values()) == {world - 1}, files
    assert "extra" not in _manifest(str(tmp_path), 6)["components"]
    assert [r["extra"] for r in results] == [[-1]] * (world - 1) + [[world - 1]]
    # The planner's new tensor is in the plan made for step 5, and gone again at step 6.
    names = {t["name"] for f in _manifest(str(tmp_path), 5)["components"]["model"]["files"] for t in f["tensors"]}
    assert names == {f"w{i}" for i in range(5)}, names
    names = {t["name"] for f in _manifest(str(tmp_path), 6)["components"]["model"]["files"] for t in f["tensors"]}
    assert names == {f"w{i}" for i in range(4)}, names


def _phase_bytes(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    out = {}
    for op, call in (("save", lambda: coord.save(1, _components(rank))),
                     ("save again", lambda: coord.save(2, _components(rank))),
                     ("load", lambda: coord.load(_components(rank)))):
        call()
        out[op] = {phase: s.to_plain() for phase, s in coord.comm.reset_stats().items()}
    coord.close()
    return out


def test_bytes_per_rank_stay_bounded_as_the_world_grows(tmp_path):
    at = {w: expect_ok(run_ranks(w, _phase_bytes, str(tmp_path / f"w{w}"))) for w in (2, 4)}
    for op in ("save", "save again", "load"):
        phases = set(at[2][0][op])
        assert phases == set(at[4][0][op]) and phases, (op, phases)
        for phase in phases:
            def moved(res: dict, op: str = op, phase: str = phase) -> int:
                return res[op][phase]["bytes_sent"] + res[op][phase]["bytes_received"]

            # A rank other than 0: the same exchange at 4 ranks as at 2 (a few bytes of slack for numbers
            # that encode longer).
            others = {w: max(moved(r) for r in at[w][1:]) for w in (2, 4)}
            assert others[4] <= others[2] + 64, (op, phase, others)
            # Rank 0 hears from each other rank once: linear in the world size, (4-1)/(2-1) = 3x at most.
            root = {w: moved(at[w][0]) for w in (2, 4)}
            assert root[4] <= 3 * root[2] + 192, (op, phase, root)
            # Collectives per rank do not depend on the world size.
            counts = {w: {r[op][phase]["collectives"] for r in at[w]} for w in (2, 4)}
            assert counts[2] == counts[4] and len(counts[2]) == 1, (op, phase, counts)


class _FailsOnLoad(Box):
    def load_state_dict(self, state: dict) -> None:
        raise ValueError("refused (injected)")


def _apply_fails_on_last_rank(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    coord.save(1, [StateComponent(k, Box({"v": k}), SharingPattern.GLOBAL) for k in "ab"])
    b = _FailsOnLoad({}) if rank == world - 1 else Box({})
    try:
        coord.load([StateComponent("a", Box({}), SharingPattern.GLOBAL), StateComponent("b", b, SharingPattern.GLOBAL)])
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "applied": getattr(exc, "applied", None),
                "failures": getattr(exc, "failures", None)}
    return {"type": None}


def test_a_load_state_dict_failing_on_one_rank_is_one_error_on_every_rank(tmp_path):
    results = expect_ok(run_ranks(2, _apply_fails_on_last_rank, str(tmp_path)))
    assert results[0] == results[1], results  # rank 0 decided it; every rank raises the same
    res = results[0]
    assert res["type"] == "PartialLoadError", res
    assert res["applied"] == {0: ("a", "b"), 1: ("a",)} and list(res["failures"]) == [1], res
    assert "rank 1: component 'b': load_state_dict() raised ValueError: refused (injected)" in res["message"]


def _groups_disagree(rank: int, world: int, run_dir: str) -> str:
    try:  # rank 0 says the group is [0, 1]; rank 1 says it is alone
        CheckpointCoordinator(run_dir, timeout=60, process_groups={"dp": [0, 1] if rank == 0 else [1]})
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_ranks_disagreeing_on_their_groups_get_one_error(tmp_path):
    results = expect_ok(run_ranks(2, _groups_disagree, str(tmp_path)))
    assert results[0] == results[1], results
    assert results[0].startswith("CheckpointError: process groups named 'dp' overlap or leave ranks out"), results


class _Stalls(Box):
    def state_dict(self) -> dict:
        time.sleep(5)  # past the coordinator's 2 s timeout
        return self.state


def _rank0_stalls_in_a_save(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=2)
    box = _Stalls({"w": torch.ones(2)}) if rank == 0 else Box({"w": torch.ones(2)})
    try:
        coord.save(1, [StateComponent("model", box, SharingPattern.REPLICATED)])
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "missing": getattr(exc, "missing_ranks", None)}
    return {"type": None}


def test_a_stalled_rank_0_is_named_by_the_others(tmp_path):
    # Rank 0 decides every phase; when it is the one missing, the others still time out naming it.
    res = expect_ok(run_ranks(2, _rank0_stalls_in_a_save, str(tmp_path), timeout=90))[1]
    assert res["type"] == "CollectiveTimeoutError" and list(res["missing"]) == [0], res
    assert "rank 0 never reached it" in res["message"] and "'prepare' step" in res["message"], res
