"""A DDP communication hook whose result does not depend on how DDP lays parameters out in buckets.

DDP rebuilds its buckets after the first step, in the order gradients became ready. A ring all-reduce
adds each element's copies in an order set by where the element sits in the buffer, so with more than
two ranks the same gradients can sum to values that differ in the last bit depending on the layout. A
resumed run's first step uses the initial layout while the uninterrupted run uses the rebuilt one, and
the runs drift apart. Reducing every parameter in its own all-reduce fixes each element's order by the
parameter alone: the sums are the same whatever the bucket layout. It costs one collective per parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


# No annotations on `bucket` or the return value: DDP compares them with the real classes, and this
# module's postponed annotations are strings. `bucket` is a dist.GradBucket; it returns Future[Tensor].
def per_parameter_allreduce(group: Any, bucket):
    """Average the bucket's gradients, each parameter's slice in its own all-reduce."""
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    sizes = [p.numel() for p in bucket.parameters()]
    if sum(sizes) != buffer.numel():  # a layout this hook does not understand (padding?): reduce it whole
        sizes = [buffer.numel()]
    futures, offset = [], 0
    for size in sizes:
        work = dist.all_reduce(buffer[offset:offset + size], group=group, async_op=True)
        futures.append(work.get_future())
        offset += size
    return torch.futures.collect_all(futures).then(lambda _: buffer)
