"""Bit-exact resume: 60 steps straight == 30 steps, a process stop, and a resume to 60.

Parameters, optimizer state, scheduler state, log history and every per-step loss must match bit for bit,
for SimpleTrainer and for DDPTrainer at world sizes 2 and 4 with both dispatch modes, and with
eval_on_save and best-N retention active. Each phase is a separate set of spawned processes.
"""

from __future__ import annotations

import os
import struct

import pytest
import torch

from ckpt import LocalStorage, SharingPattern, ValidationLevel, read_manifest
from tests.support.distributed import expect_ok, run_ranks
from tests.support.toys import LossRecorder, Regression, StopAt, TinyMLP, snapshot, warmup_then_decay

TOTAL, STOP = 60, 30


def _build(rank: int, cfg: dict, run_dir: str, callbacks: list, resume: str | None):
    from trainers import DDPTrainer, SimpleTrainer, TrainingArguments

    retention = {}
    if cfg.get("best"):
        retention = {"eval_steps": 4, "eval_on_save": True, "save_total_limit": 2, "preserve_best_model": True,
                     "preserve_n_best": 2}
    args = TrainingArguments(output_dir=run_dir, max_steps=TOTAL, per_device_train_batch_size=3,
                             per_device_eval_batch_size=5, logging_steps=7, save_steps=10, seed=3, max_grad_norm=0.5,
                             dispatch_batches=cfg.get("dispatch", False), full_determinism=True,
                             async_save=cfg.get("async_save", False),
                             resume_from_checkpoint=resume, **retention)
    torch.manual_seed(1234)  # the model's initial weights; the trainer seeds its own streams
    cls = SimpleTrainer if cfg["trainer"] == "simple" else DDPTrainer
    return cls(TinyMLP(), args, train_dataset=Regression(100), eval_dataset=Regression(23, seed=9),
               optimizer_factory=lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.01),
               lr_scheduler_factory=warmup_then_decay(TOTAL), callbacks=callbacks)


def _run(rank: int, cfg: dict, run_dir: str, *, stop: int | None, resume: str | None) -> dict:
    recorder = LossRecorder()
    trainer = _build(rank, cfg, run_dir, [recorder] + ([StopAt(stop)] if stop else []), resume)
    trainer.train()
    out = snapshot(trainer)
    out.update(losses=recorder.losses, evals=recorder.evals, saves=recorder.saves,
               checkpoints=[r.step for r in trainer.coordinator.checkpoints()])
    if cfg.get("best"):
        out["best"] = [(b.step, b.value) for b in trainer.coordinator.best()]
    return out


def _first_phase(rank: int, world: int, cfgs: list[dict], root: str) -> list[dict]:
    torch.set_num_threads(1)
    return [{"straight": _run(rank, c, os.path.join(root, c["name"], "straight"), stop=None, resume=None),
             "stopped": _run(rank, c, os.path.join(root, c["name"], "resumed"), stop=STOP, resume=None)}
            for c in cfgs]


def _second_phase(rank: int, world: int, cfgs: list[dict], root: str) -> list[dict]:
    torch.set_num_threads(1)
    return [_run(rank, c, os.path.join(root, c["name"], "resumed"), stop=None, resume="latest") for c in cfgs]


def _bits(losses: list[tuple[int, float]]) -> list[tuple[int, bytes]]:
    return [(step, struct.pack("<d", loss)) for step, loss in losses]


def _check(cfg: dict, rank: int, first: dict, resumed: dict) -> None:
    straight, stopped = first["straight"], first["stopped"]
    where = f"{cfg['name']} rank {rank}"
    assert stopped["step"] == STOP and resumed["step"] == straight["step"] == TOTAL, where
    assert _bits(stopped["losses"] + resumed["losses"]) == _bits(straight["losses"]), f"{where}: per-step losses"
    assert [s for s, _ in straight["losses"]] == list(range(1, TOTAL + 1))
    for part in ("model", "optimizer", "scheduler"):
        assert straight[part] == resumed[part], f"{where}: {part} differs"
    assert straight["log_history"] == resumed["log_history"], f"{where}: log history"
    assert straight["tokens_seen"] == resumed["tokens_seen"] and straight["rng"] == resumed["rng"], where
    assert stopped["evals"] + resumed["evals"] == straight["evals"], where
    # Retention never deletes the checkpoint a run resumed from; otherwise it keeps the same ones.
    assert set(resumed["checkpoints"]) - {STOP} == set(straight["checkpoints"]) - {STOP}, f"{where}: retention"
    if cfg.get("best"):
        assert straight["evals"] == [4, 8, 10, 12, 16, 20, 24, 28, 30, 32, 36, 40, 44, 48, 50, 52, 56, 60]
        assert straight["best"] == resumed["best"] and len(straight["best"]) == 2, where
        kept = {s for s, _ in straight["best"]} | {50, 60}
        assert set(straight["checkpoints"]) == kept, f"{where}: {straight['checkpoints']} != newest 2 + best 2"
    else:
        assert straight["checkpoints"] == [10, 20, 30, 40, 50, 60], where


def _check_logged_loss(cfg: dict, per_rank: list[dict]) -> None:
    """Each logged loss is the mean over its window of the mean over the ranks of each rank's loss."""
    losses = [dict(r["straight"]["losses"]) for r in per_rank]
    logged = [e for e in per_rank[0]["straight"]["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [7, 14, 21, 28, 35, 42, 49, 56, 60]
    start = 0
    for entry in logged:
        window = range(start + 1, entry["step"] + 1)
        expected = sum(sum(rank_losses[s] for rank_losses in losses) / len(losses) for s in window) / len(window)
        assert entry["loss"] == pytest.approx(expected, rel=1e-12), f"{cfg['name']} step {entry['step']}"
        start = entry["step"]
    if len(losses) > 1:  # the ranks saw different batches: the mean is not any one rank's loss
        assert losses[0] != losses[1]


def _check_manifest(cfg: dict, root: str) -> None:
    """How each component was shared, as the manifest of the last checkpoint records it."""
    manifest = read_manifest(LocalStorage(), os.path.join(root, cfg["name"], "straight", "checkpoint-00000060"))
    found = {k: c.pattern for k, c in manifest.components.items()}
    if cfg["trainer"] == "simple":
        assert found == {**dict.fromkeys(("model", "optimizer", "lr_scheduler", "trainer_state", "data"),
                                         SharingPattern.GLOBAL), "rng": SharingPattern.PER_RANK}, found
        return
    rep = SharingPattern.REPLICATED
    data = SharingPattern.GLOBAL if cfg.get("dispatch") else SharingPattern.PER_RANK
    assert found == {"model": rep, "optimizer": rep, "lr_scheduler": rep, "trainer_state": rep, "data": data,
                     "rng": SharingPattern.PER_RANK}, f"{cfg['name']}: {found}"
    for key in ("model", "optimizer"):
        assert manifest.components[key].validation_level is ValidationLevel.TENSOR, key


def _assert_matrix(world: int, cfgs: list[dict], root: str) -> None:
    first = expect_ok(run_ranks(world, _first_phase, cfgs, root))
    second = expect_ok(run_ranks(world, _second_phase, cfgs, root))
    for i, cfg in enumerate(cfgs):
        for rank in range(world):
            _check(cfg, rank, first[rank][i], second[rank][i])
            if rank:  # DDP replicas end identical
                assert second[0][i]["model"] == second[rank][i]["model"], f"{cfg['name']} rank {rank}"
        _check_logged_loss(cfg, [first[rank][i] for rank in range(world)])
        _check_manifest(cfg, root)


def test_simple_trainer_resume_is_bit_exact(tmp_path):
    _assert_matrix(1, [{"name": "simple", "trainer": "simple"},
                       {"name": "simple_best", "trainer": "simple", "best": True}], str(tmp_path))


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_resume_is_bit_exact_in_both_dispatch_modes(tmp_path, world):
    cfgs = [{"name": "dispatch", "trainer": "ddp", "dispatch": True, "async_save": world == 2},
            {"name": "sampler", "trainer": "ddp", "dispatch": False}]
    if world == 2:
        cfgs.append({"name": "sampler_best", "trainer": "ddp", "dispatch": False, "best": True})
    _assert_matrix(world, cfgs, str(tmp_path))
