"""Record real per-step training losses of healthy demo runs, as test data for the divergence detector.

    python tools/record_step_losses.py                       # every run below -> tools/data/step_losses.json
    python tools/record_step_losses.py --only seed1-2ranks   # one run, merged into the existing file

Each run is the demo (`trainers.demo`) with a log line every step and no recovery policy, so the logged
`loss` of step s is the mean over ranks of step s's loss: what a per-step DivergenceDetector observes. The
runs differ in seed, model size, learning rate, batch size and world size; the divergent ones have the
learning rate multiplied at a known step (--inject-divergence). tools/divergence_quality.py replays them
(`--per-step`), and tests/trainers/test_divergence.py asserts its targets on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tools", "data", "step_losses.json")

# name -> (ranks, demo flags); ranks > 1 runs under torchrun.
RUNS: dict[str, tuple[int, list[str]]] = {
    "seed0-2ranks": (2, ["--seed", "0"]),
    "seed1-2ranks": (2, ["--seed", "1"]),
    "seed0-4ranks": (4, ["--seed", "0"]),
    "seed2-1rank": (1, ["--seed", "2"]),
    "small-lr1e-3": (1, ["--seed", "3", "--n-layer", "2", "--d-model", "64", "--lr", "1e-3"]),
    "wide-batch16": (1, ["--seed", "4", "--n-layer", "4", "--d-model", "128", "--batch-size", "16"]),
    "short-ctx-lr6e-3": (1, ["--seed", "5", "--block-size", "32", "--dropout", "0", "--lr", "6e-3"]),
    "dispatch-2ranks": (2, ["--seed", "6", "--dispatch-batches", "--warmup-steps", "10"]),
}
# Runs that go bad on purpose (--inject-divergence: the learning rate multiplied at that step), recorded the same
# way: what a detector must catch, on real noise. name -> (ranks, demo flags, the injected step).
DIVERGENT: dict[str, tuple[int, list[str], int]] = {
    "inject330-2ranks": (2, ["--seed", "0", "--inject-divergence", "330"], 330),
    "inject70-2ranks": (2, ["--seed", "0", "--inject-divergence", "70", "--max-steps", "120"], 70),
    "inject330-x10-1rank": (1, ["--seed", "2", "--inject-divergence", "330", "--inject-lr-factor", "10"], 330),
    "inject500-x30-1rank": (1, ["--seed", "3", "--n-layer", "2", "--d-model", "64", "--inject-divergence", "500",
                                "--inject-lr-factor", "30"], 500),
}


def record(ranks: int, flags: list[str], max_steps: int) -> list[float]:
    """The per-step losses of one demo run."""
    run_dir = tempfile.mkdtemp(prefix="step-losses-")
    try:
        demo = ["-m", "trainers.demo", "--run-dir", run_dir, "--max-steps", str(max_steps), "--logging-steps", "1",
                "--no-recovery", "--sample-bytes", "0", "--save-steps", str(max_steps), "--eval-steps",
                str(max_steps), *flags]
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc-per-node", str(ranks)]
        subprocess.run([*launcher, *demo], cwd=ROOT, check=True, capture_output=True, text=True)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            entries = [json.loads(line) for line in f]
        return [round(e["loss"], 4) for e in entries if e.get("kind") == "train"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="the JSON file to write (default tools/data/step_losses.json)")
    p.add_argument("--max-steps", type=int, default=800, help="steps per run (default 800, the demo's)")
    p.add_argument("--only", nargs="*", default=None, metavar="NAME",
                   help=f"runs to record (of {sorted(RUNS) + sorted(DIVERGENT)}), merged into the existing file")
    args = p.parse_args(argv)
    data: dict = {"source": "python tools/record_step_losses.py", "runs": {}, "divergent": {}}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            data.update(json.load(f))
    for name in args.only or [*RUNS, *DIVERGENT]:
        ranks, flags, *onset = RUNS.get(name) or DIVERGENT[name]
        print(f"recording {name} ({ranks} rank(s), {' '.join(flags)})", flush=True)
        entry = {"ranks": ranks, "flags": flags, "losses": record(ranks, flags, args.max_steps)}
        if onset:
            entry["inject_step"] = onset[0]
        data["divergent" if onset else "runs"][name] = entry
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
