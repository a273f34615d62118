"""The demo's recovery flags: the policy (--recovery / --no-recovery), faults to inject (--inject-*), and the
events shown in the end-of-run report."""

from __future__ import annotations

import argparse
import os
from typing import Any

from trainers.recovery import EVENTS_FILE, FaultInjection, read_events

DEFAULT_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recovery.toml")


def add_recovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recovery", "what happens when the run goes bad (docs/recovery.md)")
    g.add_argument("--recovery", default=DEFAULT_POLICY, metavar="TOML",
                   help="a recovery policy file with a [recovery] table (default: trainers/demo/recovery.toml: roll "
                        "back on divergence and NaN streaks, skip gradient spikes, retry out-of-memory, health checks)")
    g.add_argument("--no-recovery", action="store_true", help="train without a recovery policy")
    g.add_argument("--step-timeout", type=float, default=300.0, metavar="S",
                   help="a rank whose training step runs longer than S seconds is hung: it exits with code 75 so "
                        "torchrun --max-restarts restarts the job (with or without recovery; 0: off)")
    g.add_argument("--inject-divergence", type=int, default=None, metavar="STEP",
                   help="multiply the learning rate by --inject-lr-factor at STEP so the run truly diverges")
    g.add_argument("--inject-lr-factor", type=float, default=100.0, help="the factor of --inject-divergence")
    g.add_argument("--inject-nan", type=int, default=None, metavar="STEP", help="a NaN loss at STEP on one rank")
    g.add_argument("--inject-oom", type=int, default=None, metavar="STEP",
                   help="an out-of-memory error in the forward pass at STEP on one rank")
    g.add_argument("--inject-hang", type=int, default=None, metavar="STEP",
                   help="one rank hangs in a collective at STEP (first attempt only; under torchrun --max-restarts "
                        "the restart resumes from the latest checkpoint)")
    g.add_argument("--inject-rank", type=int, default=None, metavar="R",
                   help="the rank of --inject-nan/--inject-oom/--inject-hang (default: the last rank)")


def recovery_option(opts: argparse.Namespace) -> Any:
    """TrainingArguments.recovery for these flags."""
    return None if opts.no_recovery else opts.recovery


def recovery_callbacks(opts: argparse.Namespace) -> list[Any]:
    steps = (opts.inject_divergence, opts.inject_nan, opts.inject_oom, opts.inject_hang)
    if all(s is None for s in steps):
        return []
    return [FaultInjection(divergence_step=opts.inject_divergence, divergence_lr_factor=opts.inject_lr_factor,
                           nan_step=opts.inject_nan, oom_step=opts.inject_oom, hang_step=opts.inject_hang,
                           rank=opts.inject_rank)]


def recovery_report(run_dir: str) -> str:
    """The run's recovery events, one line each ("" when there were none)."""
    events = read_events(run_dir)
    if not events:
        return ""
    lines = [f"\nRecovery events ({len(events)}, from {run_dir}/{EVENTS_FILE}):"]
    for e in events:
        who = f" ranks {e['ranks']}" if e.get("ranks") else ""
        values = e.get("values") or {}
        shown = ", ".join(f"{k}={_short(k, v)}" for k, v in values.items() if k not in ("set_aside",))
        lines.append(f"  step {e['step']:>5}  {e['kind']:<19} -> {e['action']:<13}{who}  {e['reason']}"
                     + (f" [{shown}]" if shown else ""))
    return "\n".join(lines) + "\n"


def _short(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if "checkpoint" in key and isinstance(value, str):
        return os.path.basename(value)
    return str(value)
