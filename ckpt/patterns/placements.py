"""One placement class per sharing pattern: the per-pattern decisions (who writes which copy and under what
name, whether a copy's tensors are split across its holders, whose copy a rank reads, whether copies are
compared as replicas, whether a layout change needs a reshard and what to say when it does not fit, how the
`ckpt` command names a copy) in one home, looked up with `placement_for(pattern)`. The byte-level work of SHARDED tensors
lives in ckpt/patterns/sharded.py (`tensor_placement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CheckpointError
from ..format.manifest import Topology
from ..topology import RankTopology
from .kinds import SharingPattern, ValidationLevel


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
    stem_format: str = ""
    """A copy's file name stem, formatted with its owner: "rank-{:05d}"; plain for the job's one copy."""
    splits: bool = False
    """Whether a copy's tensors are split across the ranks holding it (each writes a part), or its first
    holder writes it whole."""
    load_words: str = "loads as saved (the job's one copy fits any layout)"
    """What `ckpt inspect --at` says a load does when every rank has a copy of its own under the new layout."""
    default_validation: ValidationLevel = ValidationLevel.NONE
    """The level used when a component sets none: TENSOR where the trainer promises replicas are identical."""

    @property
    def manifest_name(self) -> str:
        return self.pattern.name

    def validation(self, declared: ValidationLevel | None) -> ValidationLevel:
        """The level a save checks at: NONE where there are no replicas to compare, else the declared one, else
        the default."""
        if not self.compares_replicas:
            return ValidationLevel.NONE
        return declared if declared is not None else self.default_validation

    def copy_label(self, owner: int | None) -> str:
        """"rank 3", "group 1", "node 0"; "" for the job's single copy."""
        return "" if owner is None else f"{self.copy_word or 'copy'} {owner}"

    def replica_sets(self, topo: RankTopology, group: str | None = None) -> tuple[tuple[int, ...], ...]:
        """The ranks that hold each saved copy (the first of a set writes its skeleton)."""
        everyone = tuple(range(topo.world_size))
        return {SharingPattern.GLOBAL: ((0,),), SharingPattern.REPLICATED: (everyone,),
                SharingPattern.SHARDED: (everyone,)}[self.pattern]

    def copies(self, topo: RankTopology, group: str | None, declaring: Sequence[int]
               ) -> list[tuple[int | None, tuple[int, ...]]]:
        """(owner, holders) of each copy a save writes: owner None for the job's one copy, else the rank, node
        or group index that `copy_label` names. `declaring`: the ranks that passed the component to save()."""
        return [(None, s) for s in self.replica_sets(topo, group)]

    def stem(self, owner: int | None) -> str:
        """The file name stem of `owner`'s copy."""
        return self.stem_format.format(owner)

    def plans_split(self, topo: RankTopology, group: str | None) -> bool:
        """Whether this rank is the first holder of a copy split across its holders (its tensor list plans the
        split)."""
        return self.splits and any(s[0] == topo.rank for _, s in self.copies(topo, group, ()))

    def owner_for_load(self, topo: RankTopology, saved_sets: Sequence[Sequence[int]], group: str | None,
                       key: str) -> int | None:
        """Whose saved copy this rank reads: None for the job's one copy."""
        return None

    def own_copy_fits(self, saved: Topology, saved_sets: Sequence[Sequence[int]], topo: RankTopology,
                      group: str | None) -> bool:
        """Whether the copy `owner_for_load` found for this rank may be loaded without a reshard."""
        return not self.needs_reshard(saved, saved_sets, topo, group)

    def layout_issue(self, key: str, saved: Topology, saved_sets: Sequence[Sequence[int]], topo: RankTopology,
                     group: str | None) -> str:
        """What does not fit when a copy saved under `saved`'s layout is not this rank's (one sentence)."""
        return f"component {key!r} ({self.pattern.name}) was saved under another layout"

    def layout_advice(self, key: str) -> str:
        """What to do about a `layout_issue` when loading without reshard=True."""
        return (f"resume with the saved layout, leave {key!r} out of the load, or pass reshard=True (which merges "
                "every saved copy, and fails for state that differs per copy)")

    def needs_reshard(self, saved: Topology, saved_sets: Sequence[Sequence[int]], topo: RankTopology,
                      group: str | None) -> bool:
        """Whether this rank has no copy of its own under `saved`'s layout (False: the copy fits any layout)."""
        return False


def _nodes(n: int, per_node: int) -> str:
    return f"{n} node{'s' if n != 1 else ''} of {per_node} rank{'s' if per_node != 1 else ''}"


class _PerRank(Placement):
    def replica_sets(self, topo, group=None):
        return tuple((r,) for r in range(topo.world_size))

    def copies(self, topo, group, declaring):
        return [(r, (r,)) for r in declaring]  # a rank that does not pass it writes no copy

    def layout_issue(self, key, saved, saved_sets, topo, group):
        return (f"component {key!r} is PER_RANK and was saved by {saved.world_size} ranks; this job has "
                f"{topo.world_size}")

    def layout_advice(self, key):
        return (f"PER_RANK state cannot move to another world size; resume with the same number of ranks, leave "
                f"{key!r} out of the load, or pass reshard=True (which merges every rank's copy, and fails for "
                "state that differs per rank)")

    def owner_for_load(self, topo, saved_sets, group, key):
        return topo.rank

    def needs_reshard(self, saved, saved_sets, topo, group):
        return saved.world_size != topo.world_size


class _PerNode(Placement):
    def replica_sets(self, topo, group=None):
        return tuple(topo.node_ranks(n) for n in range(topo.num_nodes))

    def copies(self, topo, group, declaring):
        return list(enumerate(self.replica_sets(topo, group)))

    def layout_issue(self, key, saved, saved_sets, topo, group):
        return (f"component {key!r} is PER_NODE and was saved by {_nodes(saved.num_nodes, saved.local_world_size)}; "
                f"this job has {_nodes(topo.num_nodes, topo.local_world_size)} (LOCAL_WORLD_SIZE="
                f"{topo.local_world_size})")

    def layout_advice(self, key):
        return (f"A node's copy belongs to the node layout it was saved under; resume with the saved layout, leave "
                f"{key!r} out of the load, or pass reshard=True (which merges every node's copy, and fails for "
                "state that differs per node)")

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

    def copies(self, topo, group, declaring):
        return list(enumerate(self.replica_sets(topo, group)))

    def plans_split(self, topo, group):
        mine = my_group(topo, group or "")
        return mine is not None and mine[0] == topo.rank

    def own_copy_fits(self, saved, saved_sets, topo, group):
        return True  # one of the saved groups: its copy loads even when the other groups changed

    def layout_issue(self, key, saved, saved_sets, topo, group):
        name = group or ""
        return (f"component {key!r} (PER_GROUP over {name!r}): this rank's group {my_group(topo, name)} is not one "
                f"of the saved groups {[tuple(s) for s in saved_sets]}")

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
        # Finding this rank's group among the saved ones is not enough: the same ranks can stand for another
        # group under another layout (at (dp=1, tp=2) the dp groups are (0,) and (1,), two tp shards; at world 1
        # the dp group (0,) holds the whole model), so the world size and the full set of groups must both match.
        now = set(groups_of(topo, group or "")) or None
        return not (now is not None and saved.world_size == topo.world_size
                    and {tuple(s) for s in saved_sets} == now)


Global = Placement(SharingPattern.GLOBAL, "", "one copy for the job, written by rank 0", False, "global")
PerRank = _PerRank(SharingPattern.PER_RANK, "rank", "one copy per rank", False, "rank-{:05d}",
                   load_words="each rank reads its own file")
Replicated = Placement(SharingPattern.REPLICATED, "", "one copy, identical on every rank, split across them", True,
                       "replicated", splits=True, default_validation=ValidationLevel.TENSOR)
PerGroup = _PerGroup(SharingPattern.PER_GROUP, "group", "one copy per process group", True, "group-{:03d}",
                     splits=True, load_words="each group reads its saved copy",
                     default_validation=ValidationLevel.TENSOR)
PerNode = _PerNode(SharingPattern.PER_NODE, "node", "one copy per node", True, "node-{:04d}",
                   load_words="each node reads its own copy")
# Its files are planned by its tensor layout (ckpt/patterns/sharded.py), not by copies.
Sharded = Placement(SharingPattern.SHARDED, "", "each rank its own shards; shared shards once", True,
                    default_validation=ValidationLevel.TENSOR)

_PLACEMENTS = {p.pattern: p for p in (Global, PerRank, Replicated, PerGroup, PerNode, Sharded)}


def placement_for(pattern: SharingPattern) -> Placement:
    """The placement of a resolved sharing pattern."""
    return _PLACEMENTS[pattern]


__all__ = ["Global", "PerGroup", "PerNode", "PerRank", "Placement", "Replicated", "Sharded", "groups_of", "my_group",
           "placement_for"]
