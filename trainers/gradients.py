"""Gradient work the model-parallel trainers share: averaging over data-parallel replicas, and clipping by
the norm of the whole model when each rank holds only part of it (a stage, or tensor-parallel shards).

Both are deterministic and give the same result on every rank: each parameter's gradient is all-reduced on
its own (no buckets whose layout could change between a run and its resume), and partial norms are gathered
and added in rank order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def average_gradients(params: Iterable[torch.nn.Parameter], group: Any, size: int) -> None:
    """Average every gradient over the `size` ranks of `group` (the data-parallel replicas), in place."""
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            grad = _local(p.grad)
            dist.all_reduce(grad, group=group)
            grad.div_(size)


def _gather_sum(values: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Every rank's `values` added in rank order (the same bits on every rank)."""
    if size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(size)]
    dist.all_gather(parts, values, group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def clip_by_global_norm(params: Iterable[torch.nn.Parameter], max_norm: float, *, stage_group: Any = None,
                        stage_count: int = 1, shard_group: Any = None, shard_count: int = 1) -> float:
    """Clip gradients to `max_norm` by the norm of the whole model; returns that norm (before clipping).

    Squares are summed over the pipeline stages in `stage_group` (each holds other parameters) and, for DTensor
    gradients with a Shard placement, over the tensor-parallel ranks in `shard_group`; replicated gradients
    are counted once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for g in grads:
        square = _local(g).detach().to(torch.float64).pow(2).sum()
        if isinstance(g, DTensor) and any(p.is_shard() for p in g.placements):
            sharded += square
        else:
            replicated += square
    if shard_group is not None:
        sharded = _gather_sum(sharded.reshape(1), shard_group, shard_count)[0]
    total = _gather_sum((sharded + replicated).reshape(1), stage_group, stage_count)[0] if stage_group is not None \
        else sharded + replicated
    return _scale_down(grads, float(total), max_norm)


def _split_dims(g: torch.Tensor, names: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh dimensions (in mesh order) a gradient is split over; empty for a whole copy on every rank."""
    if not isinstance(g, DTensor):
        return ()
    split = {n for n, p in zip(g.device_mesh.mesh_dim_names or (), g.placements, strict=True)
             if not (p.is_replicate() or p.is_partial())}
    return tuple(n for n in names if n in split)


def clip_on_mesh(params: Iterable[torch.nn.Parameter], max_norm: float, mesh: Any) -> float:
    """Clip gradients to `max_norm` by the norm of the whole model, gradients being DTensors split over some of
    the dimensions of `mesh` (FSDP2 over a tensor-parallel model); returns that norm (before clipping).

    Squares are summed per set of split dimensions, over the ranks of exactly those dimensions (one dimension
    at a time, in mesh order, rank order within each), so each shard is counted once and every rank gets the
    same bits. Every set is gathered on every rank, present or not, so all take the same collectives.
    """
    grads = [p.grad for p in params if p.grad is not None]
    names = tuple(mesh.mesh_dim_names or ())
    subsets = [c for k in range(len(names) + 1) for c in itertools.combinations(names, k)]
    squares = {key: torch.zeros((), dtype=torch.float64) for key in subsets}
    for g in grads:
        squares[_split_dims(g, names)] += _local(g).detach().to(torch.float64).pow(2).sum()
    total = torch.zeros((), dtype=torch.float64)
    for key in subsets:
        part = squares[key].reshape(1)
        for name in key:
            part = _gather_sum(part, mesh[name].get_group(), mesh[name].size())
        total += part[0]
    return _scale_down(grads, float(total), max_norm)


def _scale_down(grads: list[torch.Tensor], total_square: float, max_norm: float) -> float:
    """Scale `grads` in place so their norm (the root of `total_square`) is at most `max_norm`; return the norm."""
    norm = math.sqrt(total_square)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            _local(g).mul_(coef)
    return norm
