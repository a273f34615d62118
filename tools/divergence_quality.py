"""How fast DivergenceDetector catches divergences, and how often it cries wolf on healthy runs.

    python tools/divergence_quality.py                 # one value per log line of 32 steps, detector defaults
    python tools/divergence_quality.py --healthy 500 --json
    python tools/divergence_quality.py --per-step --relative-threshold 1.5   # every step's loss, the demo's policy

With --per-step the detector sees every step's loss: the synthetic families step by step (the divergence shapes
paced per log entry of --log-every steps), plus the real per-step losses of demo runs recorded by
tools/record_step_losses.py (tools/data/step_losses.json): false positives on the healthy ones, the shapes
injected into them, and the recorded runs whose learning rate was multiplied at a known step. Latency then
counts steps from the first bad one.

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
import itertools
import json
import math
import os
import random
import statistics
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trainers.divergence import DivergenceDetector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tools", "data", "step_losses.json")


def healthy(seed: int, entries: int, log_every: int) -> list[float]:
    """Mean train loss per logging window of a healthy run."""
    steps = healthy_steps(seed, entries, log_every)
    return [sum(steps[i:i + log_every]) / log_every for i in range(0, len(steps), log_every)]


def healthy_steps(seed: int, entries: int, log_every: int) -> list[float]:
    """Every step's train loss of a healthy run of `entries` x `log_every` steps (healthy() averages them)."""
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
        out += [base + rng.gauss(0, noise) for _ in range(log_every)]
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


SETTINGS = ("smoothing", "threshold", "relative_threshold", "patience", "warmup")


def make_detector(args: argparse.Namespace) -> DivergenceDetector:
    """A fresh detector with the settings under test (the detector's defaults where a flag is not given)."""
    settings = {k: getattr(args, k, None) for k in SETTINGS}
    return DivergenceDetector(**{k: v for k, v in settings.items() if v is not None},
                              per_step=bool(getattr(args, "per_step", False)))


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
    return {"log_every": args.log_every, "settings": {k: v for k, v in vars(args).items() if k in SETTINGS},
            "healthy_runs": args.healthy, "false_positives": false_positives, "divergent": cases}

# ---- per step -----------------------------------------------------------------------------------------


def _noise(curve: list[float], end: int, span: int = 64) -> float:
    """The per-step noise of `curve` just before `end`: the std of step-to-step differences over sqrt(2)."""
    diffs = [b - a for a, b in itertools.pairwise(curve[max(0, end - span):end])]
    return statistics.stdev(diffs) / math.sqrt(2) if len(diffs) > 1 else 0.0


def _go_bad(curve: list[float], onset: int, shape: Callable[[int, float], float], log_every: int, seed: int,
            length: int) -> list[float]:
    """`curve` up to step `onset`, then `length` steps of `shape` (its pace per log entry of `log_every` steps)
    from the level of the last entry, with the curve's own per-step noise."""
    rng = random.Random(seed)
    level = statistics.fmean(curve[onset - log_every:onset])
    sigma = _noise(curve, onset)
    return curve[:onset] + [shape((i + 1) / log_every - 1, level) + rng.gauss(0, sigma) for i in range(length)]


def _step_trigger(curve: list[float], detector: DivergenceDetector) -> int | None:
    """The 1-based step of the first trigger, or None."""
    return next((i + 1 for i, value in enumerate(curve) if detector.observe(value, i + 1)), None)


def _latencies(name: str, runs: list[tuple[list[float], int]], args: argparse.Namespace) -> dict:
    """Detection per shape: `runs` are (curve, onset): steps up to `onset` healthy, bad from onset + 1."""
    latencies, early = [], 0
    for curve, onset in runs:
        hit = _step_trigger(curve, make_detector(args))
        early += hit is not None and hit <= onset
        latencies.append(None if hit is None or hit <= onset else hit - onset)
    caught = [x for x in latencies if x is not None]
    return {"shape": name, "runs": len(latencies), "caught": len(caught), "triggered_before_onset": early,
            "latency_steps_max": max(caught) if caught else None,
            "latency_steps_mean": sum(caught) / len(caught) if caught else None}


def _synthetic_jump(seed: int) -> tuple[list[float], int]:
    """The issue's example per step: a run sitting at 3.8 (per-step noise 0.3) that jumps to 9.7."""
    rng = random.Random(seed * 7)
    onset = 600 + 32 * (seed % 30)
    return [3.8 + rng.gauss(0, 0.3) for _ in range(onset)] + [9.7 + rng.gauss(0, 0.3) for _ in range(640)], onset


def run_per_step(args: argparse.Namespace) -> dict:
    """Per-step curves: synthetic (healthy_steps, the shapes paced per log entry of --log-every steps) and the
    recorded real ones of --data (healthy: false positives; with the shapes injected; the recorded divergent
    runs)."""
    warmup = make_detector(args).warmup
    n = args.entries * args.log_every
    fps = [{"seed": s, "step": hit} for s in range(args.healthy)
           if (hit := _step_trigger(healthy_steps(s, args.entries, args.log_every), make_detector(args)))]
    cases = [_latencies("jump 3.8 -> 9.7", [_synthetic_jump(s) for s in range(args.divergent)], args)]
    for name, shape in {**SHAPES, **EARLY_SHAPES}.items():
        if name == "jump 3.8 -> 9.7":
            continue
        runs = []
        for seed in range(args.divergent):
            curve = healthy_steps(seed, args.entries, args.log_every)
            onset = warmup + 64 + 8 * seed if name in EARLY_SHAPES else 640 + 32 * (seed % 30)
            runs.append((_go_bad(curve, onset, shape, args.log_every, seed, min(640, n - onset)), onset))
        cases.append(_latencies(name, runs, args))
    result = {"per_step": True, "log_every": args.log_every, "settings": _shown(args), "healthy_runs": args.healthy,
              "false_positives": fps, "divergent": cases}
    if args.data:
        result["real"] = _real(args)
    return result


def _real(args: argparse.Namespace) -> dict:
    with open(args.data) as f:
        data = json.load(f)
    healthy = {name: run["losses"] for name, run in data["runs"].items()}
    fps = [{"run": name, "step": hit} for name, curve in healthy.items()
           if (hit := _step_trigger(curve, make_detector(args)))]
    cases = []
    for name, shape in SHAPES.items():
        runs = [(_go_bad(curve, onset, shape, args.log_every, k, 400), onset)
                for k, curve in enumerate(healthy.values()) for onset in (150, 300, 400) if onset + 400 <= len(curve)]
        cases.append(_latencies(name, runs, args))
    recorded = []
    for name, run in data.get("divergent", {}).items():
        detector = make_detector(args)
        hit = _step_trigger(run["losses"], detector)
        recorded.append({"run": name, "inject_step": run["inject_step"], "trigger_step": hit,
                         "first_bad_step": detector.first_bad_step, "checked_through": detector.checked_through()})
    return {"source": os.path.relpath(args.data, ROOT), "healthy_runs": len(healthy), "false_positives": fps, "injected": cases,
            "recorded_divergent": recorded}


def _shown(args: argparse.Namespace) -> dict:
    d = make_detector(args)
    return {k: getattr(d, k) for k in SETTINGS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--healthy", type=int, default=300, help="healthy curves to run (default 300)")
    p.add_argument("--divergent", type=int, default=50, help="curves per divergence shape (default 50)")
    p.add_argument("--entries", type=int, default=150, help="log entries per healthy curve (default 150)")
    p.add_argument("--log-every", type=int, default=32, help="steps per log entry (default 32)")
    p.add_argument("--per-step", action="store_true",
                   help="a detector that sees every step's loss (per_step=True), on per-step curves")
    p.add_argument("--data", default=None, metavar="JSON",
                   help=f"with --per-step: recorded real curves to replay too (default {DATA}; '' for none)")
    d = p.add_argument_group("detector settings (default: DivergenceDetector's own)")
    d.add_argument("--threshold", type=float, default=None, help="absolute margin over the best level")
    d.add_argument("--relative-threshold", type=float, default=None, help="factor over the best level")
    d.add_argument("--patience", type=int, default=None, help="bad observations in a row that trigger")
    d.add_argument("--smoothing", type=float, default=None, help="EMA weight of the newest observation, in (0, 1]")
    d.add_argument("--warmup", type=int, default=None, help="observations before a best level is kept")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.data is None and args.per_step:
        args.data = DATA
    return args


def _table(cases: list[dict], unit: str) -> None:
    print(f"\n  {'divergence':24} {'caught':>9} {f'latency ({unit}) mean':>23} {'max':>5} {'before onset':>13}")
    for c in cases:
        mean = "-" if c[f"latency_{unit}_mean"] is None else f"{c[f'latency_{unit}_mean']:.2f}"
        worst = "-" if c[f"latency_{unit}_max"] is None else str(c[f"latency_{unit}_max"])
        print(f"  {c['shape']:24} {c['caught']:>4}/{c['runs']:<4} {mean:>23} {worst:>5} "
              f"{c['triggered_before_onset']:>13}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_per_step(args) if args.per_step else run(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    shown = make_detector(args)
    every = "every step's loss" if args.per_step else f"one log entry per {args.log_every} steps"
    print(f"DivergenceDetector(smoothing={shown.smoothing}, threshold={shown.threshold}, relative_threshold="
          f"{shown.relative_threshold}, patience={shown.patience}, warmup={shown.warmup}), {every}")
    print(f"synthetic healthy runs: {args.healthy}, false positives: {len(result['false_positives'])}")
    _table(result["divergent"], "steps" if args.per_step else "entries")
    real = result.get("real")
    if real:
        print(f"\nrecorded demo runs ({real['source']}): {real['healthy_runs']} healthy, false positives: "
              f"{len(real['false_positives'])} {real['false_positives'] or ''}")
        print("the shapes injected into them (paced per log entry of --log-every steps):")
        _table(real["injected"], "steps")
        print("\nrecorded divergent runs (the learning rate multiplied at inject_step):")
        for r in real["recorded_divergent"]:
            print(f"  {r['run']:24} inject_step {r['inject_step']:>4}  trigger_step {r['trigger_step']}  "
                  f"first_bad_step {r['first_bad_step']}  checked_through {r['checked_through']}")


if __name__ == "__main__":
    main()
