"""Recovery's per-step checks in the model-parallel and Accelerate trainers (2 real ranks on gloo).

DPxTP (dp=1, tp=2): a NaN loss on one rank at step 3 and a gradient-norm spike on the other at step 13 make
every rank skip exactly those optimizer steps. A 2-stage pipeline skips the step whose first stage went NaN.
AccelTrainer runs the recovered step: a NaN on rank 1 is skipped everywhere, an out-of-memory error on rank 0
halves the micro-batch on every rank, and the replicas stay identical. A model-parallel trainer refuses
oom_retry (its peers would wait in the replica's collectives).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.support.distributed import expect_ok, run_ranks
from tests.support.parallel import build, full_state
from tests.support.recovery import BadLoss
from trainers import TrainerCallback


def _policy(**overrides: Any) -> Any:
    from trainers.recovery import RecoveryPolicy

    return RecoveryPolicy(**{"nan_action": "skip", "oom_retry": False, "health_check_interval": 0,
                             "handle_signals": False, "detector": None, "grad_norm_window": 10, **overrides})


class StepWatch(TrainerCallback):
    """Per step, whether this rank's parameters changed (an applied optimizer step changes them)."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}

    @staticmethod
    def _local(trainer: Any) -> list[torch.Tensor]:
        return [(p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                for p in trainer.unwrapped_model.parameters()]

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        self.before = self._local(kwargs["trainer"])

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        after = self._local(kwargs["trainer"])
        self.changed[state.global_step] = any(not torch.equal(a, b) for a, b in zip(self.before, after, strict=True))


class Scale(TrainerCallback):
    """Multiplies the model's output (the loss, for TinyMLP) by `factor` at `step` on `rank`: a gradient spike."""

    def __init__(self, step: int, rank: int, factor: float):
        self.step, self.rank, self.factor = step, rank, factor
        self.hooked = False

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.here = kwargs["trainer"].rank == self.rank
        if not self.hooked:
            kwargs["model"].register_forward_hook(self._hook)
            self.hooked = True

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        self.now = state.global_step + 1

    def _hook(self, module, inputs, output):
        return output * self.factor if module.training and self.here and self.now == self.step else output


_QUIET = {"save_steps": None, "eval_steps": None, "eval_on_save": False, "save_on_train_end": False,
          "logging_steps": 1}


def _train(cfg: dict, run_dir: str, callbacks: list, total: int) -> dict:
    from trainers.recovery import read_events

    watch = StepWatch()
    trainer = build(cfg, run_dir, [watch, *callbacks], total=total)
    try:
        trainer.train()
    finally:
        trainer.coordinator.close()
    events = [(e["kind"], e["step"], e["action"]) for e in read_events(run_dir)] if trainer.rank == 0 else None
    micro = {e["step"]: e["micro_batch_size"] for e in trainer.state.log_history if "micro_batch_size" in e}
    return {"changed": watch.changed, "events": events, "model": full_state(trainer), "micro": micro,
            "step": trainer.state.global_step}


def _model_parallel(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    tp = {"kind": "tp", "dp": 1, "size": 2, "args": {**_QUIET, "recovery": _policy()}}
    pipe = {"kind": "pipeline", "schedule": "gpipe", "micro": 2, "args": {**_QUIET, "recovery": _policy()}}
    return {"tp": _train(tp, os.path.join(root, "tp"), [BadLoss({3}, {1}), Scale(13, 0, 1e4)], total=14),
            "pipe": _train(pipe, os.path.join(root, "pipe"), [BadLoss({3}, {0})], total=5)}


def _tensor(saved: tuple) -> torch.Tensor:
    """A tensor back from tests.support.toys.plain()'s (kind, dtype, shape, bytes)."""
    _, dtype, shape, raw = saved
    return torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype.split(".")[1])).reshape(shape)


def test_nan_and_spike_skip_the_same_step_on_every_rank_of_a_mesh(tmp_path):
    results = expect_ok(run_ranks(2, _model_parallel, str(tmp_path)))
    for rank, res in enumerate(results):
        tp, pipe = res["tp"], res["pipe"]
        assert tp["step"] == 14 and pipe["step"] == 5, rank
        # NaN on rank 1 only (step 3) and a spike from rank 0 only (step 13): both ranks leave both steps out.
        assert [s for s, changed in sorted(tp["changed"].items()) if not changed] == [3, 13], (rank, tp["changed"])
        assert [s for s, changed in sorted(pipe["changed"].items()) if not changed] == [3], (rank, pipe["changed"])
        assert all(torch.isfinite(_tensor(v)).all() for v in tp["model"].values()), rank
    assert results[0]["tp"]["events"] == [("non_finite", 3, "skip"), ("grad_norm_spike", 13, "skip")]
    assert results[0]["pipe"]["events"] == [("non_finite", 3, "skip")]
    assert results[0]["tp"]["model"] == results[1]["tp"]["model"]  # the full model, gathered on both ranks


def test_model_parallel_trainers_refuse_oom_retry(tmp_path):
    from trainers import HybridTrainer, ParallelConfig, TrainingArguments
    from trainers.recovery import RecoveryPolicy

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, recovery=RecoveryPolicy())
    with pytest.raises(ValueError, match=r"HybridTrainer: the recovery policy has oom_retry = true.*Set oom_retry "
                                         r"= false"):
        HybridTrainer(torch.nn.Linear(2, 1), args, parallel=ParallelConfig())


def _accel(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    from trainers.recovery import FaultInjection

    cfg = {"kind": "accel", "args": {**_QUIET, "recovery": _policy(oom_retry=True)}}
    oom_once = FaultInjection(oom_step=5, rank=0)  # once: the retry with half the micro-batch gets through
    return _train(cfg, os.path.join(root, "accel"), [BadLoss({3}, {1}), oom_once], total=6)


def _env() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LOCAL_WORLD_SIZE": 2}


def test_accelerate_trainer_runs_the_recovered_step(tmp_path):
    pytest.importorskip("accelerate")
    results = expect_ok(run_ranks(2, _accel, str(tmp_path), env=_env()))
    for rank, res in enumerate(results):
        assert [s for s, changed in sorted(res["changed"].items()) if not changed] == [3], (rank, res["changed"])
        micro = res["micro"]  # logged per applied step: halved at step 5, on every rank
        assert (micro[4], micro[5], micro[6]) == (4, 2, 2), (rank, micro)
    assert results[0]["events"] == [("non_finite", 3, "skip"), ("oom_retry", 5, "retry")]
    assert results[0]["model"] == results[1]["model"]  # still replicas
