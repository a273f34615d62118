"""Diverged weights are never ranked best and never replace a checkpoint already on disk.

Used for every save by the trainer (with or without a recovery policy): the ranks agree on whether the
weights are diverged and on whether rank 0 already sees a checkpoint for the step; a diverged save has its
evaluation metrics replaced by NaN (which ckpt retention never ranks) and is left out when it would
overwrite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..keys import EVAL_PREFIX

log = logging.getLogger("trainers")

DIVERGED = "diverged"  # a metric set to True in the manifest of a checkpoint holding diverged weights


def mark_diverged(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with every evaluation metric moved to `diverged_<name>` and replaced by NaN."""
    out = dict(metrics)
    for name, value in metrics.items():
        if name.startswith(EVAL_PREFIX):
            out[f"{DIVERGED}_{name}"] = value
            out[name] = math.nan
    out[DIVERGED] = True
    return out


def agree_on_save(reduce: Callable[[torch.Tensor], torch.Tensor], rank: int, *, diverged: bool,
                  exists: Callable[[], bool], extra: list[float] | None = None) -> tuple[bool, bool, list[float]]:
    """(diverged on any rank, checkpoint exists in rank 0's view, the sums of `extra`): one small all-reduce."""
    values = torch.tensor([float(diverged), float(rank == 0 and exists()), *(extra or [])], dtype=torch.float64)
    summed = reduce(values).tolist()
    return summed[0] > 0, summed[1] > 0, summed[2:]


def guard_save(reduce: Callable[[torch.Tensor], torch.Tensor], rank: int, step: int, metrics: dict[str, Any], *,
               diverged: bool, exists: Callable[[], bool]) -> dict[str, Any] | None:
    """The metrics to save with (marked when diverged), or None to leave this save out (on every rank)."""
    any_diverged, found, _ = agree_on_save(reduce, rank, diverged=diverged, exists=exists)
    if not any_diverged:
        return metrics
    if found:
        if rank == 0:
            log.warning("not saving step %d: the weights are diverged and a checkpoint for that step exists; it is "
                        "kept as it is", step)
        return None
    return mark_diverged(metrics)
