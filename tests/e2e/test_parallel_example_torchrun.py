"""The first documented `tools/example_parallel.py` command of docs/parallelism.md, run as written under torchrun
(a 2-stage GPipe pipeline, 2 processes): it must still work and print the documented line (the loss may differ
in its last digits between machines; the rest must match)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from tests.support.files import REPO

DOC = os.path.join(REPO, "docs", "parallelism.md")
COMMAND = "$ torchrun --standalone --nproc-per-node 2 tools/example_parallel.py --trainer pipeline "


def _documented() -> tuple[list[str], str]:
    """The documented command's arguments after `torchrun` and the output line shown under it."""
    with open(DOC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(COMMAND) and "--resume" not in line:
            return shlex.split(line[len("$ torchrun "):]), lines[i + 1]
    raise AssertionError(f"{DOC} no longer shows a command starting with {COMMAND!r}")


def test_documented_pipeline_example_runs_under_torchrun(tmp_path):
    args, expected = _documented()
    run_dir = args.index("--run-dir") + 1
    args[run_dir] = str(tmp_path / "pipe")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pattern = re.escape(expected).replace(re.escape(re.search(r"loss (\S+),", expected).group(1)), r"[0-9.]+")
    assert re.search(pattern, proc.stdout), f"expected a line like {expected!r}; got:\n{proc.stdout[-2000:]}"
    kept = sorted(n for n in os.listdir(tmp_path / "pipe") if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-00000004", "checkpoint-00000008"], kept
