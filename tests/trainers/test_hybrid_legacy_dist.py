"""dp x tp checkpoints of the older layout (model and optimizer PER_GROUP over "dp", tensor-parallel shards as
`ckpt.shard_entry` values) still load into HybridTrainer, whose model and optimizer are now SHARDED.

At (dp=2, tp=2): 16 steps straight with the current trainer == 8 steps saved in the older layout, a stop, and a
resume to 16 with the current trainer, bit for bit; the resumed run's next checkpoints are SHARDED. At (dp=1,
tp=2) on two ranks the older checkpoint of step 8 loads exactly (its shards reassembled by name).
"""

from __future__ import annotations

import json
import os

import torch

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import STOP, TOTAL, cfg_dir, check_resume, loaded_state, run

NEW = {"name": "dp2xtp2", "kind": "tp", "dp": 2, "size": 2}
OLD = {**NEW, "legacy": True}


def _first(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    return {"straight": run(NEW, cfg_dir(root, NEW, "straight"), total=TOTAL),
            "stopped": run(OLD, cfg_dir(root, NEW, "resumed"), stop=STOP, total=TOTAL)}


def _resume(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    return run(NEW, cfg_dir(root, NEW, "resumed"), resume="latest", total=TOTAL)


def _load_at_dp_one(rank: int, world: int, root: str) -> dict:
    """(dp=1, tp=2) from the older checkpoint of step 8: the state right after the load."""
    torch.set_num_threads(1)
    source = os.path.join(cfg_dir(root, NEW, "resumed"), f"checkpoint-{STOP:08d}")
    cfg = {"kind": "tp", "dp": 1, "size": 2, "policy": "reseed", "args": {"save_on_train_end": False}}
    return loaded_state(cfg, os.path.join(root, "dp1"), source)


def _pattern(root: str, step: int) -> str:
    path = os.path.join(cfg_dir(root, NEW, "resumed"), f"checkpoint-{step:08d}", "checkpoint_manifest.json")
    with open(path) as f:
        return json.load(f)["components"]["model"]["pattern"]


def test_older_dp_tp_checkpoints_resume_bit_exact_and_load_at_another_dp(tmp_path):
    root = str(tmp_path)
    first = expect_ok(run_ranks(4, _first, root))
    resumed = expect_ok(run_ranks(4, _resume, root))
    for rank in range(4):
        check_resume(NEW, rank, first[rank], resumed[rank])
    assert [_pattern(root, s) for s in (4, 8, 12, 16)] == ["per_group", "per_group", "sharded", "sharded"]
    saved = first[0]["stopped"]
    for rank, loaded in enumerate(expect_ok(run_ranks(2, _load_at_dp_one, root))):
        assert loaded["step"] == STOP, rank
        assert loaded["model"] == saved["model"], f"rank {rank}: parameters differ from the saved ones"
        assert loaded["optimizer"] == saved["optimizer"], f"rank {rank}: optimizer state differs"
