"""FSDPTrainer on real gloo ranks: 16 steps straight == 8 steps, a stop, and a resume to 16, bit for bit at the
same world size; and a resume at another world size loads the model and optimizer exactly. The same for FSDP2
over a tensor-parallel model at dp=2 x tp=2 (strided shards), loaded at dp x tp = 1x2, 2x1 and 1x1 by value."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import cfg_dir, check_resume, first_phase, loaded_state, run

TOTAL, STOP = 16, 8
FSDP2 = {"name": "fsdp2", "kind": "fsdp", "dp": 2}


def _phase(rank: int, world: int, root: str, phase: str) -> dict:
    torch.set_num_threads(1)
    if phase == "first":
        return {"straight": run(FSDP2, cfg_dir(root, FSDP2, "straight"), total=TOTAL),
                "stopped": run(FSDP2, cfg_dir(root, FSDP2, "resumed"), stop=STOP, total=TOTAL)}
    if phase == "resume":
        return run(FSDP2, cfg_dir(root, FSDP2, "resumed"), resume="latest", total=TOTAL)
    # At another world size: RNG and data reseeded (policy), model and optimizer loaded from the shards.
    cfg = {**FSDP2, "dp": world, "policy": "reseed"}
    return run(cfg, cfg_dir(root, FSDP2, "resumed"), resume=STOP, total=STOP + 1)


def _same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_fsdp_trainer_resumes_bit_exact_and_at_another_world_size(tmp_path):
    root = str(tmp_path)
    first = expect_ok(run_ranks(2, _phase, root, "first"))
    resumed = expect_ok(run_ranks(2, _phase, root, "resume"))
    for r in range(2):
        straight, again = first[r]["straight"], resumed[r]
        assert straight["losses"] == first[r]["stopped"]["losses"] + again["losses"]
        for part in ("model", "optimizer", "scheduler", "rng"):
            _same(straight[part], again[part], part)
    # The checkpoint of step 8 at 1 and 4 ranks: one step from exactly the saved weights.
    for world in (1, 4):
        out = expect_ok(run_ranks(world, _phase, root, "other"))
        assert all(o["step"] == STOP + 1 for o in out)


# ---- FSDP2 over a tensor-parallel model: dp x tp, strided shards --------------------------------------

FSDP_TP = {"name": "fsdp-tp", "kind": "fsdp", "dp": 2, "size": 2}


def _tp_phase(rank: int, world: int, root: str, phase: str) -> dict:
    torch.set_num_threads(1)
    if phase == "first":
        return first_phase(rank, world, [FSDP_TP], root)[0]
    if phase == "resume":
        return run(FSDP_TP, cfg_dir(root, FSDP_TP, "resumed"), resume="latest", total=TOTAL)
    dp, tp = (int(x) for x in phase.split("x"))
    cfg = {**FSDP_TP, "dp": dp, "size": tp, "policy": "reseed", "args": {"save_on_train_end": False}}
    return loaded_state(cfg, os.path.join(root, f"at-{phase}"), os.path.join(
        cfg_dir(root, FSDP_TP, "resumed"), f"checkpoint-{STOP:08d}"))


@pytest.mark.slow
def test_fsdp_over_tensor_parallel_resumes_bit_exact_and_at_other_layouts(tmp_path):
    root = str(tmp_path)
    first = expect_ok(run_ranks(4, _tp_phase, root, "first"))
    resumed = expect_ok(run_ranks(4, _tp_phase, root, "resume"))
    for rank in range(4):
        check_resume(FSDP_TP, rank, first[rank], resumed[rank])
    with open(os.path.join(cfg_dir(root, FSDP_TP, "straight"), f"checkpoint-{TOTAL:08d}",
                           "checkpoint_manifest.json")) as f:
        comps = json.load(f)["components"]
    assert comps["model"]["pattern"] == comps["optimizer"]["pattern"] == "sharded"
    # net.0 is column-parallel: FSDP2 splits each tp shard's rows over dp (a strided placement), one box a rank.
    pieces = comps["model"]["tensors"]["net.0.weight"]["pieces"]
    assert sorted(p["offsets"][0] for p in pieces) == [0, 4, 8, 12], pieces
    # The checkpoint of step 8 at another dp (and tp), by value against the saved full state.
    saved = first[0]["stopped"]
    for world, phase in ((2, "1x2"), (2, "2x1"), (1, "1x1")):
        for rank, loaded in enumerate(expect_ok(run_ranks(world, _tp_phase, root, phase))):
            where = f"dp x tp = {phase}, rank {rank}"
            assert loaded["step"] == STOP, where
            assert loaded["model"] == saved["model"], f"{where}: parameters differ from the saved ones"
            assert loaded["optimizer"] == saved["optimizer"], f"{where}: optimizer state differs"
