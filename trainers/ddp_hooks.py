"""A DDP communication hook whose result does not depend on how DDP lays parameters out in buckets.

DDP rebuilds its buckets after the first step, in the order gradients became ready. A ring all-reduce
adds each element's copies in an order set by where the element sits in the buffer, so with more than
two ranks the same gradients can sum to values that differ in the last bit depending on the layout. A
resumed run's first step uses the initial layout while the uninterrupted run uses the rebuilt one, and
the runs drift apart.

This hook gathers every rank's copy of the bucket and adds them in rank order, element by element, so
each sum is ((g0 + g1) + g2) + ... whatever the layout, and identical on every rank. It moves about twice
the bytes of a ring all-reduce; the gathered copies are bounded by working in chunks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

CHUNK_BYTES = 32 * 2**20  # gathered bytes per collective (world size x chunk)


# No annotations on `bucket` or the return value: DDP compares them with the real classes, and this
# module's postponed annotations are strings. `bucket` is a dist.GradBucket; it returns Future[Tensor].
def ordered_allreduce(group: Any, bucket):
    """Average the bucket over the ranks of `group`, adding the ranks' copies in rank order."""
    buffer = bucket.buffer()
    world = dist.get_world_size(group)
    buffer.div_(world)
    step = max(1, CHUNK_BYTES // (buffer.element_size() * world))
    pieces = [buffer[start:start + step] for start in range(0, buffer.numel(), step)]
    gathered = [[torch.empty_like(piece) for _ in range(world)] for piece in pieces]
    futures = [dist.all_gather(out, piece, group=group, async_op=True).get_future()
               for out, piece in zip(gathered, pieces, strict=True)]

    def add_in_rank_order(_: Any) -> torch.Tensor:
        for piece, copies in zip(pieces, gathered, strict=True):
            piece.copy_(copies[0])
            for copy in copies[1:]:
                piece.add_(copy)
        return buffer

    return torch.futures.collect_all(futures).then(add_in_rank_order)
