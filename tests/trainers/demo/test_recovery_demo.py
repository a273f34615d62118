"""CI-speed version of the slow torchrun comparison (tests/e2e/test_recovery_torchrun.py): the demo in one process,
240 steps, with a divergence injected at step 120, rolls back and ends close to a clean run; one injected at step
70 of 120, before any log-line baseline or save, is caught too and ends within 5% of a clean 120-step run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.demo import SHORT
from tests.support.files import REPO
from trainers.recovery import read_events


def _demo(run_dir, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainers.demo", "--run-dir", str(run_dir), *SHORT, *extra]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def _final_eval(run_dir) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f if '"eval"' in line]
    return float(evals[-1]["eval_loss"])


def test_a_short_demo_recovers_from_a_divergence_close_to_a_clean_run(tmp_path):
    clean = _demo(tmp_path / "clean")
    div = _demo(tmp_path / "div", "--inject-divergence", "120")
    assert clean.returncode == 0, clean.stderr[-4000:]
    assert div.returncode == 0, div.stderr[-4000:]
    events = read_events(str(tmp_path / "div"))
    rollback = [e["values"] for e in events if e["kind"] == "rollback"]
    assert rollback and rollback[0]["to_step"] < 120  # checkpoint 120 holds the weights after the bad step
    assert rollback[0]["from_step"] <= 160 and rollback[0]["restored_from"] == "memory"  # the demo's per-step policy
    assert "lr_change" in {e["kind"] for e in events}
    final = [_final_eval(tmp_path / name) for name in ("clean", "div")]
    assert final[1] < 1.15 * final[0], final


def test_a_divergence_soon_after_the_start_rolls_back_to_the_initial_state(tmp_path):
    # No log line and no save before the fault: the per-step detector's baseline comes from the first steps,
    # and the initial state (checkpoint 0) is the rollback target.
    short = ["--max-steps", "120", "--save-steps", "200"]
    early = _demo(tmp_path / "early", "--inject-divergence", "70", *short)
    clean = _demo(tmp_path / "clean", *short)
    assert early.returncode == 0, early.stderr[-4000:]
    assert clean.returncode == 0, clean.stderr[-4000:]
    events = read_events(str(tmp_path / "early"))
    decided = [e["step"] for e in events if e["kind"] == "divergence"]
    assert decided and 70 < decided[0] <= 100, decided  # within tens of steps, with a baseline from step 21 on
    rollback = [e["values"] for e in events if e["kind"] == "rollback"]
    assert rollback and rollback[0]["to_step"] == 0 and rollback[0]["from_step"] <= 110, rollback
    assert rollback[0]["restored_from"] == "memory"
    # Not 35% above, as a run that never rolled back ended: within 5% of a clean run of the same length.
    final = [_final_eval(tmp_path / name) for name in ("clean", "early")]
    assert final[1] < 1.05 * final[0], final
