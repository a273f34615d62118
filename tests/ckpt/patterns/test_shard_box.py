"""The box a rank holds of a Shard/Replicate DTensor, computed by ckpt itself, is the one torch computes (the
slow function DCP's planner uses), for every rank of random meshes, shapes and placements, uneven and empty
shards included."""

from __future__ import annotations

import itertools
import random

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as torch_box

from ckpt.patterns.dtensor import shard_box


def test_shard_box_matches_torch_on_random_meshes():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        ndim = rng.randint(1, 3)
        shape = tuple(rng.randint(0, 13) for _ in range(ndim))
        mesh = tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3)))
        placements = [rng.choice([Replicate(), *(Shard(d) for d in range(ndim))]) for _ in mesh]
        for coordinate in itertools.product(*(range(m) for m in mesh)):
            lengths, offsets = torch_box(shape, mesh, list(coordinate), placements)
            box = shard_box(shape, mesh, coordinate, placements)
            assert (box.lengths, box.offsets) == (tuple(lengths), tuple(offsets)), (shape, mesh, coordinate, placements)
            checked += 1
    assert checked > 1000
