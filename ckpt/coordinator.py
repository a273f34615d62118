"""CheckpointCoordinator: the public entry point. It orchestrates; the work lives in the modules it calls.

A save runs in phases, each ending in an exchange of outcomes between all ranks:
  prepare  snapshot and digest every component; rank 0 readies `<name>.partial/`
  (plan)   every rank computes the same plan from the gathered declarations
  (check)  replicas are compared at each component's validation level
  write    each rank writes and fsyncs its files
  commit   rank 0 writes the manifest, renames the folder into place, applies retention
A load resolves the checkpoint on rank 0, reads everything into staging on every rank (ckpt/load/read_phase.py),
and only then applies it, so a failure anywhere leaves every rank's live state untouched.
Rank 0 holds the run dir's lock (ckpt/io/lock.py) from construction to `close()`, so a second job on the same
run dir is refused instead of racing this one; a read-only coordinator takes no lock and never writes.
On object storage (`s3://bucket/prefix`, ckpt/io/s3.py) there is no rename: a save writes under the checkpoint's
own name and commits by creating its manifest, create-only; the lock is an object with a lease.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from .comm import Communicator, Kept
from .component import SharingPattern, StateComponent
from .errors import CheckpointError
from .format.layout import (
    CheckpointRef,
    checkpoint_name,
    is_committed,
    list_checkpoints,
    list_partials,
    parse_step,
    removal_name,
    save_dir,
)
from .format.manifest import Manifest, plain_metrics
from .io.lock import take_run_dir
from .io.staging import StagingPool
from .io.storage import Storage, is_url, norm_path, storage_for
from .io.threads import gc_paused
from .load.agreement import decide_apply
from .load.applying import apply_staged
from .load.candidates import read_first_good, resolve_candidates
from .load.read_phase import ReadOptions, check_unique
from .load.result import LoadResult, check_fallback, check_missing_ok
from .patterns.placements import placement_for
from .retention.catalog import RetentionOutcome, delete_checkpoint, hold, retain, scan, summary_text
from .retention.catalog import best as best_checkpoints
from .retention.rules import BestCheckpoint, RetentionPolicy
from .retention.timeline import set_aside_newer, went_back_label
from .save.agreement import PlanCache, agree_plan
from .save.background import BackgroundSave, SaveHandle
from .save.planning import ComponentDecl
from .save.saving import (
    PreparedComponent,
    Snapshot,
    build_manifest,
    commit,
    declare,
    restore_replaced,
    snapshot,
    write_files,
)
from .save.validation import check_replicas
from .topology import RankTopology, discover

log = logging.getLogger("ckpt")

# Called by rank 0 after each commit with the run dir and the new checkpoint; retention plugs in here.
AfterCommit = Callable[[str, CheckpointRef, Manifest], None]


class CheckpointCoordinator:
    """Saves and loads a job's state components in `run_dir`. Construct it on every rank (collective).

    Args:
        run_dir: folder holding this run's checkpoints (shared by all ranks), or `s3://bucket/prefix` on object
            storage (the `ckpt[s3]` extra; endpoint and credentials from the standard AWS settings).
        process_groups: name -> ProcessGroup (or a list of member ranks) for PER_GROUP components;
            each rank passes the group it belongs to.
        timeout: how long any rank waits for the others at one step of a save or load.
        storage: where bytes go; by default the local filesystem, or S3Storage for an s3:// run_dir.
        verify_on_load: check every file's digest while reading it.
        local_world_size: ranks per node; defaults to torchrun's LOCAL_WORLD_SIZE.
        after_commit: called on rank 0 after each commit.
        retention: which checkpoints to keep; rank 0 deletes the rest after each commit. None keeps all.
        async_save: the default of `save(async_save=...)`.
        io_threads: files each rank writes or reads at once.
        force: start even when another process's coordinator holds the run dir's lock (a second job on the
            same run dir). Each commit stays atomic, but the jobs' retention may delete each other's
            checkpoints and neither cleans up the other's unfinished saves. Leave False unless you are sure.
        read_only: only load and query (an evaluation job reading a live run): take no lock, create nothing,
            and refuse `save()`, so unfinished saves and retention are left to the job that owns the run dir.

    Use it as a context manager, or call `close()`, to release the lock before the process ends.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        process_groups: Mapping[str, Any] | None = None,
        *,
        timeout: timedelta | float = timedelta(minutes=30),
        storage: Storage | None = None,
        verify_on_load: bool = True,
        local_world_size: int | None = None,
        after_commit: AfterCommit | None = None,
        retention: RetentionPolicy | None = None,
        async_save: bool = False,
        io_threads: int = 4,
        force: bool = False,
        read_only: bool = False,
    ):
        self.run_dir = norm_path(run_dir) if is_url(os.fspath(run_dir)) else os.fspath(run_dir)
        self.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        if self.timeout.total_seconds() <= 0:
            raise ValueError(f"CheckpointCoordinator: timeout={timeout!r} must be positive")
        self.storage: Storage = storage_for(self.run_dir, storage)
        self.verify_on_load = verify_on_load
        self.after_commit = after_commit
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise TypeError(f"CheckpointCoordinator: retention={retention!r} must be a ckpt.RetentionPolicy or None")
        self.retention = retention
        self.resumed_from: str | None = None  # the last checkpoint loaded; retention never deletes it
        # The step of the last checkpoint of this run loaded, until the next save: that save sets aside every newer
        # checkpoint as an abandoned timeline (ckpt/retention/timeline.py).
        self._went_back_to: int | None = None
        self.last_retention: RetentionOutcome | None = None  # rank 0's outcome of the last save, on every rank
        self.async_save = async_save
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1:
            raise ValueError(f"CheckpointCoordinator: io_threads={io_threads!r} must be an int >= 1")
        self.io_threads = io_threads
        for name, flag in (("force", force), ("read_only", read_only)):
            if not isinstance(flag, bool):
                raise TypeError(f"CheckpointCoordinator: {name}={flag!r} must be a bool")
        self.read_only = read_only
        self._staging = StagingPool()
        self._pending: BackgroundSave | None = None
        self._plan = PlanCache()  # the last save's plan, reused while no rank's declarations change
        self._closed = False
        self.comm = Communicator(self.timeout)
        self.topology: RankTopology = discover(self.comm, process_groups, local_world_size)
        self.rank = self.comm.rank
        if not read_only:
            self.storage.makedirs(self.run_dir)
        # Rank 0 locks the run dir (and keeps the lock); every rank learns the tag of its unfinished-save folders
        # (None: locked).
        locks = self.rank == 0 and not read_only
        got = self.comm.broadcast_phase("lock", lambda: self._take_run_dir(force) if locks else None,
                                        what="coordinator start-up")
        self._tag: str | None = got.common
        self._release = weakref.finalize(self, got.local.release) if got.local is not None else None

    def _take_run_dir(self, force: bool) -> Kept:
        """Rank 0: lock the run dir and, first to own it in this process (another coordinator here may be
        mid-overwrite), put back a checkpoint an overwrite left aside when it died; on object storage, remove
        what saves that died before their manifest left. Sends the tag, keeps the lock."""
        tag, lock = take_run_dir(self.storage, self.run_dir, force)
        if lock is not None and lock.first:
            if not self.storage.renames:
                for stale in list_partials(self.storage, self.run_dir):
                    self._remove_stale(stale)
                return Kept(tag, lock)
            for path in restore_replaced(self.storage, self.run_dir):
                log.warning("restored %s: an overwrite of it was interrupted before the new copy was in place", path)
        return Kept(tag, lock)

    @property
    def usable(self) -> bool:
        """False once an exchange between ranks failed (a timeout, a lost rank): this coordinator refuses every
        further save and load, and the job must restart or build a new coordinator on every rank."""
        return not self.comm.broken and not self._closed

    def close(self) -> None:
        """Wait for a save in flight (collective), then release the run dir's lock. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._release is not None:
                self._release()
            self.comm.close()

    def __enter__(self) -> CheckpointCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CheckpointError(f"{what}: this CheckpointCoordinator for {self.run_dir} was closed; build a new one")

    # ---- queries -------------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointRef]:
        """Committed checkpoints in the run dir, oldest first."""
        return list_checkpoints(self.storage, self.run_dir)

    def path_for(self, step: int) -> str:
        """The folder checkpoint `step` of this run is committed as (it may not exist yet, or ever)."""
        return os.path.join(self.run_dir, checkpoint_name(step))

    def latest(self) -> CheckpointRef | None:
        refs = self.checkpoints()
        return refs[-1] if refs else None

    def best(self, n: int | None = None) -> list[BestCheckpoint]:
        """The best `n` (default: the policy's preserve_n_best) committed checkpoints by the retention
        metric, best first, read from the manifests on disk. Not collective; every rank sees the same."""
        if self.retention is None:
            raise ValueError("best(): this coordinator has no retention policy; pass "
                             "CheckpointCoordinator(..., retention=RetentionPolicy(best_model_metric=...))")
        return best_checkpoints(self.storage, self.run_dir, self.retention, n)

    def summary(self) -> str:
        """End-of-training text: the best checkpoints with their metric, the latest, and what is kept."""
        infos = scan(self.storage, self.run_dir)
        policy = self.retention or RetentionPolicy()
        protected = {self.resumed_from: "resumed from"} if self.resumed_from else {}
        return summary_text(self.run_dir, self.retention, policy.decide(infos, protected), infos)

    # ---- save ----------------------------------------------------------------------------------

    def save(self, step: int, components: Sequence[StateComponent], metrics: Mapping[str, Any] | None = None,
             *, overwrite: bool = False, async_save: bool | None = None) -> str | SaveHandle:
        """Save every component as checkpoint `step` and return its path. Collective: call on every rank.

        With `async_save` (default: the coordinator's), the state is copied into reusable CPU buffers and the
        call returns a `SaveHandle` (`done()`, `wait()`, `exception()`, and `path` once committed); writing,
        replication checks, commit and retention run on a background thread. A background failure is raised
        on every rank at the next `save()`, `wait()` or `close()` (unless the handle's `wait()` raised it).
        The first save after a load of step S sets aside every committed checkpoint newer than S as an
        abandoned timeline (docs/retention.md), so saving after going back never collides with them.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"save(step={step!r}): step must be a non-negative int")
        self._check_open("save()")
        if self.read_only:
            raise CheckpointError(
                f"save(step={step}): this CheckpointCoordinator of {self.run_dir} is read-only (read_only=True): "
                "it holds no lock there, so it must not write. Save from the job that owns the run dir, or build "
                "the coordinator without read_only=True", path=self.run_dir)
        run_async = self.async_save if async_save is None else async_save
        self.wait()  # at most one save in flight; a background failure is raised here, on every rank
        snapshots: dict[str, Snapshot] = {}
        error: Exception | None = None
        try:  # a failure here is raised inside the first phase, so every rank raises it together
            plain = plain_metrics(metrics)
            check_unique([c.key for c in components])
            self._staging.begin()
            with gc_paused():
                for c in components:
                    snapshots[c.key] = snapshot(c, self._staging, host_too=run_async,
                                                alone=self.comm.world_size == 1)
            self._staging.end()
        except Exception as exc:
            error, plain = exc, {}
        went_back, self._went_back_to = self._went_back_to, None
        job = functools.partial(self._write_checkpoint, step, snapshots, error, plain, overwrite, went_back)
        if run_async:
            # No collector pause on the background thread: it is process-wide, and would hold on the
            # training thread for as long as the write takes.
            self._pending = BackgroundSave(job, name=f"ckpt-save-{step}", step=step)
            return SaveHandle(self._pending)
        with gc_paused():
            return job()

    def wait(self) -> str | None:
        """Wait for the save in flight, if any; return its path or raise its error (on every rank, once)."""
        pending, self._pending = self._pending, None
        return pending.wait() if pending is not None else None

    def abandon_newer(self, step: int, label: str | None = None, *, before_step: int | None = None) -> list[str]:
        """Set aside every committed checkpoint newer than `step` (and older than `before_step`) as an abandoned
        timeline under run_dir/abandoned/<label>/; returns their new paths on every rank. Collective. A save
        after a load does this by itself; trainers call it at a rollback, so a restart never resumes from them."""
        self._check_open("abandon_newer()")
        self.wait()
        name = label or went_back_label(step, step)
        moved = self.comm.run_phase(
            "abandon", lambda: set_aside_newer(self.storage, self.run_dir, step, name, before_step)
            if self.rank == 0 else None, what=f"setting aside the checkpoints after step {step}")[0]
        if before_step is None:
            self._went_back_to = None
        return list(moved)

    def _write_checkpoint(self, step: int, snapshots: Mapping[str, Snapshot], error: Exception | None,
                          metrics: Mapping[str, Any], overwrite: bool, went_back: int | None) -> str:
        final = os.path.join(self.run_dir, checkpoint_name(step))
        partial = save_dir(self.storage, self.run_dir, step, self._tag)
        what = f"save of step {step}"
        started = time.perf_counter()
        try:
            # Rank 0 plans (or reuses its last plan) and checks the replica digests; each rank learns its files.
            verdict, self._plan, prepared = agree_plan(
                self.comm, lambda: self._declare(snapshots, error, final, partial, overwrite, went_back),
                self._plan, self.topology, what)
            check_replicas(self.comm, verdict.checks, {k: p.table for k, p in prepared.items()},
                           {k: p.replicated or p.flat for k, p in prepared.items()})
            records = self.comm.gather_phase(
                "write", lambda: write_files(self.storage, partial, self._plan.mine, prepared, self.rank,
                                            self.io_threads, on_file=lambda rel: self.comm.note(f"writing {rel}")),
                what=what).kept  # every rank's file records, on rank 0
            manifest = None
            if self.rank == 0:
                manifest = build_manifest(step, self._plan.plans, records, self.topology.describe(), metrics)
            outcome = self.comm.broadcast_phase("commit", lambda: self._commit(partial, final, manifest, overwrite),
                                                what=what).common
            self.last_retention = None if outcome is None else RetentionOutcome.from_plain(outcome)
        except BaseException:
            if self.rank == 0:
                self._discard(partial)
            raise
        if manifest is not None:
            total = sum(f.nbytes for c in manifest.components.values() for f in c.files)
            log.info("saved %s: %d components, %.1f MB in %.2fs", final, len(manifest.components), total / 1e6,
                     time.perf_counter() - started)
        return final

    def _declare(self, snapshots: Mapping[str, Snapshot], error: Exception | None, final: str, partial: str,
                 overwrite: bool, went_back: int | None) -> tuple[list[ComponentDecl], dict[str, PreparedComponent]]:
        """The prepare phase's local part: rank 0 readies the folder; every rank declares each component (its
        patterns, sizes and replica digests) and keeps what it prepared for writing."""
        self._staging.settle()  # device tensors' copies to the host have landed
        if error is not None:
            raise error
        if self.rank == 0:
            if went_back is not None:  # newer checkpoints are another timeline's: moved out of this one's way
                set_aside_newer(self.storage, self.run_dir, went_back,
                                went_back_label(went_back, parse_step(os.path.basename(final)) or 0))
            committed = self.storage.exists(final) if self.storage.renames else is_committed(self.storage, final)
            if committed and not overwrite:
                raise CheckpointError(f"{final} already exists; pass overwrite=True to replace it, or save "
                                      "another step", path=final)
            if committed and not self.storage.renames:  # written in place: the old copy goes first
                delete_checkpoint(self.storage, final)
            # Unfinished saves are stale only when this job owns the run dir; forced, they may be another job's.
            for stale in list_partials(self.storage, self.run_dir) if self._tag is None else []:
                self._remove_stale(stale)
            self.storage.makedirs(partial)
        prepared = {key: declare(snap, self._plans_split(snap.component, snap.pattern), self.io_threads)
                     for key, snap in snapshots.items()}
        return [p.decl for p in prepared.values()], prepared

    def _remove_stale(self, stale: str) -> None:
        """Move an unfinished save aside, then remove it: if a forced job commits it meanwhile, one of the two
        renames fails cleanly, and the committed checkpoint is never emptied from under its name. (Object
        storage has no rename, and no forced second job: the lock owner removes it in place.)"""
        if not self.storage.renames:
            log.info("removing unfinished save %s", stale)
            self.storage.remove_tree(stale)
            return
        doomed = os.path.join(self.run_dir, removal_name(os.path.basename(stale), secrets.token_hex(4)))
        try:
            self.storage.rename(stale, doomed)
        except FileNotFoundError:
            return  # committed or removed by someone else since it was listed
        log.info("removing unfinished save %s", stale)
        self.storage.remove_tree(doomed)

    def _plans_split(self, c: StateComponent, pattern: SharingPattern) -> bool:
        """Whether this rank is the lowest of the component's replica set (whose tensor list plans the split)."""
        return placement_for(pattern).plans_split(self.topology, c.process_group_name)

    def _commit(self, partial: str, final: str, manifest: Manifest, overwrite: bool) -> dict | None:
        commit(self.storage, partial, final, manifest, overwrite)
        if self.after_commit is not None:
            try:  # the checkpoint is committed; a failing hook must not make the save look failed
                self.after_commit(self.run_dir, CheckpointRef(manifest.step, final), manifest)
            except Exception as exc:
                log.warning("after_commit hook failed for %s: %s: %s", final, type(exc).__name__, exc)
        if self.retention is None:
            return None
        protected = {final: "just saved", **({self.resumed_from: "resumed from"} if self.resumed_from else {})}
        try:  # the save is committed: a retention failure must not make it look failed
            return retain(self.storage, self.run_dir, self.retention, protected).to_plain()
        except Exception as exc:
            log.warning("retention after saving %s failed, nothing more was deleted: %s: %s", final,
                        type(exc).__name__, exc)
            return None

    def _discard(self, partial: str) -> None:
        try:
            if not self.storage.renames and is_committed(self.storage, partial):
                return  # written in place and committed before a later step failed: it stays
            self.storage.remove_tree(partial)
        except OSError as exc:  # the next save removes it
            log.warning("could not remove %s after a failed save: %s", partial, exc)

    # ---- load ----------------------------------------------------------------------------------

    @gc_paused()
    def load(self, components: Sequence[StateComponent], checkpoint: str | int | os.PathLike = "latest",
             *, strict: bool = True, in_place: bool = False, reshard: bool = False,
             fallback: bool = False, missing_ok: bool = False) -> LoadResult:
        """Load `components` from a checkpoint ("latest", a step as an int or a digit string, or a path).
        Collective: call on every rank.

        Exactly the components passed are loaded; others in the checkpoint are listed in `not_requested`. Before
        anything is read, every requested component is checked against the manifest and the live objects (keys,
        shapes and dtypes of modules, dicts and tensors; optimizers against their parameters; layouts of state
        saved per rank, group or node): any mismatch on any rank refuses the load with one error listing them
        all, on every rank. `strict=True` means every requested component exists and matches; `strict=False`
        accepts missing components and missing or unexpected tensor keys (listed in `missing_keys` and
        `unexpected_keys`). Everything is read and checked before any component's `load_state_dict` is called,
        so a failed load changes nothing. `missing_ok=True` (with checkpoint="latest"): a run dir without a
        committed checkpoint gives a result with `found == False` instead of an error.
        `in_place=True` is the fast path: tensors are read straight into the components'
        existing CPU tensors of the same name, dtype and shape (no new memory, no copy); if it fails (damaged
        bytes, or a storage error), the error names the components whose live tensors may already hold bytes
        from the checkpoint.
        A save still in flight is waited for first. With `strict=False`, an optional component (required=False)
        whose files fail their checks is skipped on every rank (listed in `damaged`) instead of failing the load.
        If a component's `load_state_dict()` raises, PartialLoadError says which components each rank applied.
        `reshard=True` loads PER_RANK, PER_GROUP and PER_NODE components saved under another layout (world size,
        groups, nodes) by merging every saved copy (ckpt/load/reshard.py); components this rank has its own copy of
        load as usual. Without it, such components are refused with an error naming both layouts.
        `fallback=True` (with checkpoint="latest", not in place): when the newest committed checkpoint fails
        verification on any rank (a damaged file or manifest), every rank passes it over with a warning naming
        the file and tries the next newest, and so on; `path`, `step` and `fallback_from` say what happened.
        Nothing of a checkpoint that failed is applied.
        """
        self._check_open("load()")
        check_fallback(checkpoint, fallback, in_place)
        check_missing_ok(checkpoint, missing_ok)
        self.wait()
        candidates = self.comm.broadcast_phase(
            "resolve", lambda: resolve_candidates(self.storage, self.run_dir, checkpoint, fallback, missing_ok),
            what="load").common
        if not candidates:
            return LoadResult(path=None, step=-1, loaded=(), skipped=tuple(c.key for c in components), not_requested=())
        opts = ReadOptions(strict, in_place, reshard, self.verify_on_load, self.io_threads)
        first = read_first_good(self.comm, self.storage, self.run_dir, self.topology, candidates, components, opts,
                                fallback)
        staged, step, read, checks = first.staged, first.step, first.read, first.checks
        path, manifest = staged.path, staged.manifest
        # A component damaged on any rank is dropped on every rank, so replicas never end up loaded on some.
        damaged = list(read.damaged)
        for key in damaged:
            staged.state.pop(key, None)
        asked = {c.key for c in components}
        skipped = staged.skipped + [k for k in damaged if k not in staged.skipped and k in asked]
        unused = sorted(set(manifest.components) - set(read.keys))
        with hold(path, "being loaded"):  # files checked in the read phase are read into place here
            self.comm.gather_phase("apply", lambda: apply_staged(components, staged.state, self.rank, strict),
                                   what=f"load of {path}", decide=lambda reports: decide_apply(path, reports))
        self.resumed_from = path
        if _same_dir(os.path.dirname(os.path.normpath(path)), self.run_dir):  # one of this run's own checkpoints
            self._went_back_to = step if step >= 0 else manifest.step
        if self.rank == 0:
            log.info("loaded %s (%d components)", path, len(staged.state))
        return LoadResult(path=path, step=step, loaded=tuple(c.key for c in components if c.key in staged.state),
                          skipped=tuple(skipped), not_requested=tuple(unused), metrics=dict(manifest.metrics),
                          manifest=manifest, damaged=tuple(damaged),
                          resharded=tuple(k for k in staged.resharded if k in staged.state),
                          fallback_from=first.passed_over,
                          missing_keys=checks.missing, unexpected_keys=checks.unexpected)


def _same_dir(a: str, b: str) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))
