"""Agreeing on a save's plan: every rank declares to rank 0, rank 0 plans and tells each rank its files.

A rank's declarations (patterns, groups, settings, tensor sizes) rarely change between saves; their
replica digests do every time. So each rank sends the digest of its declarations and, only when that
changed since the plan it holds (or it holds none), the declarations themselves. When no rank's changed,
rank 0 reuses the plan it made last time and nothing but the replica digests crosses ranks; otherwise it
plans again from the new declarations and the ones it kept, and sends each rank its own files (not the
whole plan). Rank 0 also compares the replica digests here, so a healthy save needs no other exchange
before writing. Bytes per rank other than 0: its declarations (or a digest) and its own files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import xxhash

from ..comm import Communicator, Decision, Kept
from ..comm.messages import pack
from ..errors import CheckpointError
from ..topology import RankTopology
from .planning import (
    ComponentDecl,
    ComponentPlan,
    FileAssignment,
    build_plan,
    check_shared_shards,
    shard_digest_key,
)
from .validation import ReplicaChecks, find_suspects

T = TypeVar("T")


@dataclass(frozen=True)
class Declaration:
    """One rank's word in the prepare phase."""

    generation: int  # the plan this rank holds (0: none)
    shape: str  # digest of this rank's declarations without their replica digests
    decls: tuple[ComponentDecl, ...] | None  # None: unchanged since the plan of `generation`
    digests: dict[str, str | None]  # each component's replica summary digest

    def to_wire(self) -> list:
        return [self.generation, self.shape, None if self.decls is None else [d.to_wire() for d in self.decls],
                self.digests]

    @classmethod
    def from_wire(cls, w: list) -> Declaration:
        decls = None if w[2] is None else tuple(ComponentDecl.from_wire(d) for d in w[2])
        return cls(int(w[0]), str(w[1]), decls, dict(w[3]))


@dataclass(frozen=True)
class PrepareVerdict:
    """Rank 0's word to every rank: the plan now held (`generation`), whether it is new, and the checks left."""

    generation: int
    replanned: bool
    checks: ReplicaChecks

    def to_wire(self) -> list:
        return [self.generation, self.replanned, self.checks.to_wire()]

    @classmethod
    def from_wire(cls, w: list) -> PrepareVerdict:
        return cls(int(w[0]), bool(w[1]), ReplicaChecks.from_wire(w[2]))


@dataclass(frozen=True)
class PlanCache:
    """The last agreed plan as this rank holds it: its own files; on rank 0 also everyone's declarations and
    the whole plan (for the manifest). Replaced, never changed, after each prepare phase that succeeds."""

    generation: int = 0
    shape: str | None = None
    mine: tuple[FileAssignment, ...] = ()
    decls: tuple[Mapping[str, ComponentDecl], ...] | None = None  # rank 0 only
    plans: Mapping[str, ComponentPlan] | None = None  # rank 0 only


def declaration(decls: Sequence[ComponentDecl], cache: PlanCache) -> Declaration:
    """This rank's message, sending its declarations only when they differ from the ones its plan came from."""
    # A SHARDED component's shards keep their boxes here; their digests, new every save, go with the others.
    bare = tuple(ComponentDecl(d.key, d.pattern, d.process_group, d.required, d.validation, d.tensor_sizes, None,
                               None if d.shards is None else tuple(replace(m, digest=None) for m in d.shards))
                 for d in decls)
    shape = xxhash.xxh3_64_hexdigest(pack([d.to_wire() for d in bare]))
    unchanged = cache.generation > 0 and cache.shape == shape
    digests = {d.key: d.digest for d in decls}
    digests.update({shard_digest_key(d.key, m.name): m.digest for d in decls for m in d.shards or () if m.shared})
    return Declaration(cache.generation, shape, None if unchanged else bare, digests)


def decide_plan(messages: Sequence[Declaration], cache: PlanCache, topology: RankTopology) -> Decision:
    """Rank 0: reuse or remake the plan, compare the replica digests; each rank's files when the plan is new."""
    reuse = cache.plans is not None and all(m.decls is None and m.generation == cache.generation for m in messages)
    if reuse:
        decls, plans, generation = cache.decls, cache.plans, cache.generation
    else:
        decls = tuple(_decls_of(r, m, cache) for r, m in enumerate(messages))
        plans = build_plan(decls, topology)
        generation = cache.generation + 1
    check_shared_shards(decls, [m.digests for m in messages])
    verdict = PrepareVerdict(generation, not reuse, find_suspects(plans, [m.digests for m in messages]))
    if reuse:
        return Decision(verdict.to_wire(), None, cache)
    files: list[list[FileAssignment]] = [[] for _ in messages]
    for plan in plans.values():  # one pass over the plan: it holds files for every rank
        for f in plan.files:
            files[f.writer].append(f)
    per_rank = [[m.shape, [f.to_wire() for f in mine]] for m, mine in zip(messages, files, strict=True)]
    return Decision(verdict.to_wire(), per_rank, PlanCache(generation, messages[0].shape, tuple(files[0]), decls, plans))


def _decls_of(rank: int, m: Declaration, cache: PlanCache) -> dict[str, ComponentDecl]:
    if m.decls is not None:
        return {d.key: d for d in m.decls}
    if cache.decls is None or m.generation != cache.generation:
        raise CheckpointError(f"internal error: rank {rank} holds plan {m.generation} but rank 0 holds plan "
                              f"{cache.generation}; please report this, and build a new CheckpointCoordinator")
    return dict(cache.decls[rank])


def agree_plan(comm: Communicator, declare: Callable[[], tuple[Sequence[ComponentDecl], T]], cache: PlanCache,
               topology: RankTopology, what: str) -> tuple[PrepareVerdict, PlanCache, T]:
    """The prepare phase: `declare()` on every rank (its declarations, and what it keeps for writing), then
    the plan. Returns rank 0's verdict, the plan this rank now holds (the same `cache` when it was reused),
    and what `declare()` kept."""

    def local() -> Kept:
        decls, keep = declare()
        return Kept(declaration(decls, cache).to_wire(), keep)

    got = comm.gather_phase("prepare", local, what=what,
                            decide=lambda wires: decide_plan([Declaration.from_wire(w) for w in wires], cache,
                                                             topology))
    verdict = PrepareVerdict.from_wire(got.common)
    if got.kept is not None:  # rank 0
        return verdict, got.kept, got.local
    if not verdict.replanned:
        return verdict, cache, got.local
    shape, files = got.mine
    plan = PlanCache(verdict.generation, shape, tuple(FileAssignment.from_wire(f) for f in files))
    return verdict, plan, got.local
