"""The demo job end to end under torchrun (world size 2, tiny model): a run stopped at step K and resumed to N
ends with the same parameters, bit for bit, as a run straight to N; the end report lists the checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.files import REPO
from trainers.demo.cli import parse_args

TINY = ["--max-steps", "24", "--eval-steps", "4", "--save-steps", "8", "--logging-steps", "4", "--n-layer", "1",
        "--d-model", "32", "--block-size", "32", "--batch-size", "4", "--eval-windows", "16", "--warmup-steps", "4",
        "--save-total-limit", "1", "--preserve-n-best", "1", "--sample-bytes", "24", "--threads", "1"]


def _demo(run_dir: str, *extra: str, nproc: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "trainers.demo", "--run-dir", run_dir, *TINY, *extra]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _digest(output: str) -> str:
    found = re.findall(r"final parameters at step (\d+): xxh3-128 ([0-9a-f]{32})", output)
    assert len(found) == 1, output
    return found[0]


def test_demo_stopped_and_resumed_matches_a_straight_run(tmp_path):
    straight = _demo(str(tmp_path / "straight"))
    stopped = _demo(str(tmp_path / "resumed"), "--stop-at-step", "12")
    resumed = _demo(str(tmp_path / "resumed"), "--resume")
    assert _digest(stopped)[0] == "12"
    assert _digest(straight) == _digest(resumed) and _digest(straight)[0] == "24"
    assert "resumed from" in resumed and "checkpoint-00000012" in resumed
    for text in (straight, resumed):
        assert "Best by eval_loss" in text and f"$ ckpt ls {tmp_path}" in text
        assert "checkpoint-00000024" in text and "sample: Day 7." in text
        assert "train step 24/24" in text and "eval step 24/24" in text
    kept = sorted(n for n in os.listdir(tmp_path / "straight") if n.startswith("checkpoint-"))
    assert "checkpoint-00000024" in kept and len(kept) <= 2  # newest 1 + best 1
    assert os.path.exists(tmp_path / "straight" / "metrics.jsonl")
    # Without --resume the demo will not train over a run that has checkpoints (one process: SimpleTrainer).
    proc = subprocess.run([sys.executable, "-m", "trainers.demo", "--run-dir", str(tmp_path / "straight"), *TINY],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_demo_fsdp_stopped_and_resumed_bit_exact_and_at_another_world_size(tmp_path):
    straight = _demo(str(tmp_path / "straight"), "--trainer", "fsdp")
    _demo(str(tmp_path / "resumed"), "--trainer", "fsdp", "--stop-at-step", "12")
    resumed = _demo(str(tmp_path / "resumed"), "--trainer", "fsdp", "--resume")
    assert _digest(straight) == _digest(resumed) and _digest(straight)[0] == "24"
    assert "sample: Day 7." in resumed
    # The 2-rank checkpoint of step 12 resumes at 1 rank (RNG and data reseeded, weights loaded from the shards).
    _demo(str(tmp_path / "moved"), "--trainer", "fsdp", "--stop-at-step", "12")
    moved = _demo(str(tmp_path / "moved"), "--trainer", "fsdp", "--resume", nproc=1)
    assert "resumed from" in moved and _digest(moved)[0] == "24"


def test_demo_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--save-steps", "--eval-steps", "--seed", "--resume", "--n-layer", "--d-model",
                 "--stop-at-step", "--dispatch-batches"):
        assert flag in text
