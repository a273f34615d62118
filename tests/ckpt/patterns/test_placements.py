"""Each placement's decisions at world sizes 1, 2 and 4, on one node and on several."""

from __future__ import annotations

import pytest

from ckpt import SharingPattern
from ckpt.errors import CheckpointError
from ckpt.format.manifest import Topology
from ckpt.patterns.placements import groups_of, my_group, placement_for
from ckpt.topology import RankTopology


def topo(rank: int, world: int, lws: int | None = None, groups=None) -> RankTopology:
    return RankTopology(rank, world, lws or world, dict(groups or {}))


def saved(world: int, lws: int | None = None) -> Topology:
    lws = lws or world
    return Topology(world, world // lws, lws)


def test_every_pattern_has_a_placement_named_as_in_the_manifest():
    for p in SharingPattern:
        assert placement_for(p).pattern is p
        assert placement_for(p).manifest_name == p.name


@pytest.mark.parametrize("world", [1, 2, 4])
def test_writers_of_global_replicated_and_per_rank(world):
    t = topo(0, world)
    assert placement_for(SharingPattern.GLOBAL).replica_sets(t) == ((0,),)
    assert placement_for(SharingPattern.REPLICATED).replica_sets(t) == (tuple(range(world)),)
    assert placement_for(SharingPattern.PER_RANK).replica_sets(t) == tuple((r,) for r in range(world))


def test_per_node_writers_on_two_nodes_of_two():
    assert placement_for(SharingPattern.PER_NODE).replica_sets(topo(3, 4, 2)) == ((0, 1), (2, 3))
    assert placement_for(SharingPattern.PER_NODE).replica_sets(topo(0, 4, 4)) == ((0, 1, 2, 3),)


def test_a_world_of_one_is_one_whole_world_group():
    one = topo(0, 1)
    assert my_group(one, "dp") == (0,)
    assert groups_of(one, "dp") == ((0,),)
    assert placement_for(SharingPattern.PER_GROUP).replica_sets(one, "dp") == ((0,),)
    two = topo(1, 2)
    assert my_group(two, "dp") is None
    with pytest.raises(CheckpointError, match="'dp'"):
        placement_for(SharingPattern.PER_GROUP).replica_sets(two, "dp")


def test_readers_choose_their_own_copy():
    t = topo(3, 4, 2, {"dp": ((0, 2), (1, 3))})
    assert placement_for(SharingPattern.PER_RANK).owner_for_load(t, (), None, "rng") == 3
    assert placement_for(SharingPattern.PER_NODE).owner_for_load(t, (), None, "cache") == 1
    assert placement_for(SharingPattern.PER_GROUP).owner_for_load(t, ((0, 2), (1, 3)), "dp", "stage") == 1
    assert placement_for(SharingPattern.GLOBAL).owner_for_load(t, ((0,),), None, "data") is None
    assert placement_for(SharingPattern.REPLICATED).owner_for_load(t, ((0, 1, 2, 3),), None, "model") is None


def test_per_group_reader_refuses_a_group_that_was_not_saved():
    t = topo(1, 2, groups={"dp": ((0, 1),)})
    with pytest.raises(CheckpointError, match="reshard=True"):
        placement_for(SharingPattern.PER_GROUP).owner_for_load(t, ((0,), (1,)), "dp", "stage")


@pytest.mark.parametrize("before,after", [(1, 2), (2, 4), (4, 1), (2, 2)])
def test_reshard_need_when_the_world_size_changes(before, after):
    now, then = topo(0, after), saved(before)
    changed = before != after
    for p in (SharingPattern.GLOBAL, SharingPattern.REPLICATED, SharingPattern.SHARDED):
        assert placement_for(p).needs_reshard(then, (), now, None) is False
    assert placement_for(SharingPattern.PER_RANK).needs_reshard(then, (), now, None) is changed


def test_per_node_reshard_follows_the_node_layout():
    per_node = placement_for(SharingPattern.PER_NODE)
    assert per_node.needs_reshard(saved(4, 2), (), topo(0, 4, 2), None) is False
    assert per_node.needs_reshard(saved(4, 2), (), topo(0, 4, 4), None) is True
    assert per_node.needs_reshard(saved(2, 2), (), topo(0, 4, 2), None) is True


def test_per_group_reshard_follows_the_groups():
    per_group = placement_for(SharingPattern.PER_GROUP)
    groups = {"dp": ((0, 1), (2, 3))}
    assert per_group.needs_reshard(saved(4), ((0, 1), (2, 3)), topo(0, 4, 2, groups), "dp") is False
    assert per_group.needs_reshard(saved(4), ((0, 2), (1, 3)), topo(0, 4, 2, groups), "dp") is True
    assert per_group.needs_reshard(saved(1), ((0,),), topo(0, 1), "dp") is False
    assert per_group.needs_reshard(saved(1), ((0,),), topo(0, 2), "dp") is True


def test_words_and_replica_comparison():
    labels = {p: placement_for(p).copy_label(2) for p in SharingPattern}
    assert labels[SharingPattern.PER_RANK] == "rank 2"
    assert labels[SharingPattern.PER_GROUP] == "group 2"
    assert labels[SharingPattern.PER_NODE] == "node 2"
    assert placement_for(SharingPattern.GLOBAL).copy_label(None) == ""
    assert placement_for(SharingPattern.PER_RANK).description == "one copy per rank"
    assert placement_for(SharingPattern.REPLICATED).compares_replicas
    assert not placement_for(SharingPattern.PER_RANK).compares_replicas


def test_copies_owners_stems_and_split_writers():
    t = topo(1, 4, 2, {"dp": [(0, 2), (1, 3)]})
    place = placement_for
    assert place(SharingPattern.GLOBAL).copies(t, None, [0, 1, 2, 3]) == [(None, (0,))]
    assert place(SharingPattern.REPLICATED).copies(t, None, [0, 1, 2, 3]) == [(None, (0, 1, 2, 3))]
    # A rank that did not pass a PER_RANK component writes no copy of it.
    assert place(SharingPattern.PER_RANK).copies(t, None, [0, 2]) == [(0, (0,)), (2, (2,))]
    assert place(SharingPattern.PER_NODE).copies(t, None, [0, 1, 2, 3]) == [(0, (0, 1)), (1, (2, 3))]
    assert place(SharingPattern.PER_GROUP).copies(t, "dp", [0, 1, 2, 3]) == [(0, (0, 2)), (1, (1, 3))]
    stems = {p: place(p).stem(3 if place(p).copy_word else None) for p in SharingPattern if p.name != "SHARDED"}
    assert stems == {SharingPattern.GLOBAL: "global", SharingPattern.PER_RANK: "rank-00003",
                     SharingPattern.REPLICATED: "replicated", SharingPattern.PER_GROUP: "group-003",
                     SharingPattern.PER_NODE: "node-0003"}
    assert {p for p in SharingPattern if place(p).splits} == {SharingPattern.REPLICATED, SharingPattern.PER_GROUP}
    # The first holder of a split copy plans the split: rank 0 for the job's copy, each group's lowest member.
    assert [place(SharingPattern.REPLICATED).plans_split(topo(r, 4), None) for r in range(4)] == [True] + [False] * 3
    assert [place(SharingPattern.PER_GROUP).plans_split(topo(r, 4, 4, {"dp": [(0, 2), (1, 3)]}), "dp")
            for r in range(4)] == [True, True, False, False]
    assert not place(SharingPattern.PER_NODE).plans_split(topo(0, 4, 2), None)


def test_layout_issue_and_advice_name_the_layouts():
    before, now = saved(4, 2), topo(0, 2, 2)
    per_rank = placement_for(SharingPattern.PER_RANK)
    assert not per_rank.own_copy_fits(before, [(r,) for r in range(4)], now, None)
    assert per_rank.layout_issue("rng", before, [], now, None) == (
        "component 'rng' is PER_RANK and was saved by 4 ranks; this job has 2")
    assert "the same number of ranks" in per_rank.layout_advice("rng")
    per_node = placement_for(SharingPattern.PER_NODE)
    assert "saved by 2 nodes of 2 ranks; this job has 1 node of 2 ranks" in per_node.layout_issue(
        "cache", before, [], now, None)
    group = placement_for(SharingPattern.PER_GROUP)
    assert group.own_copy_fits(before, [(0, 1)], now, "dp")  # a group that was saved loads its own copy
    for p in (SharingPattern.GLOBAL, SharingPattern.REPLICATED, SharingPattern.SHARDED):
        assert placement_for(p).own_copy_fits(before, [], now, None)
