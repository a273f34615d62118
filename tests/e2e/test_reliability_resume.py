"""Auto-resume end to end: a `torchrun --max-restarts 2` job whose rank dies (between steps, or inside a
save) is restarted, resumes from the latest committed checkpoint, and finishes with exactly the parameters
of an uninterrupted run."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from ckpt import list_checkpoints
from ckpt.cli.inspection import open_checkpoint, verify
from ckpt.format.layout import is_partial_name
from ckpt.io.storage import LocalStorage
from tests.support.files import REPO

STEPS, SAVE_EVERY = 30, 5


def _torchrun(run_dir: str, out: str, restarts: int, *extra: str) -> subprocess.CompletedProcess:
    # No TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the job itself keeps each attempt's store keys apart.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", str(restarts), os.path.join(REPO, "tools", "fault_train.py"), "--run-dir", run_dir,
         "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--out", out, *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = _torchrun(str(tmp / "run"), str(tmp / "final.safetensors"), 0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attempt 0: finished 30 steps" in done.stdout
    return safetensors.torch.load_file(str(tmp / "final.safetensors"))


def _resume_and_compare(tmp_path, baseline: dict[str, torch.Tensor], kill_rank: int, kill_step: int,
                        phase: str, resumed_from: int) -> None:
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "final.safetensors")
    done = _torchrun(run_dir, out, 2, "--kill-rank", str(kill_rank), "--kill-step", str(kill_step),
                     "--kill-phase", phase)
    what = f"rank {kill_rank} killed at step {kill_step} ({phase})"
    assert done.returncode == 0, f"{what}:\n{done.stdout}\n{done.stderr[-4000:]}"
    first = "starting from scratch" if resumed_from == 0 else f"resumed from step {resumed_from}"
    assert f"attempt 1: {first}" in done.stdout, f"{what}:\n{done.stdout}"
    assert "attempt 1: finished 30 steps" in done.stdout
    final = safetensors.torch.load_file(out)
    assert final.keys() == baseline.keys()
    for name, tensor in baseline.items():  # bit for bit
        assert torch.equal(final[name].view(torch.uint8), tensor.view(torch.uint8)), f"{what}: {name} differs"
    refs = list_checkpoints(LocalStorage(), run_dir)
    assert refs[-1].step == STEPS and all(verify(open_checkpoint(r.path))["ok"] for r in refs)
    assert not [n for n in os.listdir(run_dir) if is_partial_name(n)], os.listdir(run_dir)


def test_a_rank_killed_at_a_random_step_resumes_to_the_same_parameters(tmp_path, uninterrupted):
    seed = int(os.environ.get("CKPT_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    kill_rank, kill_step = rng.randrange(2), rng.randrange(1, STEPS - 1)
    print(f"CKPT_FAULT_SEED={seed}: rank {kill_rank} dies at step {kill_step}")
    _resume_and_compare(tmp_path, uninterrupted, kill_rank, kill_step, "step", SAVE_EVERY * (kill_step // SAVE_EVERY))


@pytest.mark.slow
@pytest.mark.parametrize("phase,kill_rank", [("write", 1), ("barrier", 1), ("manifest", 0), ("rename", 0)])
def test_a_rank_killed_inside_a_save_resumes_from_the_checkpoint_before(tmp_path, uninterrupted, phase, kill_rank):
    # Killed in the save of step 15: that checkpoint never commits, so the job resumes from step 10.
    _resume_and_compare(tmp_path, uninterrupted, kill_rank, 13, phase, 10)
