"""The geometry of SHARDED loads, against brute force: flat ranges as boxes, and the reads that fill a target
box from saved pieces (random shapes, boxes and ranges); and the manifest's checks of the new fields."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ckpt import ManifestError
from ckpt.format.manifest_read import parse_manifest
from ckpt.patterns.boxes import Box, piece_overlaps, range_boxes


def _random_case(rng: random.Random) -> tuple[list[int], list[int], int, int]:
    lengths = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
    n = math.prod(lengths)
    start = rng.randint(0, n)
    return lengths, [ln + rng.randint(0, 3) for ln in lengths], start, rng.randint(start, n)


def test_a_flat_range_is_covered_exactly_once_by_its_boxes():
    rng = random.Random(0)
    for _ in range(1000):
        lengths, _, start, stop = _random_case(rng)
        count = torch.zeros(lengths, dtype=torch.int64)
        for box in range_boxes(lengths, start, stop):
            count[box.slices()] += 1
        expected = torch.zeros(math.prod(lengths), dtype=torch.int64)
        expected[start:stop] = 1
        assert torch.equal(count.reshape(-1), expected), (lengths, start, stop)


def test_reads_of_a_piece_land_every_overlapping_element_where_it_belongs():
    rng = random.Random(1)
    for _ in range(1000):
        lengths, shape, start, stop = _random_case(rng)
        full = torch.arange(math.prod(shape)).reshape(shape)
        saved = Box(tuple(rng.randint(0, s - ln) for s, ln in zip(shape, lengths, strict=True)), tuple(lengths))
        piece = full[saved.slices()].reshape(-1)[start:stop].clone()  # what the file holds
        want = [rng.randint(0, s) for s in shape]
        target = Box(tuple(rng.randint(0, s - w) for s, w in zip(shape, want, strict=True)), tuple(want))
        out = torch.full(want, -1, dtype=torch.int64)
        for ov in piece_overlaps(saved, start, stop, target):
            span = piece[ov.first: ov.last].clone()  # one contiguous read
            out[ov.region.slices(target.offsets)] = span.as_strided(ov.region.lengths, ov.strides)
        # Every element the piece holds inside the target is filled with its value; nothing else is touched.
        held = torch.zeros(shape, dtype=torch.bool)
        held[saved.slices()] = torch.arange(math.prod(lengths)).reshape(lengths).ge(start) & torch.arange(
            math.prod(lengths)).reshape(lengths).lt(stop)
        inside = held[target.slices()]
        assert torch.equal(out[inside], full[target.slices()][inside])
        assert bool((out[~inside] == -1).all())


def _sharded_manifest() -> dict:
    piece = {"file": "m/shards-rank-00000.safetensors", "offsets": [0], "lengths": [3], "start": 0, "stop": 3,
             "bytes": [128, 140]}
    return {"format_version": 2, "step": 1, "created_utc": "2026-01-01T00:00:00Z",
            "topology": {"world_size": 1, "num_nodes": 1, "local_world_size": 1, "process_groups": {}},
            "versions": {}, "metrics": {},
            "components": {"m": {"pattern": "sharded", "process_group": None, "required": True,
                                 "validation_level": "tensor", "replica_sets": [[0]],
                                 "files": [{"path": "m/shards-rank-00000.safetensors", "kind": "tensors",
                                            "writer_rank": 0, "owner": None, "nbytes": 140,
                                            "xxh3_128": "0" * 32, "tensors": []}],
                                 "tensors": {"w": {"dtype": "F32", "shape": [3], "pieces": [piece]}}}}}


def test_the_manifest_reads_sharded_pieces():
    m = parse_manifest(_sharded_manifest(), "m.json")
    (p,) = m.components["m"].tensors["w"].pieces
    assert (p.offsets, p.lengths, p.begin, p.end) == ((0,), (3,), 128, 140)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format_version=1), r"unknown fields \['tensors'\]"),
    (lambda d: d["components"]["m"]["tensors"]["w"]["pieces"][0].update(bytes=[128, 144]), "do not hold 3 elements"),
    (lambda d: d["components"]["m"]["tensors"]["w"]["pieces"][0].update(file="m/other.safetensors"),
     "is not one of the component's tensor files"),
    (lambda d: d["components"]["m"]["tensors"]["w"]["pieces"][0].update(lengths=[4]), "does not fit shape"),
    (lambda d: d["components"]["m"]["tensors"]["w"]["pieces"][0].update(stop=4), "does not fit its box"),
    (lambda d: d["components"]["m"].pop("tensors"), "missing with it"),
    (lambda d: d["components"]["m"]["tensors"]["w"].update(extra=1), r"unknown fields \['extra'\]"),
])
def test_the_manifest_refuses_bad_sharded_fields(mutate, message):
    data = json.loads(json.dumps(_sharded_manifest()))
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, "m.json")
