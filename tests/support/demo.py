"""Flags and environment for launching the demo job (trainers/demo) small and fast from tests."""

from __future__ import annotations

import os

from tests.support.files import REPO

# A one-layer model that evaluates and saves every few steps: a torchrun job of seconds.
TINY = ["--eval-steps", "4", "--save-steps", "8", "--logging-steps", "2", "--n-layer", "1", "--d-model", "32",
        "--block-size", "32", "--batch-size", "4", "--eval-windows", "16", "--warmup-steps", "4",
        "--save-total-limit", "1", "--preserve-n-best", "1", "--sample-bytes", "0", "--threads", "1"]
# The default model for 240 steps, saving and evaluating every 40.
SHORT = ["--threads", "1", "--sample-bytes", "0", "--max-steps", "240", "--logging-steps", "10", "--save-steps", "40",
         "--eval-steps", "40", "--warmup-steps", "20"]
# The checkout first on the path, one compute thread per rank.
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
