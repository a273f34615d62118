"""Resuming the model-parallel trainers under another layout (ckpt's reshard=True plus the LayoutChange policy).

DPxTP saved at (dp=2, tp=2) loads at (dp=1, tp=2), (dp=2, tp=1) and, marked slow, (dp=4, tp=2): the full
parameters and optimizer state after the load equal the saved full ones. A 2-stage pipeline loads into 1 and
4 stages the same way. Without the RESEED policy the resume is refused, naming the per-rank components.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import expect_ok, run_ranks
from tests.parallel_support import build, full_optimizer, full_state, run

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
            loaded.update(model=full_state(trainer), optimizer=full_optimizer(trainer), step=state.global_step)

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


def _at_two(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    tp_cfg = {"kind": "tp", "policy": "reseed"}
    return {
        "dp1xtp2": _resume({**tp_cfg, "dp": 1, "size": 2}, root, "tp", "dp1xtp2", total=SAVED + 2),
        "dp2xtp1": _resume({**tp_cfg, "dp": 2, "size": 1}, root, "tp", "dp2xtp1"),
        "refused": _refused({"kind": "tp", "dp": 1, "size": 2}, root, "tp", "refused"),
        "pipeline2": _train_and_save(rank, world, {"name": "pipe", "kind": "pipeline", "schedule": "gpipe",
                                                    "micro": 2}, root),
    }


def _pipeline_at(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    cfg = {"kind": "pipeline", "schedule": "gpipe", "micro": 2, "policy": "reseed"}
    return {"resumed": _resume(cfg, root, "pipe", f"pipe{world}", total=SAVED + 2),
            "refused": _refused(cfg, root, "pipe", f"pipe{world}-refused")}


def _tp_at_eight(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    return _resume({"kind": "tp", "dp": 4, "size": 2, "policy": "reseed"}, root, "tp", "dp4xtp2", total=SAVED + 1)


def _same_as_saved(saved: dict, loaded: dict, where: str) -> None:
    assert loaded["step"] == SAVED, where
    for name, value in loaded["model"].items():
        assert value == saved["model"][name], f"{where}: parameter {name} differs from the saved one"
    for name, value in loaded["optimizer"].items():
        assert value == saved["optimizer"][name], f"{where}: optimizer state of {name} differs"


def _saved_tp(root: str) -> dict:
    return expect_ok(run_ranks(4, _train_and_save, {"name": "tp", "kind": "tp", "dp": 2, "size": 2}, root))[0]


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
    # Every stage's own parameters, by their names in the whole model.
    pipe = {"model": {}, "optimizer": {}}
    for res in at_two:
        pipe["model"].update(res["pipeline2"]["model"])
        pipe["optimizer"].update(res["pipeline2"]["optimizer"])
    assert sorted(pipe["model"]) == sorted(f"{i}.{p}" for i in (0, 3, 5, 7) for p in ("weight", "bias"))
    for world in (1, 4):
        seen = set()
        for rank, res in enumerate(expect_ok(run_ranks(world, _pipeline_at, root))):
            _same_as_saved(pipe, res["resumed"], f"{world} stages, rank {rank}")
            seen |= set(res["resumed"]["model"])
            assert res["resumed"]["end_step"] == SAVED + 2
            assert "components ['rng'] are state of ranks that no longer exist" in res["refused"], res["refused"]
        assert seen == set(pipe["model"]), f"{world} stages hold {sorted(seen)}"


@pytest.mark.slow
def test_dp_tp_state_loads_at_dp_four(tmp_path):
    root = str(tmp_path)
    saved_tp = _saved_tp(root)
    for rank, res in enumerate(expect_ok(run_ranks(8, _tp_at_eight, root, timeout=300))):
        _same_as_saved(saved_tp, res, f"(dp=4, tp=2) rank {rank}")
        assert res["end_step"] == SAVED + 1
