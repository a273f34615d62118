"""Names on disk, and finding checkpoints in a run directory."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import CheckpointNotFoundError
from ..io.storage import Storage, is_url

MANIFEST_NAME = "checkpoint_manifest.json"
CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
# An overwrite moves the committed copy here until the new one is renamed into place.
REPLACED_SUFFIX = ".replaced" + PARTIAL_SUFFIX
PIN_NAME = "PINNED"  # a file inside a checkpoint that protects it from every retention rule
# Checkpoints of an abandoned timeline (newer than the step a job went back to): run_dir/abandoned/<label>/<name>.
# Never loaded as latest, never ranked; retention removes them unless pinned (see ckpt/retention/timeline.py).
ABANDONED_DIR = "abandoned"
LOCK_NAME = ".ckpt.lock"  # in the run dir: held by the coordinator that owns the run (see ckpt/io/lock.py)
STEP_DIGITS = 8
# At least STEP_DIGITS digits: `checkpoint-5` is not ours, so no two folders claim the same step.
_COMMITTED_RE = re.compile(r"^checkpoint-(\d{8,})$")
_PARTIAL_RE = re.compile(r"^checkpoint-(\d+)(\.[A-Za-z0-9_-]+)?\.partial$")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:0{STEP_DIGITS}d}"


def partial_name(step: int, tag: str | None = None) -> str:
    """The folder a save writes into. `tag` keeps apart the saves of coordinators that share a run dir."""
    return checkpoint_name(step) + (f".{tag}" if tag else "") + PARTIAL_SUFFIX


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint's folder name, or None for any other name."""
    match = _COMMITTED_RE.match(name)
    return int(match.group(1)) if match else None


def is_partial_name(name: str) -> bool:
    return bool(_PARTIAL_RE.match(name))


def removal_name(partial: str, token: str) -> str:
    """A fresh unfinished-save name for `partial` (a partial folder's name), to move it to before removing it.

    Moving first means a concurrent commit of that folder either wins (and is not touched) or fails cleanly,
    rather than having its files removed from under the committed name.
    """
    match = _PARTIAL_RE.match(partial)
    step = match.group(1) if match else "0"
    return f"{CHECKPOINT_PREFIX}{step}.removing-{token}{PARTIAL_SUFFIX}"


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A committed checkpoint: its step and folder."""

    step: int
    path: str


def list_checkpoints(storage: Storage, run_dir: str) -> list[CheckpointRef]:
    """Committed checkpoints in `run_dir` (folder named by step, holding a manifest), oldest first."""
    refs = []
    for name in storage.list_dir(run_dir):
        step = parse_step(name)
        path = os.path.join(run_dir, name)
        if step is not None and storage.is_dir(path) and storage.exists(os.path.join(path, MANIFEST_NAME)):
            refs.append(CheckpointRef(step, path))
    return sorted(refs)


def list_abandoned(storage: Storage, run_dir: str) -> list[CheckpointRef]:
    """Committed checkpoints set aside as an abandoned timeline (run_dir/abandoned/<label>/), oldest first."""
    root = os.path.join(run_dir, ABANDONED_DIR)
    if not storage.is_dir(root):
        return []
    refs = []
    for label in storage.list_dir(root):
        if storage.is_dir(os.path.join(root, label)):
            refs += list_checkpoints(storage, os.path.join(root, label))
    return sorted(refs)


def list_partials(storage: Storage, run_dir: str) -> list[str]:
    """Unfinished saves in `run_dir`. On a store without rename a save writes under its final name, so a
    step-named folder without a manifest is one too."""
    names = storage.list_dir(run_dir)
    out = [os.path.join(run_dir, n) for n in names if is_partial_name(n)]
    if not storage.renames:
        out += [os.path.join(run_dir, n) for n in names
                if parse_step(n) is not None and not storage.exists(os.path.join(run_dir, n, MANIFEST_NAME))]
    return out


def save_dir(storage: Storage, run_dir: str, step: int, tag: str | None) -> str:
    """Where a save of `step` writes its files: `<name>.partial/`, renamed into place at commit; or, on a store
    without rename, the checkpoint's own folder (committed when its manifest is created there)."""
    name = partial_name(step, tag) if storage.renames else checkpoint_name(step)
    return os.path.join(run_dir, name)


def is_committed(storage: Storage, path: str) -> bool:
    """Whether the checkpoint folder `path` is committed (holds its manifest)."""
    return storage.exists(os.path.join(path, MANIFEST_NAME))


def resolve_checkpoint(storage: Storage, run_dir: str, checkpoint: str | int | os.PathLike) -> CheckpointRef:
    """Turn "latest", a step (an int, or a digit string naming no existing path), or a path into a committed
    checkpoint."""
    if checkpoint == "latest":
        refs = list_checkpoints(storage, run_dir)
        if not refs:
            raise CheckpointNotFoundError(f"no committed checkpoint in {run_dir} (folders named "
                                          f"{CHECKPOINT_PREFIX}<step> holding {MANIFEST_NAME})", path=run_dir)
        return refs[-1]
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
        path = os.path.join(run_dir, checkpoint_name(checkpoint))
        if not storage.exists(os.path.join(path, MANIFEST_NAME)):
            steps = [r.step for r in list_checkpoints(storage, run_dir)]
            raise CheckpointNotFoundError(f"no committed checkpoint for step {checkpoint} in {run_dir}; "
                                          f"committed steps: {steps}", path=path)
        return CheckpointRef(checkpoint, path)
    path = os.fspath(checkpoint)
    if isinstance(checkpoint, str) and checkpoint.isdigit() and not storage.exists(path) and not storage.exists(
            os.path.join(run_dir, path)):
        return resolve_checkpoint(storage, run_dir, int(checkpoint))  # "40" from a command line is step 40
    if not os.path.isabs(path) and not is_url(path) and (is_url(run_dir) or not storage.exists(path)):
        path = os.path.join(run_dir, path)
    if os.path.basename(os.path.normpath(path)) == MANIFEST_NAME and storage.exists(path):
        raise CheckpointNotFoundError(f"{path} is a checkpoint's manifest file; pass the checkpoint's folder, "
                                      f"{os.path.dirname(os.path.normpath(path))}", path=path)
    if not storage.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist (checkpoints are given as \"latest\", a step, or the "
                                      f"path of a {CHECKPOINT_PREFIX}<step> folder)", path=path)
    if not storage.exists(os.path.join(path, MANIFEST_NAME)):
        what = "an unfinished save" if path.rstrip("/").endswith(PARTIAL_SUFFIX) else "not a committed checkpoint"
        raise CheckpointNotFoundError(f"{path} is {what}: it holds no {MANIFEST_NAME}", path=path)
    step = parse_step(os.path.basename(os.path.normpath(path)))
    return CheckpointRef(step if step is not None else -1, path)
