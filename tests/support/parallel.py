"""Models, trainer builders and state capture shared by the model-parallel trainer tests (holds no tests;
importable by spawned ranks)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from dataclasses import replace
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ckpt import ReplicationError, SharingPattern, shard_entry
from tests.support.toys import LossRecorder, Regression, StopAt, TinyMLP, plain, warmup_then_decay

TP_PLAN = {"net.0": "colwise", "net.3": "rowwise"}


def seq_model() -> torch.nn.Sequential:
    """Four linear layers (so 1, 2 or 4 stages), with dropout so the RNG streams matter."""
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 1))


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


def build(cfg: dict, run_dir: str, callbacks: list, *, resume: Any = None, total: int = 16) -> Any:
    """A trainer for `cfg`: kind "pipeline" (schedule, microbatches), "tp", "pp" or "fsdp" (dp, size), or "accel"."""
    from trainers import (
        HybridTrainer,
        LayoutChange,
        ParallelConfig,
        PipelineConfig,
        PipelineTrainer,
        TrainingArguments,
    )

    options = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 5, "logging_steps": 3, "save_steps": 4,
               "eval_steps": 4, "eval_on_save": True, "seed": 3, "max_grad_norm": 0.5, "full_determinism": True,
               **cfg.get("args", {})}
    args = TrainingArguments(output_dir=run_dir, max_steps=total, resume_from_checkpoint=resume, **options)
    policy = LayoutChange(cfg.get("policy", "error"))
    common = {"train_dataset": Regression(64), "eval_dataset": Regression(13, seed=9),
              "optimizer_factory": lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.01),
              "lr_scheduler_factory": warmup_then_decay(total), "callbacks": callbacks}
    torch.manual_seed(1234)  # the model's initial weights; the trainer seeds its own streams
    kind = cfg["kind"]
    if kind == "pipeline":
        pipeline = PipelineConfig(schedule=cfg.get("schedule", "1f1b"), n_microbatches=cfg.get("micro", 4),
                                  on_layout_change=policy)
        return PipelineTrainer(seq_model(), args, output_loss=mse, pipeline=pipeline, **common)
    if kind == "tp":
        plan = None if cfg.get("plain") else TP_PLAN  # "plain": no tensor parallelism at all (tp=1 only)
        parallel = ParallelConfig(dp=cfg["dp"], tp=cfg["size"], tp_plan=plan, on_layout_change=policy)
        trainer = HybridTrainer(TinyMLP(), args, parallel=parallel, **common)
        if cfg.get("legacy"):  # model and optimizer saved as the trainer did before they were SHARDED
            trainer.get_state_components = lambda: legacy_tp_components(trainer)
        return trainer
    if kind == "pp":
        parallel = ParallelConfig(dp=cfg["dp"], pp=cfg["size"], pipeline=PipelineConfig(
            schedule=cfg.get("schedule", "gpipe"), n_microbatches=cfg.get("micro", 2)), on_layout_change=policy)
        return HybridTrainer(seq_model(), args, parallel=parallel, output_loss=mse, **common)
    if kind == "fsdp":
        from trainers import FSDPTrainer

        tp = cfg.get("size", 1)  # tensor parallel inside each FSDP2 replica when > 1
        parallel = ParallelConfig(dp=cfg["dp"], tp=tp, tp_plan=TP_PLAN if tp > 1 else None, on_layout_change=policy)
        return FSDPTrainer(TinyMLP(), args, parallel=parallel, **common)
    if kind == "accel":
        from trainers.accel import AccelTrainer

        return AccelTrainer(TinyMLP(), args, **common)
    raise ValueError(kind)


class ShardEntries:
    """A Stateful whose DTensors are saved as `ckpt.shard_entry` values (this rank's shard and its offsets): the
    dp x tp layout HybridTrainer wrote before its model and optimizer were SHARDED."""

    def __init__(self, inner: Any):
        self.inner = inner

    def state_dict(self) -> dict[str, Any]:
        from trainers.mesh_state import map_tensors
        from trainers.sharded_state import dtensor_box

        def entry(_path: tuple, t: torch.Tensor) -> Any:
            return shard_entry(t.to_local().detach(), dtensor_box(t)[0], list(t.shape)) if isinstance(t, DTensor) else t

        return map_tensors(self.inner.state_dict(), entry)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def legacy_tp_components(trainer: Any) -> list:
    """A dp x tp HybridTrainer's components as it declared them before SHARDED: model and optimizer PER_GROUP
    over "dp", keyed by parameter name, tensor-parallel shards as shard entries."""
    from trainers import HybridTrainer

    old = {c.key: replace(c, stateful=ShardEntries(c.stateful))
           for c in trainer._named_components(SharingPattern.PER_GROUP)}
    return [old.get(c.key, c) for c in HybridTrainer.get_state_components(trainer)]


def full_state(trainer: Any) -> dict[str, Any]:
    """This rank's parameters by name as full tensors (DTensors gathered), as plain copies."""
    out = {}
    for name, p in trainer.unwrapped_model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = plain(t.detach())
    return out


def full_optimizer(trainer: Any) -> dict[str, Any]:
    """exp_avg / exp_avg_sq / step of every parameter, by name, as full tensors."""
    names = {id(p): n for n, p in trainer.unwrapped_model.named_parameters()}
    out = {}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate wraps it
    for p, s in optimizer.state.items():
        out[names[id(p)]] = {k: plain(v.full_tensor() if isinstance(v, DTensor) else v) for k, v in s.items()}
    return out


def run(cfg: dict, run_dir: str, *, stop: int | None = None, resume: Any = None, total: int = 16) -> dict:
    """Train (stopping after `stop`, or resuming) and return what the run ended with."""
    recorder = LossRecorder()
    trainer = build(cfg, run_dir, [recorder] + ([StopAt(stop)] if stop else []), resume=resume, total=total)
    trainer.train()
    out = {"losses": recorder.losses, "evals": recorder.evals, "step": trainer.state.global_step,
           "model": full_state(trainer), "optimizer": full_optimizer(trainer),
           "scheduler": plain(trainer.lr_scheduler.state_dict()), "log_history": trainer.state.log_history,
           "tokens_seen": trainer.state.tokens_seen, "rng": torch.rand(4).tolist(),
           "checkpoints": [r.step for r in trainer.coordinator.checkpoints()]}
    trainer.coordinator.close()
    return out


def loaded_state(cfg: dict, run_dir: str, source: str) -> dict:
    """Build `cfg` resuming from checkpoint `source` into `run_dir`: the step, full parameters and optimizer
    state right after the load (the run then trains to its end, normally 0 more steps)."""
    loaded: dict = {}

    class Capture:
        def on_train_begin(self, args, state, control, trainer, **kwargs):
            loaded.update(model=full_state(trainer), optimizer=full_optimizer(trainer), step=state.global_step)

    trainer = build(cfg, run_dir, [Capture()], resume=source, total=cfg.get("total", STOP))
    try:
        trainer.train()
    finally:
        trainer.coordinator.close()
    return loaded


def inspect_at(path: str, shape: str) -> dict[str, str]:
    """`ckpt inspect PATH --at SHAPE --json`: component -> what a load at that shape does."""
    from ckpt.cli import main as ckpt_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ckpt_main(["inspect", path, "--at", shape, "--json"])
    if code != 0:
        raise AssertionError(f"ckpt inspect {path} --at {shape} exited {code}: {out.getvalue()}")
    return {c["key"]: c["action"] for c in json.loads(out.getvalue())["load_at"]["components"]}


def cfg_dir(root: str, cfg: dict, phase: str) -> str:
    return os.path.join(root, cfg["name"], phase)




# ---- bit-exact resume in two phases of spawned ranks ------------------------------------------------------

TOTAL, STOP = 16, 8


def first_phase(rank: int, world: int, cfgs: list[dict], root: str) -> list[dict]:
    """Each config trained straight to TOTAL, and again stopped at STOP (a spawned rank's first phase)."""
    torch.set_num_threads(1)
    return [{"straight": run(c, cfg_dir(root, c, "straight"), total=TOTAL),
             "stopped": run(c, cfg_dir(root, c, "resumed"), stop=STOP, total=TOTAL)} for c in cfgs]


def perturbed_replica(root: str) -> dict:
    """DPxTP 2x2 for 2 steps; then one replica's shard drifts on rank 2 and a save must fail everywhere."""
    cfg = {"kind": "tp", "dp": 2, "size": 2, "args": {"save_on_train_end": False}}
    trainer = build(cfg, os.path.join(root, "perturbed"), [], total=2)
    trainer.train()
    if trainer.rank == 2:
        with torch.no_grad():
            trainer.unwrapped_model.net[0].weight.to_local()[0, 0] += 1e-3
    try:
        trainer.save_checkpoint()
    except ReplicationError as exc:
        return {"type": "ReplicationError", "message": str(exc), "mismatches": exc.mismatches,
                "replica_ranks": list(exc.replica_ranks)}
    finally:
        trainer.coordinator.close()
    return {"type": None}


def second_phase(rank: int, world: int, cfgs: list[dict], root: str, perturb: bool) -> dict:
    """The stopped runs resumed to TOTAL in new processes (and, with `perturb`, a drifted replica's save)."""
    torch.set_num_threads(1)
    out = {"resumed": [run(c, cfg_dir(root, c, "resumed"), resume="latest", total=TOTAL) for c in cfgs]}
    if perturb:
        out["perturbed"] = perturbed_replica(root)
    return out


def loss_bits(losses: list) -> list:
    return [(step, struct.pack("<d", loss)) for step, loss in losses]


def check_resume(cfg: dict, rank: int, first: dict, resumed: dict) -> None:
    """Stopped + resumed equals straight, bit for bit: losses, parameters, optimizer, schedule, RNG."""
    straight, stopped = first["straight"], first["stopped"]
    where = f"{cfg['name']} rank {rank}"
    assert stopped["step"] == STOP and resumed["step"] == straight["step"] == TOTAL, where
    assert loss_bits(stopped["losses"] + resumed["losses"]) == loss_bits(straight["losses"]), f"{where}: per-step losses"
    for part in ("model", "optimizer", "scheduler", "log_history", "tokens_seen", "rng"):
        assert straight[part] == resumed[part], f"{where}: {part} differs"
    assert stopped["evals"] + resumed["evals"] == straight["evals"] == [4, 8, 12, 16], where
    assert straight["checkpoints"] == resumed["checkpoints"] == [4, 8, 12, 16], where


__all__ = ["STOP", "TOTAL", "LossRecorder", "StopAt", "build", "cfg_dir", "check_resume", "first_phase",
           "full_optimizer", "full_state", "inspect_at", "legacy_tp_components", "loaded_state", "loss_bits", "mse", "perturbed_replica", "run",
           "second_phase", "seq_model"]
