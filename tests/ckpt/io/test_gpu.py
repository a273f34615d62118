"""The CUDA path, on a machine with a GPU (skipped elsewhere): device tensors staged through pinned buffers on a
side stream, async saves that return before the copies land yet save the values of save time, loads back into
device tensors, FSDP2 and DDP on nccl under torchrun with bit-exact resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel
from tests.support.files import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)).cuda()


def _components(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
    return [StateComponent("model", model, SharingPattern.REPLICATED, validation_level=ValidationLevel.TENSOR),
            StateComponent("optimizer", opt, SharingPattern.REPLICATED, validation_level=ValidationLevel.TENSOR)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(steps):
        model(torch.randn(32, 256, device="cuda", generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_async_save_of_device_state_keeps_the_values_of_save_time(tmp_path):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    with CheckpointCoordinator(str(tmp_path), async_save=True) as coord:
        expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
        handle = coord.save(1, _components(model, opt))
        # Training goes on at once, changing the weights in place on the default stream; the save must not see it.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0).add_(1.0)
        _train(model, opt, 3)
        path = handle.wait()
        pool = coord._staging
        assert pool.nbytes > 0 and all(b.is_pinned() for b in pool._buffers.values())
        pointers = {slot: b.data_ptr() for slot, b in pool._buffers.items()}
        coord.save(2, _components(model, opt)).wait()  # the same shapes: the same pinned buffers
        assert {slot: b.data_ptr() for slot, b in pool._buffers.items()} == pointers
        fresh = _model(9)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        coord.load(_components(fresh, fresh_opt), checkpoint=path)
    assert all(p.is_cuda for p in fresh.parameters())
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_staged_copy_of_an_async_save_of_device_state_holds_the_values_of_save_time(tmp_path):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    with CheckpointCoordinator(str(tmp_path), async_save=True) as coord:
        expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        coord.save(1, _components(model, opt))
        states, give_back = coord.take_staged_state()  # taken before the device copies have landed
        _train(model, opt, 3)  # queued after the copies on the default stream
        torch.cuda.synchronize()  # what a restore from the copy does first
        held = states["model"]
        assert all(t.device.type == "cpu" and t.is_pinned() for t in held.values())
        for name, value in held.items():
            assert torch.equal(value, expected[name]), name
        give_back()
        assert all(b.is_pinned() for b in coord._staging._buffers.values())
        coord.save(2, _components(model, opt)).wait()  # into the buffers given back


@pytest.mark.parametrize("async_save", [False, True])
def test_device_model_and_adamw_resume_bit_exact(tmp_path, async_save):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    with CheckpointCoordinator(str(tmp_path), async_save=async_save) as coord:
        coord.save(3, _components(model, opt))
        coord.wait()
        _train(model, opt, 2)
        fresh = _model(5)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        for in_place in (False, True):
            coord.load(_components(fresh, fresh_opt), in_place=in_place)
            _train(fresh, fresh_opt, 2)
            for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
                assert torch.equal(a, b)
            coord.load(_components(model, opt))  # both back to step 3 for the in-place round
            _train(model, opt, 2)


def test_a_failed_load_leaves_device_state_untouched(tmp_path):
    model = _model(0)
    with CheckpointCoordinator(str(tmp_path)) as coord:
        coord.save(1, [StateComponent("model", model)])
        wider = torch.nn.Sequential(torch.nn.Linear(256, 513), torch.nn.ReLU(), torch.nn.Linear(513, 64)).cuda()
        before = {k: v.clone() for k, v in wider.state_dict().items()}
        with pytest.raises(Exception, match="513"):
            coord.load([StateComponent("model", wider)])
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())


def _demo(run_dir: str, *extra: str) -> str:
    tiny = ["--max-steps", "24", "--eval-steps", "4", "--save-steps", "8", "--logging-steps", "4", "--n-layer", "2",
            "--d-model", "64", "--block-size", "32", "--batch-size", "8", "--eval-windows", "16", "--warmup-steps", "4",
            "--save-total-limit", "1", "--preserve-n-best", "1", "--sample-bytes", "24", "--device", "cuda"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "trainers.demo", "--run-dir", run_dir, *tiny, *extra]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _digest(output: str) -> tuple[str, str]:
    found = re.findall(r"final parameters at step (\d+): xxh3-128 ([0-9a-f]{32})", output)
    assert len(found) == 1, output
    return found[0]


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_demo_on_nccl_stopped_and_resumed_matches_a_straight_run(tmp_path, trainer):
    straight = _demo(str(tmp_path / "straight"), "--trainer", trainer)
    _demo(str(tmp_path / "resumed"), "--trainer", trainer, "--stop-at-step", "12")
    resumed = _demo(str(tmp_path / "resumed"), "--trainer", trainer, "--resume")
    assert "resumed from" in resumed and "checkpoint-00000012" in resumed
    assert _digest(straight) == _digest(resumed) and _digest(straight)[0] == "24"
