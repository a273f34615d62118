"""Which checkpoint a load reads: the one asked for, or with `fallback` the newest that verifies on every rank.

Rank 0 resolves "latest", a step or a path into candidates (newest first with `fallback`); then each candidate
goes through the check phase (keys, shapes and layouts against the manifest, before anything is read) and the
read phase (everything staged and verified) until one passes on every rank. A candidate that fails
verification on any rank is passed over on every rank, with a warning naming the file.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..comm import Communicator
from ..component import StateComponent
from ..format.layout import list_checkpoints, resolve_checkpoint
from ..format.manifest_read import read_manifest
from ..io.storage import Storage
from ..retention.catalog import hold
from ..topology import RankTopology
from .agreement import CheckVerdict, ReadVerdict, decide_check, decide_read
from .checks import precheck
from .read_phase import ReadOptions, Staged, every_checkpoint_failed, fallback_warning, read_or_reject

log = logging.getLogger("ckpt")


def resolve_candidates(storage: Storage, run_dir: str, checkpoint: str | int | os.PathLike, fallback: bool,
                       missing_ok: bool) -> list[list]:
    """Rank 0: [path, step] of the checkpoint to load; with `fallback`, of every committed one, newest first;
    none with `missing_ok` in a run dir without a committed checkpoint."""
    if missing_ok and not list_checkpoints(storage, run_dir):
        return []
    ref = resolve_checkpoint(storage, run_dir, checkpoint)
    if fallback:
        return [[r.path, r.step] for r in reversed(list_checkpoints(storage, run_dir))]
    return [[ref.path, ref.step if ref.step >= 0 else read_manifest(storage, ref.path).step]]


@dataclass(frozen=True)
class FirstGood:
    """The candidate that passed: what this rank staged, its step, both phases' verdicts, and the paths of the
    candidates passed over before it."""

    staged: Staged
    step: int
    read: ReadVerdict
    checks: CheckVerdict
    passed_over: tuple[str, ...]


def read_first_good(comm: Communicator, storage: Storage, run_dir: str, topology: RankTopology,
                    candidates: Sequence[Sequence], components: Sequence[StateComponent], opts: ReadOptions,
                    fallback: bool, latest: bool = False) -> FirstGood:
    """The check and read phases, on each candidate in turn until one verifies on every rank. Collective.
    `latest`: the candidate is the run's newest checkpoint, chosen as "latest" (a refusal says how to pass it)."""
    rejected: list[tuple[str, dict[int, str]]] = []
    for i, (path, step) in enumerate(candidates):
        read = functools.partial(read_or_reject, storage, path, components, topology, opts, fallback)
        check = functools.partial(precheck, storage, path, components, topology, opts, fallback, latest)
        with hold(path, "being loaded"):
            checked = CheckVerdict.from_wire(comm.gather_phase(  # before anything is read
                "check", check, what=f"load of {path}", decide=functools.partial(decide_check, path)).common)
            bad = checked.bad
            if not bad:
                got = comm.gather_phase("read", read, what=f"load of {path}", decide=decide_read)
                verdict = ReadVerdict.from_wire(got.common)
                bad = verdict.bad
        if not bad:
            return FirstGood(got.local, step, verdict, checked, tuple(p for p, _ in rejected))
        rejected.append((path, bad))
        if comm.rank == 0:
            following = candidates[i + 1][0] if i + 1 < len(candidates) else None
            log.warning(fallback_warning(path, bad, following))
    raise every_checkpoint_failed(run_dir, rejected)


__all__ = ["FirstGood", "read_first_good", "resolve_candidates"]
