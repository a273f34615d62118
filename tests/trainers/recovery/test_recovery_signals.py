"""Signals under a recovery policy: handle_signals=False leaves them alone, and SIGTERM to a plain (one-process)
demo run saves a checkpoint and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.support.files import REPO
from tests.support.recovery import SendSignal, logged_step, train
from trainers.recovery import RecoveryPolicy, read_events

TINY = ["--eval-steps", "1000", "--save-steps", "1000", "--logging-steps", "2", "--n-layer", "1", "--d-model", "32",
        "--block-size", "32", "--batch-size", "4", "--eval-windows", "16", "--warmup-steps", "4",
        "--sample-bytes", "0", "--threads", "1"]


def test_handle_signals_false_leaves_the_signal_to_its_own_handler(tmp_path):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: received.append(number))
    try:
        t, _ = train(str(tmp_path), recovery=RecoveryPolicy(detector=None, handle_signals=False),
                     callbacks=[SendSignal(5, sig=signal.SIGUSR1)], max_steps=12)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]
    assert t.state.global_step == 12 and read_events(str(tmp_path)) == []


def test_sigterm_saves_a_checkpoint_and_the_process_exits_0(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainers.demo", "--run-dir", str(run), "--max-steps", "100000", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not logged_step(run, 10):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)  # a bound, so a save that never ends fails the test
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    (saved,) = [e for e in read_events(str(run)) if e["kind"] == "emergency_save"]
    step = saved["step"]
    assert step >= 10 and os.path.isfile(run / f"checkpoint-{step:08d}" / "checkpoint_manifest.json")

