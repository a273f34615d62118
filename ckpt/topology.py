"""Who is who in the job: ranks, nodes, and the members of each named process group."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .comm import Communicator, Decision
from .errors import CheckpointError
from .format.manifest import Topology


@dataclass(frozen=True)
class RankTopology:
    """The job's shape as seen from one rank."""

    rank: int
    world_size: int
    local_world_size: int
    groups: dict[str, tuple[tuple[int, ...], ...]]  # every group of each name, sorted by lowest member

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    def node_ranks(self, node: int) -> tuple[int, ...]:
        return tuple(range(node * self.local_world_size, (node + 1) * self.local_world_size))

    def group_of(self, name: str, rank: int | None = None) -> tuple[int, ...]:
        rank = self.rank if rank is None else rank
        for members in self.groups.get(name, ()):
            if rank in members:
                return members
        raise CheckpointError(f"rank {rank} is in no process group named {name!r}; pass it in "
                              f"CheckpointCoordinator(process_groups={{{name!r}: ...}}) on every rank")

    def describe(self) -> Topology:
        return Topology(self.world_size, self.num_nodes, self.local_world_size, dict(self.groups))


def _members(name: str, group: Any, rank: int, world_size: int) -> list[int]:
    if group is None:
        return [rank]
    if isinstance(group, Sequence) and not isinstance(group, str):
        members = [int(r) for r in group]
    elif dist.is_available() and dist.is_initialized():
        if group == dist.GroupMember.NON_GROUP_MEMBER:
            raise CheckpointError(f"rank {rank}: the process group {name!r} passed to the coordinator does not "
                                  "contain this rank; pass each rank the group it belongs to")
        members = list(dist.get_process_group_ranks(group))
    else:
        raise CheckpointError(f"process group {name!r} was given but torch.distributed is not initialised")
    if rank not in members or any(not 0 <= r < world_size for r in members):
        raise CheckpointError(f"rank {rank}: process group {name!r} has members {members}, which must include "
                              f"this rank and lie in 0..{world_size - 1}")
    return sorted(members)


def _env_local_world_size(world: int) -> int:
    """torchrun's LOCAL_WORLD_SIZE; a world of one is one node of one rank whatever the environment says (a
    single process started from inside a torchrun job, or a notebook that inherited the variable)."""
    if world == 1:
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)


def discover(comm: Communicator, process_groups: Mapping[str, Any] | None,
             local_world_size: int | None) -> RankTopology:
    """Build the topology; a collective: every rank must call it with the same group names."""
    rank, world = comm.rank, comm.world_size
    lws = local_world_size or _env_local_world_size(world)

    def local() -> dict[str, list[int]]:
        if lws < 1 or world % lws:
            raise CheckpointError(f"LOCAL_WORLD_SIZE={lws} does not divide the world size {world}; nodes must "
                                  "have the same number of ranks")
        return {name: _members(name, g, rank, world) for name, g in (process_groups or {}).items()}

    # Rank 0 checks every rank's groups and hands the agreed groups back (each rank does not need all others').
    groups = comm.gather_phase("topology", local, what="coordinator start-up",
                               decide=lambda mine: Decision(agreed_groups(mine, world))).common
    return RankTopology(rank, world, lws, {name: tuple(tuple(m) for m in sets) for name, sets in groups.items()})


def agreed_groups(mine: Sequence[Mapping[str, Sequence[int]]], world: int) -> dict[str, list[list[int]]]:
    """The groups of each name from every rank's own groups (index = rank); raises if the ranks disagree."""
    groups: dict[str, list[list[int]]] = {}
    for name in sorted({n for m in mine for n in m}):
        found = {tuple(m[name]) for m in mine if name in m}
        lacking = [r for r, m in enumerate(mine) if name not in m]
        if lacking:
            raise CheckpointError(f"process group {name!r} was passed on some ranks but not on ranks {lacking}; "
                                  "every rank must pass every group name")
        covered = sorted(r for members in found for r in members)
        if covered != list(range(world)):
            raise CheckpointError(f"process groups named {name!r} overlap or leave ranks out: {sorted(found)}; "
                                  "each rank must belong to exactly one group of a name")
        for r, m in enumerate(mine):
            if tuple(m[name]) not in found or r not in m[name]:
                raise CheckpointError(f"rank {r} disagrees about the members of its group {name!r}")
        groups[name] = [list(g) for g in sorted(found)]
    return groups
