"""The demo's device set-up: CPU and gloo unless --device cuda asks otherwise, whatever CUDA the machine has;
and what full determinism needs from cuBLAS. No test here touches CUDA: where it matters, availability is faked.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.support.distributed import free_port
from tests.support.toys import Regression, TinyMLP
from trainers import SimpleTrainer, TrainingArguments
from trainers.demo.cli import build_trainer, device_setup, parse_args
from trainers.recovery import init_process_group_for_restarts
from trainers.rng import CUBLAS_WORKSPACE_ENV

TINY = ["--max-steps", "4", "--eval-steps", "2", "--save-steps", "2", "--n-layer", "1", "--d-model", "32",
        "--block-size", "16", "--batch-size", "2", "--eval-windows", "4", "--no-recovery"]


@pytest.fixture
def cuda_looks_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)


def test_the_demo_trains_on_cpu_with_gloo_by_default_even_where_cuda_is_available(tmp_path, cuda_looks_available):
    opts = parse_args(["--run-dir", str(tmp_path / "one"), *TINY])
    assert opts.device == "cpu" and device_setup(opts) == ("gloo", "cpu")
    single = build_trainer(opts, distributed=False)
    assert single.device == torch.device("cpu") and next(single.unwrapped_model.parameters()).device.type == "cpu"
    single.coordinator.close()
    # The torchrun path at world size 1: the process group and the trainer, as the demo's main() builds them.
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    opts = parse_args(["--run-dir", str(tmp_path / "ddp"), *TINY])
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        init_process_group_for_restarts(device_setup(opts)[0])
        trainer = build_trainer(opts, distributed=True)
        assert dist.get_backend() == "gloo" and trainer.device == torch.device("cpu")
        assert (trainer.args.ddp_backend, trainer.args.device) == ("gloo", "cpu")
        trainer.coordinator.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_device_cuda_with_fewer_gpus_than_local_ranks_is_a_clear_error(monkeypatch, cuda_looks_available):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    opts = parse_args(["--device", "cuda"])
    with pytest.raises(ValueError, match=r"local rank 1 needs cuda:1, but this process sees 1 GPU.*"
                                         r"--nproc-per-node 1"):
        device_setup(opts)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert device_setup(opts) == ("nccl", "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        device_setup(opts)


def _trainer(run_dir) -> SimpleTrainer:
    args = TrainingArguments(output_dir=str(run_dir), max_steps=2, full_determinism=True)
    return SimpleTrainer(TinyMLP(), args, train_dataset=Regression(16))


def test_full_determinism_sets_the_cublas_workspace_before_cuda_starts(tmp_path, monkeypatch):
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    _trainer(tmp_path / "a").train()
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:8"
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":16:8")  # the user's own choice stands
    _trainer(tmp_path / "b")
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16:8"
    # Too late to set it once CUDA is initialised: say so instead of failing at the first matrix multiply.
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match=r"full_determinism=True needs CUBLAS_WORKSPACE_CONFIG set before CUDA "
                                         r"starts.*export CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        _trainer(tmp_path / "c")
