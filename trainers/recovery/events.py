"""Recovery events: one record per decision, appended as a JSON line to `run_dir/recovery_events.jsonl`.

Every line holds `time` (Unix seconds), `step`, `kind`, `action`, `reason`, `ranks` (the ranks the event
is about; empty when it concerns the whole job) and `values` (numbers behind the decision). Non-finite
numbers are written as the strings "nan", "inf" and "-inf", so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

EVENTS_FILE = "recovery_events.jsonl"

NON_FINITE = "non_finite"
GRAD_NORM_SPIKE = "grad_norm_spike"
DIVERGENCE = "divergence"
ROLLBACK = "rollback"
LR_CHANGE = "lr_change"
OOM_RETRY = "oom_retry"
HEALTH_CHECK_FAILED = "health_check_failed"
EMERGENCY_SAVE = "emergency_save"
GAVE_UP = "gave_up"
KINDS = (NON_FINITE, GRAD_NORM_SPIKE, DIVERGENCE, ROLLBACK, LR_CHANGE, OOM_RETRY, HEALTH_CHECK_FAILED,
         EMERGENCY_SAVE, GAVE_UP)


@dataclass
class RecoveryEvent:
    """One recovery decision. Callbacks receive it in `on_instability(..., event=...)`.

    A callback may set `action` to another of `allowed` (empty: the event only informs); rank 0's final
    choice is applied on every rank.
    """

    kind: str
    step: int
    action: str
    reason: str
    ranks: tuple[int, ...] = ()
    values: dict[str, Any] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()
    time: float = field(default_factory=time.time)

    def to_plain(self) -> dict[str, Any]:
        return {"time": round(self.time, 3), "step": self.step, "kind": self.kind, "action": self.action,
                "reason": self.reason, "ranks": list(self.ranks), "values": _finite(self.values)}

    def describe(self) -> str:
        """One line for logs and the end-of-run summary."""
        shown = ", ".join(f"{k}={_short(v)}" for k, v in self.values.items())
        who = f" on ranks {list(self.ranks)}" if self.ranks else ""
        return f"step {self.step}: {self.kind}{who} -> {self.action} ({self.reason}{'; ' + shown if shown else ''})"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class EventLog:
    """Appends events to the run's event file (on the ranks where it is enabled) and keeps them in memory."""

    def __init__(self, run_dir: str, *, enabled: bool):
        self.path = os.path.join(run_dir, EVENTS_FILE)
        self.enabled = enabled
        self.events: list[RecoveryEvent] = []  # this process's events, in order

    def start(self, fresh: bool) -> None:
        """A fresh run moves an old event file aside (like metrics.jsonl); a resumed run appends to it."""
        if self.enabled and fresh and os.path.exists(self.path):
            os.replace(self.path, self.path + ".previous")

    def record(self, event: RecoveryEvent, *, write: bool | None = None) -> None:
        """Keep `event`; append it to the file when this rank writes (`write` overrides, for per-rank events)."""
        self.events.append(event)
        if not (self.enabled if write is None else write):
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event.to_plain()) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a health-check failure exits right after writing


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """The events recorded in `run_dir` (empty when there are none); unreadable lines are skipped."""
    path = os.path.join(run_dir, EVENTS_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return out
