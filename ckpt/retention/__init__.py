"""Which checkpoints to keep and carrying it out. `rules` decides (small composable rules: newest K, best N
by a metric, every N steps, pins, and any user rule with the same `keep` method), as a pure function of
what is on disk; `catalog` reads a run directory as retention sees it and deletes what a decision drops."""

from __future__ import annotations

from .rules import (
    BestCheckpoint,
    CheckpointDecision,
    CheckpointInfo,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    KeepPaths,
    KeepPinned,
    RetentionDecision,
    RetentionPolicy,
    RetentionRule,
    infer_greater_is_better,
    metric_value,
)

__all__ = ["BestCheckpoint", "CheckpointDecision", "CheckpointInfo", "KeepBest", "KeepEveryNSteps", "KeepLatest",
           "KeepPaths", "KeepPinned", "RetentionDecision", "RetentionPolicy", "RetentionRule",
           "infer_greater_is_better", "metric_value"]
