"""Recovery end to end: the demo job under torchrun (2 ranks, tiny model).

A rank hanging in a collective makes the watchdog exit the job non-zero and a torchrun restart resume from
the latest checkpoint; injected NaN, out-of-memory and divergence are handled and shown in the end summary;
SIGTERM to torchrun makes the workers save and exit cleanly. The slow case compares a full demo run with an
injected divergence against a clean one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.demo import ENV, TINY
from tests.support.files import REPO
from tests.support.recovery import logged_step
from trainers.recovery import read_events


def _cmd(run_dir, *extra: str, restarts: int = 0, tiny: bool = True) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "-m", "trainers.demo", "--run-dir", str(run_dir),
            *(TINY if tiny else ["--threads", "1", "--sample-bytes", "0"]), *extra]


def _policy(tmp_path, text: str) -> str:
    path = tmp_path / "recovery.toml"
    path.write_text("[recovery]\n" + text)
    return str(path)


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_a_hung_rank_exits_the_job_and_a_torchrun_restart_resumes(tmp_path):
    policy = _policy(tmp_path, "health_check_interval = 4\nhealth_check_timeout_s = 3\ndetector = false\n")
    proc = _run(_cmd(tmp_path / "run", "--max-steps", "20", "--resume", "--recovery", policy, "--inject-hang", "11",
                     restarts=1))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    failed = [e for e in read_events(str(tmp_path / "run")) if e["kind"] == "health_check_failed"]
    assert any(e["ranks"] == [1] and e["values"]["seen_by_rank"] == 0 for e in failed), failed
    assert {e["step"] for e in failed} == {11}, "the step the hang happened in (it was recorded one early)"
    assert re.search(r"resumed from \S*checkpoint-00000008 at step 8", out), out[-5000:]
    assert "final parameters at step 20" in out and "Recovery events" in out


def test_injected_nan_oom_and_divergence_are_recovered_and_reported(tmp_path):
    policy = _policy(tmp_path, "lr_ramp_steps = 6\ngrad_norm_spike_factor = 0\n"
                               "[recovery.detector]\nwarmup = 3\npatience = 2\nthreshold = 1.0\n")
    proc = _run(_cmd(tmp_path / "run", "--max-steps", "40", "--recovery", policy, "--inject-nan", "5",
                     "--inject-oom", "7", "--inject-divergence", "19", "--inject-lr-factor", "300"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    events = read_events(str(tmp_path / "run"))
    kinds = [(e["kind"], e["action"]) for e in events]
    assert kinds[:2] == [("non_finite", "skip"), ("oom_retry", "retry")] and events[0]["ranks"] == [1]
    assert ("divergence", "rollback") in kinds and ("rollback", "rollback") in kinds and ("lr_change", "scale") in kinds
    rollback = next(e for e in events if e["kind"] == "rollback")["values"]
    assert rollback["to_step"] == 16
    summary = out[out.index("Recovery events"):]
    for word in ("non_finite", "oom_retry", "divergence", "rollback", "lr_change"):
        assert word in summary
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    train = [m for m in metrics if m["kind"] == "train"]
    assert {m["global_batch_size"] for m in train} == {8} and train[-1]["micro_batch_size"] == 2
    assert "final parameters at step 40" in out


def test_sigterm_to_torchrun_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, "--max-steps", "2000", "--save-steps", "1000"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not logged_step(run, 10):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = [e for e in read_events(str(run)) if e["kind"] == "emergency_save"]
    assert len(saved) == 1, out[-5000:]
    step = saved[0]["step"]
    assert 10 <= step < 2000 and f"checkpoint-{step:08d}" in os.listdir(run)
    assert "exitcode: 0" in out or "exitcode:" not in out, out[-3000:]  # no worker failed
    resumed = _run(_cmd(run, "--max-steps", str(step + 4), "--save-steps", "1000", "--resume"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr



@pytest.mark.slow
def test_the_demo_recovers_from_a_divergence_close_to_a_clean_run(tmp_path):
    clean = _run(_cmd(tmp_path / "clean", tiny=False), timeout=900)
    div = _run(_cmd(tmp_path / "div", "--inject-divergence", "330", tiny=False), timeout=900)
    assert clean.returncode == 0 and div.returncode == 0, div.stderr[-4000:]
    events = read_events(str(tmp_path / "div"))
    kinds = [e["kind"] for e in events]
    assert "rollback" in kinds and "lr_change" in kinds
    decided = [e["step"] for e in events if e["kind"] == "divergence"]
    assert decided and decided[0] <= 380, decided  # the per-step detector, within tens of steps of step 330
    final = [_final_eval(tmp_path / name) for name in ("clean", "div")]
    assert final[1] < 1.05 * final[0], final


def _final_eval(run) -> float:
    with open(run / "metrics.jsonl") as f:
        evals = [json.loads(line) for line in f if '"eval"' in line]
    return float(evals[-1]["eval_loss"])
