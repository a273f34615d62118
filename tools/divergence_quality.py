"""How fast DivergenceDetector catches divergences, and how often it cries wolf on healthy runs.

    python tools/divergence_quality.py                 # defaults: logging every 32 steps
    python tools/divergence_quality.py --healthy 500 --json
    python tools/divergence_quality.py --warmup 4 --patience 3 --threshold 1.0   # the demo's setting

Loss curves are generated (seeded, no data needed) as a run logged every `--log-every` steps would see
them: the mean train loss over each logging window. Healthy curves decay from ~10 towards 2-4 with
per-step noise, a learning-rate warm-up, cosine-schedule bumps and an occasional warm restart.
Divergent curves follow a healthy start and then go bad in one of several shapes at a known entry; the
"early" ones go bad a few entries after the detector's warm-up, while the loss is still falling fast (where
a best value that lags the curve hides a jump). Latency is counted in log entries from the first bad entry
to the trigger (1 = caught on that entry). A trigger before the first bad entry is a false positive too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trainers.divergence import DivergenceDetector


def healthy(seed: int, entries: int, log_every: int) -> list[float]:
    """Mean train loss per logging window of a healthy run."""
    rng = random.Random(seed)
    start, floor = rng.uniform(8.0, 11.0), rng.uniform(2.0, 4.0)
    rate = rng.uniform(0.02, 0.08)  # per log entry
    noise = rng.uniform(0.2, 0.6)  # per-step std; a window's mean has std noise / sqrt(log_every)
    warmup = rng.randint(2, 8)
    restart = rng.randint(entries // 3, entries) if rng.random() < 0.3 else None
    out = []
    for i in range(entries):
        base = floor + (start - floor) * math.exp(-rate * i)
        if i < warmup:  # LR warm-up: the loss lingers near its start
            base = start - (start - base) * (i / warmup)
        base += 0.15 * math.sin(i / rng.uniform(6, 15))  # schedule bumps
        if restart is not None and restart <= i < restart + 6:  # a warm restart: a brief, modest rise
            base += 0.5 * math.exp(-(i - restart) / 2)
        steps = [base + rng.gauss(0, noise) for _ in range(log_every)]
        out.append(sum(steps) / log_every)
    return out


def _with_onset(seed: int, entries: int, log_every: int, onset: int, bad: Callable[[int, float], float]) -> list[float]:
    curve = healthy(seed, entries, log_every)
    return curve[:onset] + [bad(i, curve[onset - 1]) for i in range(entries - onset)]


SHAPES: dict[str, Callable[[int, float], float]] = {
    "jump 3.8 -> 9.7": lambda i, last: 9.7,
    "jump to 2x": lambda i, last: 2 * last,
    "ramp +0.25/entry": lambda i, last: last + 0.25 * (i + 1),
    "slow drift +0.08/entry": lambda i, last: last + 0.08 * (i + 1),
    "exponential blow-up": lambda i, last: last * 1.15 ** (i + 1),
    "NaN burst": lambda i, last: float("nan") if i < 3 else last,
    "Inf": lambda i, last: float("inf"),
}
# Shapes started a few entries after warm-up, while the healthy loss still falls fast.
EARLY_SHAPES: dict[str, Callable[[int, float], float]] = {
    "early jump +1.4": lambda i, last: last + 1.4,
    "early jump to 2x": lambda i, last: 2 * last,
    "early ramp +0.25/entry": lambda i, last: last + 0.25 * (i + 1),
}


def first_trigger(curve: list[float], detector: DivergenceDetector, log_every: int) -> int | None:
    for i, value in enumerate(curve):
        if detector.observe(value, (i + 1) * log_every):
            return i
    return None


def make_detector(args: argparse.Namespace) -> DivergenceDetector:
    """A fresh detector with the settings under test (the detector's defaults where a flag is not given)."""
    settings = {k: getattr(args, k, None) for k in ("smoothing", "threshold", "relative_threshold", "patience",
                                                     "warmup")}
    return DivergenceDetector(**{k: v for k, v in settings.items() if v is not None})


def _divergent_curve(name: str, shape: Callable[[int, float], float], seed: int, args: argparse.Namespace,
                     warmup: int) -> tuple[list[float], int]:
    if name == "jump 3.8 -> 9.7":  # the example: a run sitting at 3.8 that jumps to 9.7
        onset = 20 + seed % 30
        return [3.8 + random.Random(seed * 7 + k).gauss(0, 0.05) for k in range(onset)] + [9.7] * 20, onset
    onset = warmup + 2 + seed % 8 if name in EARLY_SHAPES else 20 + seed % 30
    return _with_onset(seed, onset + 40, args.log_every, onset, shape), onset


def run(args: argparse.Namespace) -> dict:
    """False positives on healthy curves and detection latency per divergence shape, for the given settings."""
    warmup = make_detector(args).warmup
    false_positives = []
    for seed in range(args.healthy):
        hit = first_trigger(healthy(seed, args.entries, args.log_every), make_detector(args), args.log_every)
        if hit is not None:
            false_positives.append({"seed": seed, "entry": hit})
    cases = []
    for name, shape in {**SHAPES, **EARLY_SHAPES}.items():
        latencies, early_triggers = [], 0
        for seed in range(args.divergent):
            curve, onset = _divergent_curve(name, shape, seed, args, warmup)
            hit = first_trigger(curve, make_detector(args), args.log_every)
            early_triggers += hit is not None and hit < onset
            latencies.append(None if hit is None or hit < onset else hit - onset + 1)
        caught = [x for x in latencies if x is not None]
        cases.append({"shape": name, "runs": len(latencies), "caught": len(caught),
                      "triggered_before_onset": early_triggers,
                      "latency_entries_max": max(caught) if caught else None,
                      "latency_entries_mean": sum(caught) / len(caught) if caught else None})
    return {"log_every": args.log_every, "settings": {k: v for k, v in vars(args).items() if k in (
        "smoothing", "threshold", "relative_threshold", "patience", "warmup")},
            "healthy_runs": args.healthy, "false_positives": false_positives, "divergent": cases}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--healthy", type=int, default=300, help="healthy curves to run (default 300)")
    p.add_argument("--divergent", type=int, default=50, help="curves per divergence shape (default 50)")
    p.add_argument("--entries", type=int, default=150, help="log entries per healthy curve (default 150)")
    p.add_argument("--log-every", type=int, default=32, help="steps per log entry (default 32)")
    d = p.add_argument_group("detector settings (default: DivergenceDetector's own)")
    d.add_argument("--threshold", type=float, default=None, help="absolute margin over the best level")
    d.add_argument("--relative-threshold", type=float, default=None, help="factor over the best level")
    d.add_argument("--patience", type=int, default=None, help="bad log entries in a row that trigger")
    d.add_argument("--smoothing", type=float, default=None, help="EMA weight of the newest entry, in (0, 1]")
    d.add_argument("--warmup", type=int, default=None, help="log entries before a best level is kept")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    shown = make_detector(args)
    print(f"DivergenceDetector(smoothing={shown.smoothing}, threshold={shown.threshold}, relative_threshold="
          f"{shown.relative_threshold}, patience={shown.patience}, warmup={shown.warmup}), one log entry per "
          f"{args.log_every} steps")
    print(f"healthy runs: {args.healthy}, false positives: {len(result['false_positives'])}")
    print(f"\n  {'divergence':24} {'caught':>9} {'latency (entries) mean':>23} {'max':>5} {'before onset':>13}")
    for c in result["divergent"]:
        mean = "-" if c["latency_entries_mean"] is None else f"{c['latency_entries_mean']:.2f}"
        worst = "-" if c["latency_entries_max"] is None else str(c["latency_entries_max"])
        print(f"  {c['shape']:24} {c['caught']:>4}/{c['runs']:<4} {mean:>23} {worst:>5} "
              f"{c['triggered_before_onset']:>13}")


if __name__ == "__main__":
    main()
