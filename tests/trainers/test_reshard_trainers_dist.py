"""Resuming the model-parallel trainers under another layout (SHARDED dp x tp state, ckpt's reshard=True for pipeline
stages, plus the LayoutChange policy).

DPxTP saved at (dp=2, tp=2) loads at (dp=1, tp=2), (dp=2, tp=1), (dp=3, tp=2) at 6 ranks, into a plain model
(dp=1, tp=1, no tp_plan) at one rank and, marked slow, at (dp=4, tp=2): the full parameters and optimizer
state after the load equal the saved full ones. (dp=1, tp=2) loads at one rank (its dp group (0,) exists in
the checkpoint but held half the model). A 2-stage pipeline loads into 1 and 4 stages the same way. Without
the RESEED policy the resume is refused, naming the per-rank components; with it the sampler restarts at the
saved global sample count and two identical resumes draw the same random numbers. The (dp=1, tp=2) run keeps
save_total_limit=2 plus the best checkpoint, and `ckpt inspect --at` is checked against these checkpoints.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import build, full_optimizer, full_state, inspect_at, run

SAVED = 6


def _saved(root: str, name: str) -> str:
    return os.path.join(root, name, "checkpoint-00000006")


def _train_and_save(rank: int, world: int, cfg: dict, root: str) -> dict:
    torch.set_num_threads(1)
    out = run(cfg, os.path.join(root, cfg["name"]), total=SAVED)
    return {"model": out["model"], "optimizer": out["optimizer"]}


def _resume(cfg: dict, root: str, source: str, out_name: str, total: int = SAVED) -> dict:
    """Resume `cfg` from `source`'s checkpoint into a new run dir; what the state is right after the load,
    and after training on to `total`."""
    loaded: dict = {}

    class Capture:
        def on_train_begin(self, args, state, control, trainer, **kwargs):
            sampler, progress = trainer.data_progress.sampler, trainer.data_progress.loaded or {}
            loaded.update(model=full_state(trainer), optimizer=full_optimizer(trainer), step=state.global_step,
                          position=sampler.position, epoch=sampler.epoch, per_step=sampler.batch_size
                          * sampler.num_replicas, saved_samples=progress.get("samples"), rand=torch.rand(4).tolist())

    trainer = build(cfg, os.path.join(root, out_name), [Capture()], resume=_saved(root, source), total=total)
    try:
        trainer.train()
    finally:
        trainer.coordinator.close()
    return {**loaded, "end_step": trainer.state.global_step}


def _refused(cfg: dict, root: str, source: str, out_name: str) -> str:
    try:
        _resume({**cfg, "policy": "error"}, root, source, out_name)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


NO_END_SAVE = {"save_on_train_end": False}  # a resume that only loads: no checkpoint to write
# (dp=1, tp=2), saved every 2 steps with an evaluation each time: retention keeps the newest 2 and the best.
TP12 = {"name": "tp12", "kind": "tp", "dp": 1, "size": 2,
        "args": {"save_steps": 2, "save_total_limit": 2, "preserve_best_model": True}}


def _at_two(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    tp_cfg = {"kind": "tp", "policy": "reseed"}
    return {
        "dp1xtp2": _resume({**tp_cfg, "dp": 1, "size": 2}, root, "tp", "dp1xtp2", total=SAVED + 2),
        "dp1xtp2_again": _resume({**tp_cfg, "dp": 1, "size": 2, "args": NO_END_SAVE}, root, "tp", "dp1xtp2-again"),
        "dp2xtp1": _resume({**tp_cfg, "dp": 2, "size": 1}, root, "tp", "dp2xtp1"),
        "refused": _refused({"kind": "tp", "dp": 1, "size": 2}, root, "tp", "refused"),
        "pipeline2": _train_and_save(rank, world, {"name": "pipe", "kind": "pipeline", "schedule": "gpipe",
                                                    "micro": 2}, root),
        "tp12": _train_and_save(rank, world, TP12, root),
    }


def _pipeline_at(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    cfg = {"kind": "pipeline", "schedule": "gpipe", "micro": 2, "policy": "reseed"}
    return {"resumed": _resume(cfg, root, "pipe", f"pipe{world}", total=SAVED + 2),
            "refused": _refused(cfg, root, "pipe", f"pipe{world}-refused")}


def _at_one(rank: int, world: int, root: str) -> dict:
    """One rank: the pipeline in one stage, (dp=1, tp=2) at tp=1, and (dp=2, tp=2) into a plain model."""
    torch.set_num_threads(1)
    one = {"kind": "tp", "dp": 1, "size": 1, "policy": "reseed", "args": NO_END_SAVE}
    return {**_pipeline_at(rank, world, root),
            "tp12_at_1": _resume(one, root, "tp12", "tp12-at-1"),
            "plain": _resume({**one, "plain": True}, root, "tp", "plain-at-1")}


def _tp_at(rank: int, world: int, root: str, total: int) -> dict:
    """(dp=world/2, tp=2) from the (dp=2, tp=2) checkpoint."""
    torch.set_num_threads(1)
    cfg = {"kind": "tp", "dp": world // 2, "size": 2, "policy": "reseed", **({"args": NO_END_SAVE} if total == SAVED
                                                                              else {})}
    return _resume(cfg, root, "tp", f"dp{world // 2}xtp2", total=total)


def _same_as_saved(saved: dict, loaded: dict, where: str) -> None:
    assert loaded["step"] == SAVED, where
    for name, value in loaded["model"].items():
        assert value == saved["model"][name], f"{where}: parameter {name} differs from the saved one"
    for name, value in loaded["optimizer"].items():
        assert value == saved["optimizer"][name], f"{where}: optimizer state of {name} differs"


def _saved_tp(root: str) -> dict:
    return expect_ok(run_ranks(4, _train_and_save, {"name": "tp", "kind": "tp", "dp": 2, "size": 2}, root))[0]


def _check_reseed(at_two: list[dict]) -> None:
    """dp 2 -> 1 under RESEED: each sampler restarts at the saved global sample count over the new replicas'
    global batch; two identical resumes draw the same numbers, each rank its own."""
    for rank, res in enumerate(at_two):
        first, again = res["dp1xtp2"], res["dp1xtp2_again"]
        assert first["saved_samples"] == SAVED * 4 * 2, first["saved_samples"]  # 6 steps of 2 replicas x 4
        assert first["per_step"] == 4 * 1 and first["epoch"] == 0
        assert first["position"] == first["saved_samples"] // first["per_step"] == 12, first
        assert (again["position"], again["epoch"]) == (first["position"], first["epoch"])
        assert again["rand"] == first["rand"], f"rank {rank}: two identical RESEED resumes drew different numbers"
    assert at_two[0]["dp1xtp2"]["rand"] != at_two[1]["dp1xtp2"]["rand"], "the ranks share one random stream"


def _check_retention(run_dir: str) -> None:
    """save_total_limit=2 and preserve_best_model=True on a parallel trainer: the newest two and the best by
    eval_loss are kept; metrics.jsonl has one train row per logging window and one eval and one checkpoint row
    per save."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert sorted((r["kind"], r["step"]) for r in rows) == [("checkpoint", 2), ("checkpoint", 4), ("checkpoint", 6),
                                                             ("eval", 2), ("eval", 4), ("eval", 6), ("train", 3),
                                                             ("train", 6)], rows
    evals = {r["step"]: r["eval_loss"] for r in rows if r["kind"] == "eval"}
    best = min(evals, key=evals.get)
    kept = sorted(int(n.split("-")[1]) for n in os.listdir(run_dir) if n.startswith("checkpoint-"))
    assert kept == sorted({4, 6, best}), (kept, evals)
    for step in kept:
        with open(os.path.join(run_dir, f"checkpoint-{step:08d}", "checkpoint_manifest.json")) as f:
            assert json.load(f)["metrics"]["eval_loss"] == evals[step]


def test_dp_tp_and_pipeline_state_load_under_other_layouts(tmp_path):
    root = str(tmp_path)
    saved_tp = _saved_tp(root)
    at_two = expect_ok(run_ranks(2, _at_two, root))
    for rank, res in enumerate(at_two):
        _same_as_saved(saved_tp, res["dp1xtp2"], f"(dp=1, tp=2) rank {rank}")
        _same_as_saved(saved_tp, res["dp2xtp1"], f"(dp=2, tp=1) rank {rank}")
        assert len(res["dp2xtp1"]["model"]) == 4 and res["dp1xtp2"]["end_step"] == SAVED + 2
        assert "components ['rng', 'data'] are state of ranks that no longer exist" in res["refused"], res["refused"]
        assert "LayoutChange.RESEED" in res["refused"]
    _check_reseed(at_two)
    _check_retention(os.path.join(root, "tp12"))
    # (dp=3, tp=2) at 6 ranks, loading only: the CI-speed cousin of the slow (dp=4, tp=2) case.
    for rank, res in enumerate(expect_ok(run_ranks(6, _tp_at, root, SAVED, timeout=300))):
        _same_as_saved(saved_tp, res, f"(dp=3, tp=2) rank {rank}")
        assert res["position"] == SAVED * 4 * 2 // (4 * 3), res["position"]  # 48 samples over 3 replicas of 4
    # Every stage's own parameters, by their names in the whole model.
    pipe = {"model": {}, "optimizer": {}}
    for res in at_two:
        pipe["model"].update(res["pipeline2"]["model"])
        pipe["optimizer"].update(res["pipeline2"]["optimizer"])
    assert sorted(pipe["model"]) == sorted(f"{i}.{p}" for i in (0, 3, 5, 7) for p in ("weight", "bias"))
    for world in (1, 4):
        seen = set()
        for rank, res in enumerate(expect_ok(run_ranks(world, _at_one if world == 1 else _pipeline_at, root))):
            _same_as_saved(pipe, res["resumed"], f"{world} stages, rank {rank}")
            seen |= set(res["resumed"]["model"])
            assert res["resumed"]["end_step"] == SAVED + 2
            assert "components ['rng'] are state of ranks that no longer exist" in res["refused"], res["refused"]
            if world == 1:
                # (dp=1, tp=2) at one rank: dp group (0,) is a saved group, but it held only tp shard 0.
                _same_as_saved(at_two[0]["tp12"], res["tp12_at_1"], "(dp=1, tp=2) at one rank")
                # (dp=2, tp=2) into a model without tensor parallelism: plain tensors, the full saved values.
                _same_as_saved(saved_tp, res["plain"], "(dp=2, tp=2) into a plain model")
        assert seen == set(pipe["model"]), f"{world} stages hold {sorted(seen)}"
    _inspect_checks(root)


def _inspect_checks(root: str) -> None:
    """`ckpt inspect --at` agrees with what the loads above did."""
    pipe = inspect_at(_saved(root, "pipe"), "dp=1,pp=4")
    assert pipe["model"] == pipe["optimizer"] == "reshard=True: each tensor is found by name in the one copy that " \
                                                  "holds it", pipe
    assert pipe["data"].startswith("loads as saved") and pipe["rng"].startswith("reshard=True: "), pipe
    assert inspect_at(_saved(root, "pipe"), "dp=1,pp=2")["model"] == "each rank reads its own file"
    # dp x tp is SHARDED: at any shape each rank reads the byte ranges of its own shards.
    tp12 = os.path.join(root, "tp12", "checkpoint-00000006")
    for shape in ("dp=1,tp=1", "tp=2,dp=1"):
        assert inspect_at(tp12, shape)["model"].startswith("each rank reads only the saved byte ranges"), shape


@pytest.mark.slow
def test_dp_tp_state_loads_at_dp_four(tmp_path):
    root = str(tmp_path)
    saved_tp = _saved_tp(root)
    for rank, res in enumerate(expect_ok(run_ranks(8, _tp_at, root, SAVED + 1, timeout=300))):
        _same_as_saved(saved_tp, res, f"(dp=4, tp=2) rank {rank}")
        assert res["end_step"] == SAVED + 1
