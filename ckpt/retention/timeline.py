"""Abandoned timelines: the one rule for checkpoints newer than the step a job went back to.

A job that loads step S (a resume from an older checkpoint on purpose, a fallback past a damaged one, a
trainer's rollback) and then trains on writes a new timeline from S. The committed checkpoints newer than S
belong to the old one: a resume from "latest" must never pick them, and a save at one of their steps must not
fail because the name is taken. So they are set aside, by rank 0, as `run_dir/abandoned/<label>/<name>/`:
still committed (inspectable, `ckpt ls` lists them as abandoned), never loaded as latest, never ranked best,
and removed by retention like any checkpoint it does not keep (a pinned one is kept).
"""

from __future__ import annotations

import logging
import os

from ..format.layout import ABANDONED_DIR, list_checkpoints
from ..io.storage import Storage

log = logging.getLogger("ckpt")


def went_back_label(step: int, at_step: int) -> str:
    """The label of a timeline abandoned when a job that loaded `step` saved `at_step`."""
    return f"after-step-{step}-saved-{at_step}"


def _free_label(storage: Storage, root: str, label: str) -> str:
    """`label`, or `label-2`, `label-3`... when a timeline of that name was set aside before."""
    name, n = label, 1
    while storage.exists(os.path.join(root, name)):
        n += 1
        name = f"{label}-{n}"
    return name


def newer_than(storage: Storage, run_dir: str, step: int, before_step: int | None = None) -> list[str]:
    """The committed checkpoints newer than `step` (and older than `before_step`, when given), oldest first."""
    return [r.path for r in list_checkpoints(storage, run_dir)
            if r.step > step and (before_step is None or r.step < before_step)]


def set_aside_newer(storage: Storage, run_dir: str, step: int, label: str,
                    before_step: int | None = None) -> list[str]:
    """Move every committed checkpoint newer than `step` (and older than `before_step`) to
    run_dir/abandoned/<label>/ (rank 0 only). Each move is one rename, so a checkpoint is always either in the
    run's timeline or set aside, whole. Returns the new paths."""
    doomed = newer_than(storage, run_dir, step, before_step)
    if not doomed:
        return []
    if not getattr(storage, "renames", True):
        # Object storage has no rename, and copying every file of a checkpoint is not one atomic step: the newer
        # checkpoints stay where they are (a save at one of their steps then needs overwrite=True).
        log.warning("%d checkpoint(s) newer than step %d belong to an abandoned timeline, but %s cannot rename "
                    "them aside; they stay in the run's timeline: %s", len(doomed), step, run_dir, doomed)
        return []
    root = os.path.join(run_dir, ABANDONED_DIR)
    dest = os.path.join(root, _free_label(storage, root, label))
    storage.makedirs(dest)
    moved = []
    for path in doomed:
        target = os.path.join(dest, os.path.basename(os.path.normpath(path)))
        storage.rename(path, target)
        moved.append(target)
    storage.fsync_dir(run_dir)
    storage.fsync_dir(dest)
    log.warning("set aside %d checkpoint(s) newer than step %d as an abandoned timeline: %s (never loaded as "
                "latest; retention removes them unless pinned)", len(moved), step, dest)
    return moved


__all__ = ["newer_than", "set_aside_newer", "went_back_label"]
