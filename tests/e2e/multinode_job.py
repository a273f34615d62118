"""A job for the two-launcher multi-node test (tests/e2e/test_multinode_torchrun.py); run it under torchrun.

Trains a DDPTrainer (dispatch_batches: data GLOBAL), a HybridTrainer dp x tp (dp=2 across the nodes, tp=2
inside each) and a HybridTrainer dp x pp (dp=2 across the nodes, a 2-stage pipeline inside each), each with a
PER_NODE callback (node-local state) and a GLOBAL one: phase "first" runs straight to
--total and, in another run dir, stops after --stop; phase "resumed" resumes that run to --total. Each rank
writes its results to <root>/out/<phase>/rank-<r>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ckpt import SharingPattern
from tests.support.parallel import mse, seq_model
from tests.support.toys import LossRecorder, Regression, StopAt, TinyMLP, plain
from trainers import (
    DDPTrainer,
    HybridTrainer,
    ParallelConfig,
    PipelineConfig,
    TrainerCallback,
    TrainingArguments,
)

KINDS = ("ddp", "hybrid", "pp")


class NodeCache(TrainerCallback):
    """Node-local state (as a node's data cache would be): the node it belongs to and the steps it saw."""

    state_key = "node_cache"
    sharing_pattern = SharingPattern.PER_NODE

    def __init__(self) -> None:
        self.node = int(os.environ["GROUP_RANK"])
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"node": self.node, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["node"] != self.node:
            raise ValueError(f"node {self.node} was given node {state['node']}'s cache")
        self.steps = state["steps"]


class JobCounter(TrainerCallback):
    """Job-wide state (GLOBAL: rank 0 writes it)."""

    state_key = "job_counter"

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


def train(kind: str, run_dir: str, total: int, stop: int | None, resume: bool) -> dict[str, Any]:
    recorder, cache, counter = LossRecorder(), NodeCache(), JobCounter()
    callbacks = [recorder, cache, counter] + ([StopAt(stop)] if stop else [])
    args = TrainingArguments(output_dir=run_dir, max_steps=total, per_device_train_batch_size=4, save_steps=4,
                             logging_steps=2, seed=5, full_determinism=True, dispatch_batches=kind == "ddp",
                             resume_from_checkpoint="latest" if resume else None, ddp_backend="gloo")
    torch.manual_seed(1234)
    common = {"train_dataset": Regression(64), "callbacks": callbacks,
              "optimizer_factory": lambda p: torch.optim.AdamW(p, lr=1e-2)}
    if kind == "ddp":
        trainer = DDPTrainer(TinyMLP(), args, **common)
    elif kind == "hybrid":
        parallel = ParallelConfig(dp=2, tp=2, tp_plan={"net.0": "colwise", "net.3": "rowwise"})
        trainer = HybridTrainer(TinyMLP(), args, parallel=parallel, **common)
    else:
        parallel = ParallelConfig(dp=2, pp=2, pipeline=PipelineConfig(schedule="gpipe", n_microbatches=2))
        trainer = HybridTrainer(seq_model(), args, parallel=parallel, output_loss=mse, **common)
    trainer.train()
    model = {n: plain(p.full_tensor() if hasattr(p, "full_tensor") else p.detach())
             for n, p in trainer.unwrapped_model.named_parameters()}
    trainer.coordinator.close()
    return {"losses": recorder.losses, "model": repr(model), "cache_steps": cache.steps, "node": cache.node,
            "job_steps": counter.steps, "step": trainer.state.global_step}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--phase", required=True, choices=["first", "resumed"],
                   help="first: a straight run and a run stopped at --stop; resumed: resume the stopped run")
    p.add_argument("--total", type=int, default=8)
    p.add_argument("--stop", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"env": {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK",
                                                                    "LOCAL_WORLD_SIZE")}}
    for kind in KINDS:
        if a.phase == "first":
            out[kind] = {"straight": train(kind, os.path.join(a.root, kind, "straight"), a.total, None, False),
                         "stopped": train(kind, os.path.join(a.root, kind, "resumed"), a.total, a.stop, False)}
        else:
            out[kind] = train(kind, os.path.join(a.root, kind, "resumed"), a.total, None, True)
    os.makedirs(os.path.join(a.root, "out", a.phase), exist_ok=True)
    with open(os.path.join(a.root, "out", a.phase, f"rank-{os.environ['RANK']}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
