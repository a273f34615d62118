"""Where a rollback goes, and keeping that checkpoint safe from retention meanwhile. The checkpoints of the
abandoned stretch are set aside by the coordinator's rule (`CheckpointCoordinator.abandon_newer`). File
operations here run on rank 0 only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ckpt import CheckpointCoordinator, CheckpointRef, pin_checkpoint, unpin_checkpoint

from .policy import RecoveryPolicy

log = logging.getLogger("trainers")


def good_candidates(refs: Sequence[CheckpointRef], checked: int) -> list[CheckpointRef]:
    """Committed checkpoints a good observation vouches for: saved at or before step `checked` (see
    DivergenceDetector.checked_through; a checkpoint inside the first bad log window was never checked)."""
    return [r for r in refs if r.step <= checked]


def choose_target(coordinator: CheckpointCoordinator, policy: RecoveryPolicy, checked: int, trigger_step: int,
                  again: int | None = None) -> tuple[CheckpointRef | None, int | None]:
    """(the checkpoint a rollback loads per `policy.rollback_to`, or None; the step passed over, or None).

    `again`: the step the previous rollback went to. When it is still the newest good checkpoint, the run went
    bad again before saving anything newer: rolling back there once more would most likely fail the same way
    (the checkpoint itself may hold the trouble), so only older checkpoints are candidates.
    """
    good = good_candidates(coordinator.checkpoints(), checked)
    passed_over = None
    if good and again is not None and good[-1].step == again:
        passed_over, good = again, good[:-1]
    if not good:
        return None, passed_over
    back = policy.steps_back
    if back is not None:
        earlier = [r for r in good if r.step <= trigger_step - back]
        return (earlier[-1] if earlier else None), passed_over
    if policy.rollback_to == "best":
        steps = {r.step for r in good}
        ranked = [b for b in coordinator.best(n=len(coordinator.checkpoints())) if b.step in steps]
        if ranked:
            return next(r for r in good if r.step == ranked[0].step), passed_over
        log.warning("rollback_to=best: no checkpoint up to step %d has the retention metric; using the last good "
                    "one", checked)
    return good[-1], passed_over


class LastGoodGuard:
    """Pins the newest checkpoint saved before a run of bad observations, so retention keeps it until the
    streak ends or the rollback has happened. Only pins it made itself are ever removed."""

    def __init__(self, coordinator: CheckpointCoordinator, rank: int):
        self.coordinator, self.rank = coordinator, rank
        self.pinned: list[str] = []

    def update(self, checked: int | None) -> None:
        """`checked`: while a bad run is in progress, the newest step a good observation vouches for (None:
        nothing is suspect)."""
        if self.rank != 0:
            return
        if checked is None:
            self.release()
            return
        good = good_candidates(self.coordinator.checkpoints(), checked)
        if not good:
            return
        keep = good[-1].path
        try:
            if keep not in self.pinned and pin_checkpoint(self.coordinator.storage, keep):
                self.pinned.append(keep)
                log.info("pinned %s (the newest checkpoint a good observation vouches for, up to step %d)", keep,
                         checked)
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
