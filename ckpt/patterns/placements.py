"""One placement class per sharing pattern: the per-pattern decisions (who writes, whose copy a rank reads,
whether copies are compared as replicas, whether a world-size change needs a reshard, how the `ckpt` command
names a copy) in one home, looked up with `placement_for(pattern)`. The byte-level work of SHARDED tensors
lives in ckpt/patterns/sharded.py (`tensor_placement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..component import SharingPattern
from ..errors import CheckpointError
from ..format.manifest import Topology
from ..topology import RankTopology


def my_group(topo: RankTopology, name: str) -> tuple[int, ...] | None:
    """This rank's group called `name`; a world of one rank is one whole-world group even when none is named."""
    if name in topo.groups:
        return topo.group_of(name)
    return (topo.rank,) if topo.world_size == 1 else None


def groups_of(topo: RankTopology, name: str) -> tuple[tuple[int, ...], ...]:
    """Every group called `name` (the whole world of one rank when none is named), or () when there is none."""
    named = topo.groups.get(name)
    if named:
        return tuple(tuple(g) for g in named)
    return ((tuple(range(topo.world_size)),) if topo.world_size == 1 else ())


@dataclass(frozen=True)
class Placement:
    """How one sharing pattern is placed: its words and its decisions, as plain data and small methods."""

    pattern: SharingPattern
    copy_word: str
    """What one saved copy belongs to, in messages: "rank", "group", "node", or "" for the job's one copy."""
    description: str
    """How `ckpt inspect` / `ls` describe the copies, e.g. "one copy per rank"."""
    compares_replicas: bool
    """Whether validation compares the copies ranks hold (replicas) before writing."""

    @property
    def manifest_name(self) -> str:
        return self.pattern.name

    def copy_label(self, owner: int | None) -> str:
        """"rank 3", "group 1", "node 0"; "" for the job's single copy."""
        return "" if owner is None else f"{self.copy_word or 'copy'} {owner}"

    def replica_sets(self, topo: RankTopology, group: str | None = None) -> tuple[tuple[int, ...], ...]:
        """The ranks that hold each saved copy (the first of a set writes its skeleton)."""
        everyone = tuple(range(topo.world_size))
        return {SharingPattern.GLOBAL: ((0,),), SharingPattern.REPLICATED: (everyone,),
                SharingPattern.SHARDED: (everyone,)}[self.pattern]

    def owner_for_load(self, topo: RankTopology, saved_sets: Sequence[Sequence[int]], group: str | None,
                       key: str) -> int | None:
        """Whose saved copy this rank reads: None for the job's one copy."""
        return None

    def needs_reshard(self, saved: Topology, saved_sets: Sequence[Sequence[int]], topo: RankTopology,
                      group: str | None) -> bool:
        """Whether this rank has no copy of its own under `saved`'s layout (False: the copy fits any layout)."""
        return False


class _PerRank(Placement):
    def replica_sets(self, topo, group=None):
        return tuple((r,) for r in range(topo.world_size))

    def owner_for_load(self, topo, saved_sets, group, key):
        return topo.rank

    def needs_reshard(self, saved, saved_sets, topo, group):
        return saved.world_size != topo.world_size


class _PerNode(Placement):
    def replica_sets(self, topo, group=None):
        return tuple(topo.node_ranks(n) for n in range(topo.num_nodes))

    def owner_for_load(self, topo, saved_sets, group, key):
        return topo.node

    def needs_reshard(self, saved, saved_sets, topo, group):
        return (saved.num_nodes, saved.local_world_size) != (topo.num_nodes, topo.local_world_size)


class _PerGroup(Placement):
    def replica_sets(self, topo, group=None):
        sets = groups_of(topo, group or "")
        if not sets:
            raise CheckpointError(f"PER_GROUP state over {group or ''!r} needs a process group of that name passed "
                                  "to CheckpointCoordinator(process_groups=...)")
        return sets

    def owner_for_load(self, topo, saved_sets, group, key):
        name = group or ""
        mine, saved = my_group(topo, name), [tuple(s) for s in saved_sets]
        if mine is None or mine not in saved:
            raise CheckpointError(
                f"component {key!r} (PER_GROUP over {name!r}): this rank's group {mine} is not one of the saved "
                f"groups {saved}; the job's layout changed since the save. Load with reshard=True to assemble it "
                "from every saved group's copy (see docs/parallelism.md), or resume with the saved layout")
        return saved.index(mine)

    def needs_reshard(self, saved, saved_sets, topo, group):
        now = set(groups_of(topo, group or "")) or None
        return not (now is not None and saved.world_size == topo.world_size
                    and {tuple(s) for s in saved_sets} == now)


Global = Placement(SharingPattern.GLOBAL, "", "one copy for the job, written by rank 0", False)
PerRank = _PerRank(SharingPattern.PER_RANK, "rank", "one copy per rank", False)
Replicated = Placement(SharingPattern.REPLICATED, "", "one copy, identical on every rank, split across them", True)
PerGroup = _PerGroup(SharingPattern.PER_GROUP, "group", "one copy per process group", True)
PerNode = _PerNode(SharingPattern.PER_NODE, "node", "one copy per node", True)
Sharded = Placement(SharingPattern.SHARDED, "", "each rank its own shards; shared shards once", True)

_PLACEMENTS = {p.pattern: p for p in (Global, PerRank, Replicated, PerGroup, PerNode, Sharded)}


def placement_for(pattern: SharingPattern) -> Placement:
    """The placement of a resolved sharing pattern."""
    return _PLACEMENTS[pattern]


__all__ = ["Global", "PerGroup", "PerNode", "PerRank", "Placement", "Replicated", "Sharded", "groups_of", "my_group",
           "placement_for"]
