"""Which strided placements ckpt saves: a _StridedShard nests when the later mesh dimensions split the same
tensor dimension into exactly its split factor (FSDP2 over tensor parallelism), so each rank holds one box."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ckpt.patterns.dtensor import strided_nests


@pytest.mark.parametrize(("placements", "mesh", "nests"), [
    ((_StridedShard(0, split_factor=2), Shard(0)), (2, 2), True),  # FSDP2 on "dp" over a column-parallel weight
    ((_StridedShard(0, split_factor=4), Shard(0), Shard(0)), (3, 2, 2), True),  # two tp-like dims after it
    ((_StridedShard(-2, split_factor=2), Shard(0)), (2, 2), True),  # negative dims name the same dimension
    ((Shard(0), Shard(1)), (2, 2), True),  # no strided shard at all
    ((_StridedShard(0, split_factor=2), Replicate()), (2, 2), False),  # nothing splits it: two pieces a rank
    ((_StridedShard(0, split_factor=2),), (2,), False),
    ((_StridedShard(0, split_factor=4), Shard(0)), (2, 2), False),  # split factor is not what follows
    ((_StridedShard(0, split_factor=2), Shard(1)), (2, 2), False),  # the later shard cuts another dimension
    ((_StridedShard(0, split_factor=2), _StridedShard(0, split_factor=1)), (2, 2), False),
])
def test_strided_nests(placements, mesh, nests):
    assert strided_nests(placements, mesh, 2) is nests
