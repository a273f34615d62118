"""FSDPTrainer on real gloo ranks: 16 steps straight == 8 steps, a stop, and a resume to 16, bit for bit at the
same world size; and a resume at another world size loads the model and optimizer exactly."""

from __future__ import annotations

import pytest
import torch

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import cfg_dir, run

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
