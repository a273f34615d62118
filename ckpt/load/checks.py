"""Checks before anything changes: every requested component against the manifest and the live objects.

Run as its own phase of a load, before any rank reads into (or applies to) live state. Each rank compares the
components it passed with the checkpoint's manifest: that every required component is there (strict), that
components saved per rank, group or node fit this job's layout (or are resharded), and, for the live objects
whose keys are known before loading (modules, dicts, tensors; optimizers by their parameters), the tensor
names, shapes and dtypes of this rank's copy. Every rank's findings are gathered and one error listing them
all (the first few, then a count) is raised on every rank; with strict=False missing and unexpected tensor
keys are reported in the LoadResult instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..component import SharingPattern, StateComponent
from ..errors import CheckpointError, ManifestError
from ..format.manifest import ComponentEntry, Manifest, Topology
from ..format.manifest_read import read_manifest
from ..format.serialization import flatten_state
from ..format.tensor_io import DTYPE_TO_ST
from ..io.storage import Storage
from ..patterns.dtensor import is_dtensor
from ..patterns.placements import placement_for
from ..save.planning import owner_for_load
from ..topology import RankTopology
from .read_phase import VERIFICATION_ERRORS, ReadOptions, check_unique
from .reshard import needs_reshard

SHOWN = 10  # differences spelled out in a refusal; the rest are counted
# Optimizer state tensors that have their parameter's shape (torch.optim's SGD, Adam(W), RMSprop, Adagrad...).
_PARAM_SHAPED = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta",
                           "sum", "ax", "prev", "grad_avg", "mu_product"})
_OPT_STATE = re.compile(r"^state/(\d+)/(.+)$")
TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype name, shape)


@dataclass(frozen=True)
class CheckReport:
    """One rank's findings. `refusals` fail the load; `missing`/`unexpected` are tensor keys per component
    that strict=False lets through; `layout` are components whose saved layout does not fit this job."""

    refusals: tuple[str, ...] = ()
    layout: tuple[tuple[str, str], ...] = ()  # (component, what does not fit)
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unexpected: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_wire(self) -> list:
        return [list(self.refusals), list(self.layout), {k: list(v) for k, v in self.missing.items()},
                {k: list(v) for k, v in self.unexpected.items()}]

    @classmethod
    def from_wire(cls, wire: Sequence) -> CheckReport:
        refusals, layout, missing, unexpected = wire
        return cls(tuple(refusals), tuple((k, t) for k, t in layout), {k: tuple(v) for k, v in missing.items()},
                   {k: tuple(v) for k, v in unexpected.items()})


def check_components(manifest: Manifest, path: str, components: Sequence[StateComponent], topo: RankTopology,
                     strict: bool, reshard: bool) -> CheckReport:
    """This rank's findings for `components` against the checkpoint at `path` (whose manifest is given)."""
    refusals: list[str] = []
    layout: list[tuple[str, str]] = []
    missing: dict[str, tuple[str, ...]] = {}
    unexpected: dict[str, tuple[str, ...]] = {}
    for c in components:
        entry = manifest.components.get(c.key)
        if entry is None:
            if c.required and strict:
                refusals.append(f"component {c.key!r} is required but the checkpoint does not have it")
            continue
        mismatch = pattern_mismatch(c.key, c.resolve_pattern(), entry.pattern)
        if mismatch is not None:
            refusals.append(mismatch)
            continue
        if reshard and needs_reshard(entry, manifest.topology, topo):
            continue  # merged from every saved copy; its load_state_dict takes what it needs
        try:  # a group that is one of the saved groups loads its copy even when the others changed
            owner = owner_for_load(entry.pattern, topo, entry.replica_sets, entry.process_group, c.key)
        except CheckpointError:
            owner, fits = None, False
        else:
            fits = placement_for(entry.pattern).own_copy_fits(manifest.topology, entry.replica_sets, topo,
                                                              entry.process_group)
        if not fits:
            layout.append((c.key, layout_issue(c.key, entry, manifest.topology, topo)))
            continue
        saved = saved_tensors(entry, owner)
        if isinstance(c.stateful, torch.optim.Optimizer):
            refusals += _optimizer_differences(c.key, c.stateful, saved)
            continue
        live = live_tensors(c)
        if live is None:
            continue
        gone, extra, wrong = compare(c.key, saved, live)
        refusals += wrong
        if strict:
            refusals += [f"component {c.key!r}: tensor {n!r} is in the live state but not in the checkpoint"
                         for n in gone]
            refusals += [f"component {c.key!r}: tensor {n!r} is in the checkpoint but not in the live state"
                         for n in extra]
        else:
            if gone:
                missing[c.key] = tuple(gone)
            if extra:
                unexpected[c.key] = tuple(extra)
    return CheckReport(tuple(refusals), tuple(layout), missing, unexpected)


def precheck(storage: Storage, path: str, components: Sequence[StateComponent], topo: RankTopology,
             opts: ReadOptions, fallback: bool, latest: bool = False) -> dict[str, Any]:
    """The check phase on one rank: its report, or (with `fallback`) why the checkpoint failed verification.
    `latest`: `path` was chosen as the run's newest checkpoint, so a refusal says how to pass over it."""
    try:
        manifest = read_manifest(storage, path)
    except VERIFICATION_ERRORS as exc:
        if fallback:
            return {"report": None, "bad": f"{type(exc).__name__}: {exc}"}
        if latest and isinstance(exc, ManifestError):
            raise ManifestError(f"{exc}. It is the newest checkpoint of its run dir, so \"latest\" names it (`ckpt ls` "
                                "marks it DAMAGED); load(..., fallback=True) passes over it to the newest one that "
                                "loads, or load an older step by number", path=exc.path) from None
        raise
    check_unique([c.key for c in components])
    report = check_components(manifest, path, components, topo, opts.strict, opts.reshard)
    return {"report": report.to_wire(), "bad": None}


def saved_tensors(entry: ComponentEntry, owner: int | None) -> dict[str, TensorSpec]:
    """The tensors of the copy `owner` as the manifest records them (a tensor stored in pieces at full shape)."""
    if entry.tensors is not None:  # SHARDED: every tensor at its full shape, whatever the pieces
        return {n: (t.dtype, tuple(t.shape)) for n, t in entry.tensors.items()}
    out: dict[str, TensorSpec] = {}
    for f in entry.files_for(owner):
        for t in f.tensors:
            out[t.name] = (t.dtype, tuple(t.chunk.shape) if t.chunk is not None else tuple(t.shape))
    return out


def live_tensors(c: StateComponent) -> dict[str, TensorSpec] | None:
    """The live tensors of a module, dict or tensor component by their names on disk; None for other objects,
    whose keys are only known once they load (their own `load_state_dict()` checks them)."""
    if not isinstance(c.stateful, torch.nn.Module | Mapping | torch.Tensor):
        return None
    tensors = flatten_state(c.state_dict(), c.key).tensors
    return {n: (DTYPE_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape)) for n, t in tensors.items()
            if type(t) in (torch.Tensor, torch.nn.Parameter) or is_dtensor(t)}  # a DTensor at its full shape


def compare(key: str, saved: Mapping[str, TensorSpec], live: Mapping[str, TensorSpec]
            ) -> tuple[list[str], list[str], list[str]]:
    """(names only live has, names only the checkpoint has, texts of shape and dtype differences)."""
    wrong = []
    for name in sorted(saved.keys() & live.keys()):
        (sd, ss), (ld, ls) = saved[name], live[name]
        if ss != ls or sd != ld:
            wrong.append(f"component {key!r}: tensor {name!r} is {sd} {list(ss)} in the checkpoint, {ld} {list(ls)} "
                         "in the live state")
    return sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys()), wrong


def _optimizer_differences(key: str, opt: torch.optim.Optimizer, saved: Mapping[str, TensorSpec]) -> list[str]:
    """An optimizer's saved per-parameter state must fit the live optimizer's parameters (its own state may not
    exist yet): every index exists, and state kept at a parameter's shape has that shape."""
    params = [p for group in opt.param_groups for p in group["params"]]
    out = []
    for name, (_, shape) in sorted(saved.items()):
        match = _OPT_STATE.match(name)
        if match is None:
            continue
        index, part = int(match.group(1)), match.group(2)
        if index >= len(params):
            out.append(f"component {key!r}: the checkpoint holds optimizer state {name!r} for parameter {index}; the "
                       f"live optimizer has {len(params)} parameters")
        elif part in _PARAM_SHAPED and shape != tuple(params[index].shape):
            out.append(f"component {key!r}: optimizer state {name!r} is {list(shape)} in the checkpoint; live "
                       f"parameter {index} is {list(params[index].shape)}")
    return out


# Patterns whose saved copies differ from one another: none of them is a piece of one global tensor.
_PER_COPY = frozenset({SharingPattern.PER_RANK, SharingPattern.PER_GROUP, SharingPattern.PER_NODE})
_MISMATCH = "but the checkpoint saved it"


def pattern_mismatch(key: str, declared: SharingPattern, saved: SharingPattern) -> str | None:
    """Why a component declared `declared` cannot load what was saved as `saved`; None when it can (the
    same pattern, or whole tensors read as shards and shards reassembled as whole tensors)."""
    pair = {declared, saved}
    if SharingPattern.SHARDED not in pair or not pair & _PER_COPY or declared is saved:
        return None
    other = saved if declared is SharingPattern.SHARDED else declared
    how = placement_for(other).description
    if declared is SharingPattern.SHARDED:
        return (f"component {key!r} is declared SHARDED {_MISMATCH} {saved.name} ({how}): those "
                f"copies are not pieces of one tensor, so they cannot be read as shards. Load it as {saved.name} "
                "under the layout it was saved with (as the code that saved it declared it), then save again "
                "to write it SHARDED")
    return (f"component {key!r} is declared {declared.name} ({how}) {_MISMATCH} SHARDED (pieces "
            f"of each tensor, across ranks): declare it SHARDED to read the pieces this rank needs, or load the "
            "whole tensors as REPLICATED or GLOBAL")


def layout_issue(key: str, entry: ComponentEntry, saved: Topology, topo: RankTopology) -> str:
    """What does not fit, for a component saved per rank, node or group under another layout."""
    return placement_for(entry.pattern).layout_issue(key, saved, entry.replica_sets, topo, entry.process_group)


LAYOUT_ADVICE = ("State saved per rank, node or group belongs to the layout it was saved under. Resume with the saved "
                 "layout, leave these components out of load() (strict=False), or pass reshard=True (which merges "
                 "every saved copy, and fails for state that really differs per copy; see docs/parallelism.md)")


def _ranks(ranks: Sequence[int], world: int) -> str:
    if len(ranks) == world and world > 1:
        return " (every rank)"
    return f" (rank {ranks[0]})" if len(ranks) == 1 else f" (ranks {', '.join(map(str, ranks))})"


def refusal(path: str, reports: Sequence[CheckReport]) -> CheckpointError | None:
    """One error from every rank's findings, the same on every rank; None when the load may go on."""
    world = len(reports)
    layout: dict[str, list[int]] = {}
    other: dict[str, list[int]] = {}
    affected: set[str] = set()
    for rank, report in enumerate(reports):
        for key, text in report.layout:
            affected.add(key)
            layout.setdefault(text, []).append(rank)
        for text in report.refusals:
            other.setdefault(text, []).append(rank)
    if not layout and not other:
        return None
    parts = []
    if layout:
        parts.append(f"the job's layout changed since the save, for components {sorted(affected)}: "
                     + "; ".join(f"{t}{_ranks(r, world)}" for t, r in list(layout.items())[:SHOWN])
                     + (f"; and {len(layout) - SHOWN} more" if len(layout) > SHOWN else "") + f". {LAYOUT_ADVICE}")
    if other:
        shown = "; ".join(f"{t}{_ranks(r, world)}" for t, r in list(other.items())[:SHOWN])
        more = f"; and {len(other) - SHOWN} more difference(s)" if len(other) > SHOWN else ""
        # A pattern mismatch says what to do itself; the advice below is about keys, shapes and dtypes.
        advice = "" if all(_MISMATCH in t for t in other) else (
            ". Load into objects built like the saved ones, or pass strict=False to accept missing and unexpected "
            "keys (shapes and dtypes must match)")
        parts.append(f"{len(other)} difference(s) between the checkpoint and the live state: {shown}{more}{advice}")
    return CheckpointError(f"load of {path} refused before anything was changed: " + " | ".join(parts), path=path)


def merged_keys(reports: Sequence[CheckReport], which: str) -> dict[str, tuple[str, ...]]:
    """Missing (or unexpected) keys per component over every rank (strict=False)."""
    out: dict[str, set[str]] = {}
    for report in reports:
        for key, names in getattr(report, which).items():
            out.setdefault(key, set()).update(names)
    return {k: tuple(sorted(v)) for k, v in sorted(out.items())}


__all__ = ["CheckReport", "check_components", "compare", "layout_issue", "live_tensors", "merged_keys",
           "pattern_mismatch", "precheck", "refusal", "saved_tensors"]
