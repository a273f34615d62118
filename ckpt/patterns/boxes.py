"""Geometry of sharded tensors: boxes (a shard's offsets and lengths inside the full tensor), the flat
element ranges a save cuts them into, and which bytes of a saved piece a target shard needs.

A saved piece is elements [start, stop) of one saved box, flattened in row-major order. Such a range is a
handful of sub-boxes (at most two per dimension plus one), each of which sits in the piece's bytes with the
saved box's row-major strides. Intersecting those sub-boxes with a target box gives, for each overlap, one
contiguous byte span of the piece to read and a strided view of that span that lands the values in place.
`torch.distributed.checkpoint` does the same overlap search between saved chunks and the loading rank's
chunks; here a chunk may also be a range of a box, because replicated shards are split across their holders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """The elements [offsets, offsets + lengths) of a tensor, one pair per dimension."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """Index of this box inside a tensor whose element [0, ...] sits at `origin` (the full tensor's by
        default)."""
        base = origin if origin is not None else (0,) * len(self.offsets)
        return tuple(slice(o - b, o - b + n) for o, b, n in zip(self.offsets, base, self.lengths, strict=True))


def whole(shape: Sequence[int]) -> Box:
    """The box of a whole tensor."""
    return Box((0,) * len(shape), tuple(int(s) for s in shape))


def intersect(a: Box, b: Box) -> Box | None:
    """The elements both boxes hold, or None."""
    offsets, lengths = [], []
    for ao, an, bo, bn in zip(a.offsets, a.lengths, b.offsets, b.lengths, strict=True):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if hi <= lo:
            return None
        offsets.append(lo)
        lengths.append(hi - lo)
    return Box(tuple(offsets), tuple(lengths))


def row_major_strides(lengths: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(lengths):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def range_boxes(lengths: Sequence[int], start: int, stop: int) -> list[Box]:
    """Elements [start, stop) of a row-major array of `lengths`, as boxes in its own coordinates."""
    if start >= stop:
        return []
    if not lengths:
        return [Box((), ())]
    inner = math.prod(lengths[1:])
    if inner == 0:
        return []
    rest = list(lengths[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [_prefixed(first, b) for b in range_boxes(rest, start - first * inner, stop - first * inner)]
    out: list[Box] = []
    if start % inner:
        out += [_prefixed(first, b) for b in range_boxes(rest, start % inner, inner)]
        first += 1
    full_end = stop // inner
    if full_end > first:
        out.append(Box((first,) + (0,) * len(rest), (full_end - first, *rest)))
    if stop % inner:
        out += [_prefixed(full_end, b) for b in range_boxes(rest, 0, stop % inner)]
    return out


def _prefixed(row: int, box: Box) -> Box:
    return Box((row, *box.offsets), (1, *box.lengths))


@dataclass(frozen=True)
class Overlap:
    """Part of a target box found in one saved piece: read elements [first, last) of the piece (counted
    from the piece's start), then view them with `strides` as `region.lengths`."""

    region: Box  # in full-tensor coordinates
    first: int
    last: int
    strides: tuple[int, ...]


def piece_overlaps(saved: Box, start: int, stop: int, target: Box) -> list[Overlap]:
    """Where the target box meets elements [start, stop) of the saved box (see the module docstring)."""
    strides = row_major_strides(saved.lengths)
    out = []
    for local in range_boxes(saved.lengths, start, stop):
        region = Box(tuple(o + s for o, s in zip(local.offsets, saved.offsets, strict=True)), local.lengths)
        hit = intersect(region, target)
        if hit is None or hit.numel == 0:
            continue
        rel = [h - s for h, s in zip(hit.offsets, saved.offsets, strict=True)]
        lo = sum(r * s for r, s in zip(rel, strides, strict=True))
        hi = lo + sum((n - 1) * s for n, s in zip(hit.lengths, strides, strict=True)) + 1
        out.append(Overlap(hit, lo - start, hi - start, strides))
    return out


__all__ = ["Box", "Overlap", "intersect", "piece_overlaps", "range_boxes", "row_major_strides", "whole"]
