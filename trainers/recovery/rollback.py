"""Where a rollback goes, keeping that checkpoint safe from retention meanwhile, and setting aside the
checkpoints of the abandoned stretch of the run. File operations here run on rank 0 only."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ckpt import CheckpointCoordinator, CheckpointRef, pin_checkpoint, unpin_checkpoint

from .policy import RecoveryPolicy

log = logging.getLogger("trainers")

ROLLED_BACK_DIR = "rolled_back"  # run_dir/rolled_back/rollback-<n>-at-<step>/checkpoint-<step>/


def good_candidates(refs: Sequence[CheckpointRef], first_bad: int) -> list[CheckpointRef]:
    """Committed checkpoints saved before the first bad observation (a checkpoint of step s is saved after
    step s's observation, so s itself is not good)."""
    return [r for r in refs if r.step < first_bad]


def choose_target(coordinator: CheckpointCoordinator, policy: RecoveryPolicy, first_bad: int,
                  trigger_step: int) -> CheckpointRef | None:
    """The checkpoint a rollback loads, per `policy.rollback_to`; None when there is none."""
    good = good_candidates(coordinator.checkpoints(), first_bad)
    if not good:
        return None
    back = policy.steps_back
    if back is not None:
        earlier = [r for r in good if r.step <= trigger_step - back]
        return earlier[-1] if earlier else None
    if policy.rollback_to == "best":
        steps = {r.step for r in good}
        ranked = [b for b in coordinator.best(n=len(coordinator.checkpoints())) if b.step in steps]
        if ranked:
            return next(r for r in good if r.step == ranked[0].step)
        log.warning("rollback_to=best: no checkpoint before step %d has the retention metric; using the last good "
                    "one", first_bad)
    return good[-1]


def set_aside(coordinator: CheckpointCoordinator, after_step: int, label: str) -> list[str]:
    """Move every committed checkpoint newer than `after_step` to run_dir/rolled_back/<label>/ (kept for a
    post-mortem, out of reach of resume, best and retention). Returns the new paths."""
    moved = []
    dest = os.path.join(coordinator.run_dir, ROLLED_BACK_DIR, label)
    for ref in coordinator.checkpoints():
        if ref.step <= after_step:
            continue
        os.makedirs(dest, exist_ok=True)
        target = os.path.join(dest, os.path.basename(os.path.normpath(ref.path)))
        try:
            os.replace(ref.path, target)
            moved.append(target)
        except OSError as exc:
            log.warning("could not move %s aside after the rollback (%s); a restart before this run saves that step "
                        "again would resume from it", ref.path, exc)
    return moved


class LastGoodGuard:
    """Pins the newest checkpoint saved before a run of bad observations, so retention keeps it until the
    streak ends or the rollback has happened. Only pins it made itself are ever removed."""

    def __init__(self, coordinator: CheckpointCoordinator, rank: int):
        self.coordinator, self.rank = coordinator, rank
        self.pinned: list[str] = []

    def update(self, suspicion_start: int | None) -> None:
        if self.rank != 0:
            return
        if suspicion_start is None:
            self.release()
            return
        good = good_candidates(self.coordinator.checkpoints(), suspicion_start)
        if not good:
            return
        keep = good[-1].path
        try:
            if keep not in self.pinned and pin_checkpoint(self.coordinator.storage, keep):
                self.pinned.append(keep)
                log.info("pinned %s (the last checkpoint before bad observations began at step %d)", keep,
                         suspicion_start)
        except Exception as exc:  # the save goes on; only the protection is missing
            log.warning("could not pin %s: %s", keep, exc)
        self._unpin([p for p in self.pinned if p != keep])

    def release(self) -> None:
        if self.rank == 0:
            self._unpin(list(self.pinned))

    def _unpin(self, paths: list[str]) -> None:
        for path in paths:
            self.pinned.remove(path)
            try:
                unpin_checkpoint(self.coordinator.storage, path)
            except Exception as exc:  # moved aside or deleted meanwhile
                log.debug("could not unpin %s: %s", path, exc)
