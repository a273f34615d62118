"""AccelTrainer (Hugging Face Accelerate, MULTI_CPU on gloo) at world size 2: 16 steps straight == 8, a stop,
and a resume, bit for bit; model and optimizer are REPLICATED and validated per tensor."""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import check_resume, first_phase, second_phase

pytest.importorskip("accelerate")

CFG = {"name": "accel", "kind": "accel"}


def _env() -> dict:
    """Accelerate reads the rendezvous address from the environment even when torch.distributed is up already."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LOCAL_WORLD_SIZE": 2}


def test_accelerate_trainer_resumes_bit_exact(tmp_path):
    root = str(tmp_path)
    first = expect_ok(run_ranks(2, first_phase, [CFG], root, env=_env()))
    second = expect_ok(run_ranks(2, second_phase, [CFG], root, False, env=_env()))
    for rank in range(2):
        check_resume(CFG, rank, first[rank][0], second[rank]["resumed"][0])
    assert first[0][0]["straight"]["model"] == first[1][0]["straight"]["model"]  # replicas stay identical
    with open(os.path.join(root, "accel", "straight", "checkpoint-00000016", "checkpoint_manifest.json")) as f:
        comps = json.load(f)["components"]
    assert {k: (c["pattern"], c["validation_level"]) for k, c in comps.items() if k in ("model", "optimizer", "data")} \
        == {"model": ("replicated", "tensor"), "optimizer": ("replicated", "tensor"), "data": ("per_rank", "none")}
