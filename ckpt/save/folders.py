"""Rank 0's work on the run dir around a save: ready the checkpoint's folder, remove unfinished saves, commit
and apply retention, or discard a failed save's folder. Every rank's own work (snapshot, plan, write) lives in
ckpt/save/saving.py; the coordinator runs these inside its phases, so a failure here is every rank's error.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable

from ..errors import CheckpointError
from ..format.layout import CheckpointRef, is_committed, list_partials, parse_step, removal_name
from ..format.manifest import Manifest
from ..io.storage import Storage
from ..retention.catalog import delete_checkpoint, retain
from ..retention.rules import RetentionPolicy
from ..retention.timeline import set_aside_newer, went_back_label
from .saving import commit

log = logging.getLogger("ckpt")

# Called by rank 0 after each commit with the run dir and the new checkpoint; retention plugs in here.
AfterCommit = Callable[[str, CheckpointRef, Manifest], None]


def ready_folder(storage: Storage, run_dir: str, final: str, partial: str, *, overwrite: bool,
                 went_back: int | None, owns_run_dir: bool) -> None:
    """Before a save writes: set aside the abandoned timeline after a load of an older step, refuse (or, in
    place on object storage, delete) an existing checkpoint of the step, remove unfinished saves when this job
    owns the run dir, and create the save's folder."""
    if went_back is not None:  # newer checkpoints are another timeline's: moved out of this one's way
        set_aside_newer(storage, run_dir, went_back, went_back_label(went_back, parse_step(os.path.basename(final)) or 0))
    committed = storage.exists(final) if storage.renames else is_committed(storage, final)
    if committed and not overwrite:
        raise CheckpointError(f"{final} already exists; pass overwrite=True to replace it, or save another step",
                              path=final)
    if committed and not storage.renames:  # written in place: the old copy goes first
        delete_checkpoint(storage, final)
    # Unfinished saves are stale only when this job owns the run dir; forced, they may be another job's.
    for stale in list_partials(storage, run_dir) if owns_run_dir else []:
        remove_stale(storage, run_dir, stale)
    storage.makedirs(partial)


def remove_stale(storage: Storage, run_dir: str, stale: str) -> None:
    """Move an unfinished save aside, then remove it: if a forced job commits it meanwhile, one of the two
    renames fails cleanly, and the committed checkpoint is never emptied from under its name. (Object
    storage has no rename, and no forced second job: the lock owner removes it in place.)"""
    if not storage.renames:
        log.info("removing unfinished save %s", stale)
        storage.remove_tree(stale)
        return
    doomed = os.path.join(run_dir, removal_name(os.path.basename(stale), secrets.token_hex(4)))
    try:
        storage.rename(stale, doomed)
    except FileNotFoundError:
        return  # committed or removed by someone else since it was listed
    log.info("removing unfinished save %s", stale)
    storage.remove_tree(doomed)


def commit_and_retain(storage: Storage, run_dir: str, partial: str, final: str, manifest: Manifest, *,
                      overwrite: bool, after_commit: AfterCommit | None, retention: RetentionPolicy | None,
                      resumed_from: str | None) -> dict | None:
    """Commit the save, call the after-commit hook, apply retention; rank 0's retention outcome (plain data),
    or None without a policy or when retention failed (the save stays committed either way)."""
    commit(storage, partial, final, manifest, overwrite)
    if after_commit is not None:
        try:  # the checkpoint is committed; a failing hook must not make the save look failed
            after_commit(run_dir, CheckpointRef(manifest.step, final), manifest)
        except Exception as exc:
            log.warning("after_commit hook failed for %s: %s: %s", final, type(exc).__name__, exc)
    if retention is None:
        return None
    protected = {final: "just saved", **({resumed_from: "resumed from"} if resumed_from else {})}
    try:  # the save is committed: a retention failure must not make it look failed
        return retain(storage, run_dir, retention, protected).to_plain()
    except Exception as exc:
        log.warning("retention after saving %s failed, nothing more was deleted: %s: %s", final,
                    type(exc).__name__, exc)
        return None


def discard(storage: Storage, partial: str) -> None:
    """Remove a failed save's folder (the next save does, if this fails)."""
    try:
        if not storage.renames and is_committed(storage, partial):
            return  # written in place and committed before a later step failed: it stays
        storage.remove_tree(partial)
    except OSError as exc:
        log.warning("could not remove %s after a failed save: %s", partial, exc)


__all__ = ["AfterCommit", "commit_and_retain", "discard", "ready_folder", "remove_stale"]
