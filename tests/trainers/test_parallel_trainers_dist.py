"""Bit-exact resume of the model-parallel trainers: 16 steps straight == 8 steps, a process stop, a resume to 16.

Pipeline at 4 stages (1F1B) and 2 stages (GPipe), DPxTP 2x2 (model and optimizer SHARDED) and DPxPP 2x2 (1F1B). Per-step losses, full
parameters (DTensors gathered), optimizer state, scheduler, log history, evaluations and the next random draw
must match bit for bit. Each phase is a separate set of spawned processes. The 4-rank phase also checks that a
drifted tensor-parallel replica makes every rank raise ReplicationError naming the tensor and ranks.
"""

from __future__ import annotations

import json
import os

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import (
    check_resume,
    first_phase,
    inspect_at,
    second_phase,
)

WORLD4 = [{"name": "pipeline4", "kind": "pipeline", "schedule": "1f1b", "micro": 4},
          {"name": "dp2xtp2", "kind": "tp", "dp": 2, "size": 2},
          {"name": "dp2xpp2", "kind": "pp", "dp": 2, "size": 2, "schedule": "1f1b", "micro": 2}]
WORLD2 = [{"name": "pipeline2", "kind": "pipeline", "schedule": "gpipe", "micro": 2}]


def _assert_resume(world: int, cfgs: list[dict], root: str) -> list[dict]:
    first = expect_ok(run_ranks(world, first_phase, cfgs, root))
    second = expect_ok(run_ranks(world, second_phase, cfgs, root, world == 4))
    for i, cfg in enumerate(cfgs):
        for rank in range(world):
            check_resume(cfg, rank, first[rank][i], second[rank]["resumed"][i])
    return second


def _manifest(root: str, name: str) -> dict:
    with open(os.path.join(root, name, "straight", "checkpoint-00000016", "checkpoint_manifest.json")) as f:
        return json.load(f)


def test_pipeline_tp_and_pp_meshes_resume_bit_exact_at_world_four(tmp_path):
    root = str(tmp_path)
    second = _assert_resume(4, WORLD4, root)
    # The patterns each trainer declares, as the manifest records them.
    pipe = _manifest(root, "pipeline4")["components"]
    assert {k: pipe[k]["pattern"] for k in ("model", "optimizer", "data", "lr_scheduler", "trainer_state", "rng")} == {
        "model": "per_rank", "optimizer": "per_rank", "data": "global", "lr_scheduler": "replicated",
        "trainer_state": "replicated", "rng": "per_rank"}
    tp = _manifest(root, "dp2xtp2")
    assert tp["topology"]["process_groups"] == {"dp": [[0, 2], [1, 3]], "tp": [[0, 1], [2, 3]]}
    comps = tp["components"]
    assert (comps["model"]["pattern"], comps["optimizer"]["pattern"]) == ("sharded", "sharded")
    assert (comps["data"]["pattern"], comps["data"]["process_group"]) == ("per_group", "tp")
    # Each tp shard once, split across the two replicas that hold it: every rank writes, no piece twice.
    model = comps["model"]
    assert {f["writer_rank"] for f in model["files"] if f["kind"] == "tensors"} == {0, 1, 2, 3}
    for name, full in (("net.0.weight", [16, 8]), ("net.0.bias", [16]), ("net.3.weight", [1, 16])):
        tensor = model["tensors"][name]
        assert tensor["shape"] == full
        assert sum(p["stop"] - p["start"] for p in tensor["pieces"]) == full[0] * (full[1] if len(full) > 1 else 1)
    _inspect_at_other_shapes(os.path.join(root, "dp2xtp2", "straight", "checkpoint-00000016"))
    pp = _manifest(root, "dp2xpp2")
    assert pp["topology"]["process_groups"] == {"dp": [[0, 2], [1, 3]], "pp": [[0, 1], [2, 3]]}
    assert pp["components"]["data"]["process_group"] == "pp"
    _inspect_dp_pp(os.path.join(root, "dp2xpp2", "straight", "checkpoint-00000016"))
    # A replica whose tp shard drifted (rank 2 holds what rank 0 holds): the same ReplicationError on every
    # rank, naming the tensor, the replicas and the drifted rank; no hang.
    for rank in range(4):
        p = second[rank]["perturbed"]
        assert p["type"] == "ReplicationError", (rank, p)
        assert "'net.0.weight' (ranks [2])" in p["message"] and "[[0, 2]]" in p["message"], p["message"]
        assert list(p["mismatches"]) == ["net.0.weight"] and list(p["mismatches"]["net.0.weight"]) == [2]
        assert p["replica_ranks"] == [0, 2]


def _inspect_at_other_shapes(path: str) -> None:
    """`ckpt inspect --at` draws the saved mesh and says what a load at another shape does, per component."""
    import contextlib
    import io

    from ckpt.cli import main as ckpt_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ckpt_main(["inspect", path, "--at", "dp=1,tp=2"]) == 0
    text = out.getvalue()
    assert "mesh dp=2 x tp=2 (ranks):\n     tp0 tp1\ndp0    0   1\ndp1    2   3" in text, text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ckpt_main(["inspect", path, "--at", "tp=1,dp=4", "--json"]) == 0
    info = json.loads(out.getvalue())
    assert info["mesh"] == [{"name": "dp", "size": 2}, {"name": "tp", "size": 2}]
    plan = {c["key"]: c["action"] for c in info["load_at"]["components"]}
    assert plan["model"].startswith("each rank reads only the saved byte ranges that overlap its own shards")
    assert plan["trainer_state"].startswith("loads as saved") and plan["rng"] == "each rank reads its own file"


def _inspect_dp_pp(path: str) -> None:
    """`ckpt inspect --at` on a dp x pp checkpoint: the same mesh reads each group's copy; at dp=1 the stages are
    found by name in the copy of the dp group that held them, and the per-replica data must be merged."""
    same = inspect_at(path, "dp=2,pp=2")
    assert same["model"] == same["optimizer"] == same["data"] == "each group reads its saved copy", same
    assert same["rng"] == "each rank reads its own file"
    one = inspect_at(path, "pp=2,dp=1")
    assert one["model"] == one["optimizer"] == "reshard=True: each tensor is found by name in the one copy that " \
                                               "holds it", one
    # pp group (0, 1) exists at dp=1 too, but there it is the only replica: the saved copies must be merged.
    assert one["data"].startswith("reshard=True: ") and one["rng"].startswith("reshard=True: "), one


def test_two_stage_gpipe_resumes_bit_exact(tmp_path):
    _assert_resume(2, WORLD2, str(tmp_path))
