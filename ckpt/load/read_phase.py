"""The read phase of a load, on one rank: this rank's share of each component is read and checked into
staging; nothing is applied. Also the refusals of copies saved under another layout, the in-place failure
error, and the fallback from a checkpoint that fails verification to the next newest one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..comm import Kept
from ..component import StateComponent
from ..errors import CheckpointError, CorruptCheckpointError, ManifestError
from ..format.manifest import ComponentEntry, Manifest, Topology
from ..format.manifest_read import read_manifest
from ..format.serialization import flatten_state
from ..io.storage import Storage
from ..patterns.base import tensor_layout_for
from ..patterns.placements import placement_for
from ..save.planning import owner_for_load
from ..topology import RankTopology
from .loading import read_component, verify_copy
from .reshard import needs_reshard, read_merged

log = logging.getLogger("ckpt")

# What fails a checkpoint's verification (and so, with fallback=True, moves a load on to an older one):
# bytes that disagree with the manifest, or a manifest that cannot be trusted. Missing components, layout
# refusals and storage errors are not damage of the checkpoint, and fail the load as they would without it.
VERIFICATION_ERRORS = (CorruptCheckpointError, ManifestError)


@dataclass(frozen=True)
class ReadOptions:
    """How a load reads (see `CheckpointCoordinator.load` for each option)."""

    strict: bool
    in_place: bool
    reshard: bool
    verify: bool
    threads: int


@dataclass
class Staged:
    """What one rank read from one checkpoint, before anything is applied."""

    path: str
    manifest: Manifest
    asked: list[str]
    state: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # asked for, absent, and allowed to be
    damaged: list[str] = field(default_factory=list)  # optional, failed their checks (strict=False)
    resharded: list[str] = field(default_factory=list)  # assembled from every saved copy (reshard=True)

    def wire(self) -> dict[str, Any]:
        """What the other ranks learn: the keys asked for and the optional ones found damaged."""
        return {"keys": self.asked, "damaged": self.damaged, "bad": None}


def check_unique(keys: Sequence[str]) -> None:
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise CheckpointError(f"component keys {dupes} are passed more than once; keys must be unique")


def read_or_reject(storage: Storage, path: str, components: Sequence[StateComponent], topo: RankTopology,
                   opts: ReadOptions, fallback: bool) -> Kept:
    """`read_share`, for the read phase's exchange: sends its summary, keeps what it staged. With `fallback`, a
    checkpoint that fails verification is reported (as "bad") instead of raised, so every rank can agree to try
    the next one."""
    try:
        staged = read_share(storage, path, components, topo, opts)
    except VERIFICATION_ERRORS as exc:
        if not fallback:
            raise
        log.warning("rank %d: checkpoint %s failed verification: %s", topo.rank, path, exc)
        return Kept({"keys": [], "damaged": [], "bad": f"{type(exc).__name__}: {exc}"}, None)
    return Kept(staged.wire(), staged)


def read_share(storage: Storage, path: str, components: Sequence[StateComponent], topo: RankTopology,
               opts: ReadOptions) -> Staged:
    """Read this rank's share of `components` from the checkpoint at `path` into staging."""
    manifest = read_manifest(storage, path)
    keys = [c.key for c in components]
    check_unique(keys)
    out = Staged(path, manifest, keys)
    touched: list[str] = []  # components whose live tensors an in-place read has written to
    for c in components:
        entry = manifest.components.get(c.key)
        if entry is None:
            if c.required and opts.strict:
                raise CheckpointError(
                    f"component {c.key!r} is required but {path} does not have it (it has "
                    f"{sorted(manifest.components)}); pass strict=False, or mark it required=False", path=path)
            out.skipped.append(c.key)
            continue
        placement = tensor_layout_for(entry.pattern)
        if placement is not None:  # a pattern with its own placement class reads its share at any layout
            _read_guarded(out, c, topo.rank, opts, lambda c=c, entry=entry, p=placement: p.stage(
                storage, path, c.key, entry, c.stateful, opts.verify, opts.threads))
            continue
        if opts.reshard and needs_reshard(entry, manifest.topology, topo):
            if _read_guarded(out, c, topo.rank, opts, lambda c=c, entry=entry: read_merged(
                    storage, path, c.key, entry, opts.verify, opts.threads)):
                out.resharded.append(c.key)
            continue
        refusal = layout_refusal(c.key, entry, manifest.topology, topo, path)
        if refusal is not None:
            raise refusal
        owner = owner_for_load(entry.pattern, topo, entry.replica_sets, entry.process_group, c.key)
        if not entry.files_for(owner):
            if c.required and opts.strict:
                raise CheckpointError(f"component {c.key!r} in {path} has no copy for this rank (owner {owner})",
                                      path=path)
            out.skipped.append(c.key)
            continue
        if not opts.in_place:
            # Checked now, read into place at apply (VerifiedCopy), where a second read costs nothing extra.
            cheap = getattr(storage, "rereads_are_cheap", False) and hasattr(storage, "identity")
            first = verify_copy if cheap else read_component
            _read_guarded(out, c, topo.rank, opts, lambda c=c, entry=entry, owner=owner, first=first: first(
                storage, path, c.key, entry, owner, opts.verify, threads=opts.threads))
            continue
        touched.append(c.key)
        try:
            into = flatten_state(c.state_dict(), c.key).tensors
            out.state[c.key] = read_component(storage, path, c.key, entry, owner, opts.verify, into, opts.threads)
        except (CheckpointError, OSError) as exc:  # an EIO part way leaves live tensors changed just the same
            raise in_place_failure(exc, touched, path) from exc
    return out


def _read_guarded(out: Staged, c: StateComponent, rank: int, opts: ReadOptions, read: Callable[[], Any]) -> bool:
    """Stage `read()` as `c`'s state; an optional component that fails (strict=False) is listed as damaged
    instead. Returns whether it was staged."""
    try:
        out.state[c.key] = read()
        return True
    except (CheckpointError, OSError) as exc:
        if c.required or opts.strict:
            raise
        log.warning("rank %d: skipping optional component %r of %s (strict=False): %s", rank, c.key, out.path,
                    exc)
        out.damaged.append(c.key)
        return False


def layout_refusal(key: str, entry: ComponentEntry, saved: Topology, topo: RankTopology,
                   path: str) -> CheckpointError | None:
    """The error for a component saved per rank or per node whose saved layout differs from this job's (when
    not resharding): a copy of another rank or node must never be handed to this one. None when it fits.
    (A group's copy is found by its members instead: `owner_for_load`.)"""
    placement = placement_for(entry.pattern)
    if placement.own_copy_fits(saved, entry.replica_sets, topo, entry.process_group):
        return None
    return CheckpointError(f"{placement.layout_issue(key, saved, entry.replica_sets, topo, entry.process_group)}. "
                           f"{placement.layout_advice(key)}", path=path)


def in_place_failure(exc: Exception, touched: Sequence[str], path: str) -> CheckpointError:
    """The error of a failed in-place read: what went wrong, and which components' live tensors may already
    hold bytes from the checkpoint. CorruptCheckpointError for damaged bytes, CheckpointError otherwise."""
    what = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    message = (f"{what}. This was an in-place load: the live tensors of components {list(touched)} may already "
               f"hold bytes from {path}; load another checkpoint before using them")
    if isinstance(exc, CorruptCheckpointError):
        return CorruptCheckpointError(message, path=exc.path, component=exc.component)
    return CheckpointError(message, path=path)


def fallback_warning(path: str, bad: Mapping[int, str], next_path: str | None) -> str:
    """Rank 0's warning when a checkpoint failed verification under fallback=True (naming the bad file)."""
    where = "; ".join(f"rank {r}: {why}" for r, why in sorted(bad.items())[:4])
    then = f"loading the next newest, {next_path}" if next_path else "no older committed checkpoint is left"
    return f"fallback=True: checkpoint {path} failed verification ({where}); {then}"


def every_checkpoint_failed(run_dir: str,
                            rejected: Sequence[tuple[str, Mapping[int, str]]]) -> CorruptCheckpointError:
    """The error when fallback=True found no committed checkpoint that verifies."""
    tried = "; ".join(f"{path}: rank {min(bad)}: {bad[min(bad)]}" for path, bad in rejected[:4])
    return CorruptCheckpointError(
        f"load(fallback=True): all {len(rejected)} committed checkpoints in {run_dir} failed verification "
        f"(newest first: {tried}). Restore one from a copy, or start without a checkpoint", path=run_dir)


__all__ = ["ReadOptions", "Staged", "check_unique", "every_checkpoint_failed", "fallback_warning",
           "in_place_failure", "layout_refusal", "read_or_reject", "read_share"]
