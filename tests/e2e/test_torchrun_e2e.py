"""End to end under torchrun: the example job saves, a second launch continues from the latest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.files import REPO


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           os.path.join(REPO, "tools", "example_save_load.py"), *args],
                          capture_output=True, text=True, timeout=240, env=env, cwd=REPO)


def test_example_job_under_torchrun_saves_and_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    first = _torchrun(2, "--run-dir", run_dir, "--steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "world size 2: saved steps 1..2" in first.stdout and "restored bit for bit: True" in first.stdout
    second = _torchrun(2, "--run-dir", run_dir, "--steps", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "saved steps 3..3" in second.stdout and "loaded step 3" in second.stdout
    assert sorted(os.listdir(run_dir)) == [".ckpt.lock"] + [f"checkpoint-0000000{i}" for i in (1, 2, 3)]
    with open(os.path.join(run_dir, "checkpoint-00000003", "checkpoint_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["topology"]["world_size"] == 2
    assert manifest["components"]["progress"]["pattern"] == "global"
