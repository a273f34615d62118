"""The planner's split of replicated tensors over writers (pure functions, every rank computes the same)."""

from __future__ import annotations

import collections
import random

import pytest

from ckpt.save.planning import MIN_CHUNK_BYTES, balance, split

MB = 1 << 20


@pytest.mark.parametrize("seed", range(4))
def test_no_writer_gets_two_pieces_of_one_tensor(seed):
    # Two pieces of one tensor in one writer's file would share a name in its header: (94 MB, 60 MB) over
    # 4 writers once put both halves of the 60 MB tensor on one writer.
    rng = random.Random(seed)
    cases = [(4, [("t0", 94 * MB, 4), ("t1", 60 * MB, 4)])]
    cases += [(rng.randint(2, 8), [(f"t{i}", rng.randint(1, 200) * MB, rng.choice([1, 2, 4]))
                                   for i in range(rng.randint(1, 6))]) for _ in range(500)]
    for bins, sizes in cases:
        out = balance(split(sizes, bins), bins)
        for writer in out:
            counts = collections.Counter(p.name for p in writer)
            assert max(counts.values(), default=0) <= 1, (bins, sizes, out)
        covered = collections.defaultdict(int)  # and every tensor is still covered exactly once
        for writer in out:
            for p in writer:
                itemsize = dict((n, i) for n, _, i in sizes)[p.name]
                numel = dict((n, b) for n, b, _ in sizes)[p.name] // itemsize
                covered[p.name] += (numel if p.stop is None else p.stop) - (p.start or 0)
        assert covered == {n: b // i for n, b, i in sizes}


def test_pieces_are_never_smaller_than_the_minimum_chunk():
    pieces = split([("big", 64 * MIN_CHUNK_BYTES, 4)], 4)
    assert len(pieces) == 4 and all(nbytes >= MIN_CHUNK_BYTES for _, nbytes in pieces)
