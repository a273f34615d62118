"""FSDP2 over a tensor-parallel model (2 x 2 dp x tp, strided placements, uneven shards) on real gloo ranks:
saved SHARDED and loaded exactly, by value, at the same layout, into a plain model at one rank and into
FSDP2 alone at two; a strided layout that is not one box per rank is refused before anything is written."""

from __future__ import annotations

import os

import numpy as np

from ckpt import read_manifest
from tests.support.distributed import expect_ok, run_ranks
from tests.support.strided import load_worker, refuse_worker, save_worker


def test_fsdp_over_tp_loads_at_other_layouts(tmp_path):
    run_dir = str(tmp_path / "run")
    saved = expect_ok(run_ranks(4, save_worker, run_dir, "fsdp_tp"))
    assert saved[0]["placements"]["0.weight"] == ["_StridedShard", "Shard"], saved[0]["placements"]
    values = saved[0]["values"]
    manifest = read_manifest(os.path.join(run_dir, "checkpoint-00000001"))
    # 8 rows: tp takes 4 and 4, dp splits each in two: four boxes of 2 rows, each written once.
    pieces = manifest.components["model"].tensors["0.weight"].pieces
    assert sorted((p.offsets[0], p.lengths[0]) for p in pieces) == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # Layer 2 (row-parallel, 3 x 8): dp splits its 3 rows 2 + 1, tp its columns: four uneven boxes.
    pieces = manifest.components["model"].tensors["2.weight"].pieces
    assert sorted((p.offsets, p.lengths) for p in pieces) == [((0, 0), (2, 4)), ((0, 4), (2, 4)), ((2, 0), (1, 4)),
                                                              ((2, 4), (1, 4))]
    for world, layout in ((4, "fsdp_tp"), (1, "plain"), (2, "fsdp")):
        for rank, loaded in enumerate(expect_ok(run_ranks(world, load_worker, run_dir, layout))):
            for name, value in values.items():
                assert np.array_equal(loaded[name], value), f"{layout} rank {rank}: {name}"


def test_strided_shard_that_is_not_one_box_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    failures = run_ranks(2, refuse_worker, run_dir, "save")
    for f in failures:
        assert f is not None and f.type_name == "SerializationError", f
        assert "'w'" in f.message and "_StridedShard" in f.message, f.message
        assert "redistribute" in f.message
    left = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    assert not any(n.startswith("checkpoint-") and not n.endswith(".partial") for n in left), left
    # As a load target too: refused, and the live shard is left as it was.
    for rank, out in enumerate(expect_ok(run_ranks(2, refuse_worker, str(tmp_path / "other"), "load"))):
        assert out["error"] is not None and "_StridedShard" in out["error"], out
        assert out["local"] == (np.arange(4.0).reshape(2, 2) + 10 * rank).tolist()
