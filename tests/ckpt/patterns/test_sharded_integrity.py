"""Block digests of SHARDED pieces (manifest format_version 3): written in the same pass as the file's digest,
checked by every read that touches a block (a read of part of a piece widens to whole blocks), and a
version-2 manifest, whose pieces have no digests, still loads. One process; the gloo cases are in
test_sharded_integrity_dist.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
import xxhash

from ckpt import CheckpointCoordinator, CorruptCheckpointError, ManifestError, SharingPattern, StateComponent
from ckpt.format.digests import DIGEST_BLOCK_MIN, digest_block
from ckpt.format.manifest import DIGEST_FIELD, content_digest
from ckpt.format.manifest_read import parse_manifest
from ckpt.format.tensor_io import write_safetensors
from ckpt.io.storage import LocalStorage
from ckpt.patterns.boxes import Box
from ckpt.patterns.sharded_read import RangeRead, Target, merged_spans, plan_reads
from tests.support.workers import Box as Holder


def test_block_digests_are_those_of_the_bytes_written(tmp_path):
    big = torch.arange(300_000, dtype=torch.float32)  # 1.2 MB: several blocks, written in slices
    small = torch.arange(10, dtype=torch.int64)  # gathered with others into one write
    w = write_safetensors(LocalStorage(), str(tmp_path / "f.safetensors"), [("big", big), ("small", small)],
                          block_digests=True)
    data = (tmp_path / "f.safetensors").read_bytes()
    assert xxhash.xxh3_128_hexdigest(data) == w.digest
    for (begin, end), blocks in zip(w.spans, w.blocks, strict=True):
        assert blocks.block == digest_block(end - begin) == DIGEST_BLOCK_MIN
        expected = [xxhash.xxh3_128_hexdigest(data[b: min(b + blocks.block, end)])
                    for b in range(begin, end, blocks.block)]
        assert list(blocks.digests) == expected
    counts = {t.name: len(b.digests) for t, b in zip(w.tensors, w.blocks, strict=True)}
    assert counts == {"big": 5, "small": 1}


def test_blocks_grow_so_a_piece_has_at_most_128():
    assert digest_block(0) == digest_block(32 << 20) == DIGEST_BLOCK_MIN
    assert digest_block((32 << 20) + 1) == 2 * DIGEST_BLOCK_MIN
    assert -(-(10 << 30) // digest_block(10 << 30)) <= 128


def _save(run_dir: str, state: dict) -> str:
    with CheckpointCoordinator(run_dir) as coord:
        coord.save(1, [StateComponent("m", Holder(state), SharingPattern.SHARDED)])
    return os.path.join(run_dir, "checkpoint-00000001")


def _load(run_dir: str, state: dict) -> dict:
    holder = Holder(state)
    with CheckpointCoordinator(run_dir) as coord:
        coord.load([StateComponent("m", holder, SharingPattern.SHARDED)])
    return holder.state


def test_a_partial_read_widens_to_whole_blocks(tmp_path):
    ckpt_dir = _save(str(tmp_path / "run"), {"w": torch.arange(512 * 1024, dtype=torch.float32).reshape(1024, 512)})
    with open(os.path.join(ckpt_dir, "checkpoint_manifest.json")) as f:
        m = parse_manifest(json.load(f), "m")
    saved = m.components["m"].tensors
    (piece,) = saved["w"].pieces
    assert m.format_version == 3 and piece.block == DIGEST_BLOCK_MIN and len(piece.digests) == 8
    # Rows 300..599 (bytes 614400..1228800 of the piece): blocks 2..4, nothing more.
    reads = plan_reads("m", saved, {"w": Target(Box((300, 0), (300, 512)))})
    assert [(r.begin - piece.begin, r.end - piece.begin) for r in reads] == [(614400, 1228800)]
    assert [(lo - piece.begin, hi - piece.begin) for lo, hi in [reads[0].span]] == [(2 << 18, 5 << 18)]
    assert merged_spans(reads) == {piece.file: [[piece.begin + (2 << 18), piece.begin + (5 << 18)]]}
    whole_read = RangeRead("w", piece.file, piece.begin, piece.end, Box((0, 0), (1024, 512)), (512, 1), piece)
    assert whole_read.span == (piece.begin, piece.end)


@pytest.mark.parametrize("row", [0, 700, 1023])
def test_a_flipped_byte_fails_the_load_naming_the_tensor_and_changes_nothing(tmp_path, row):
    ckpt_dir = _save(str(tmp_path / "run"), {"w": torch.arange(512 * 1024, dtype=torch.float32).reshape(1024, 512),
                                            "b": torch.ones(3)})
    with open(os.path.join(ckpt_dir, "checkpoint_manifest.json")) as f:
        (piece,) = parse_manifest(json.load(f), "m").components["m"].tensors["w"].pieces
    path = os.path.join(ckpt_dir, piece.file)
    with open(path, "r+b") as f:
        f.seek(piece.begin + row * 512 * 4 + 1)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    live = {"w": torch.zeros(1024, 512), "b": torch.zeros(3)}
    with pytest.raises(CorruptCheckpointError) as info:
        _load(str(tmp_path / "run"), live)
    err = info.value
    assert err.component == "m" and err.key_path == "w" and err.path == path
    assert "tensor 'w'" in str(err) and piece.file.split("/")[-1] in str(err) and "component 'm'" in str(err)
    assert not live["w"].any() and not live["b"].any()


def test_a_version_2_manifest_without_piece_digests_still_loads(tmp_path):
    run_dir = str(tmp_path / "run")
    values = {"w": torch.randn(64, 8), "step": torch.tensor(7)}
    ckpt_dir = _save(run_dir, values)
    path = os.path.join(ckpt_dir, "checkpoint_manifest.json")
    with open(path) as f:
        data = json.load(f)
    data["format_version"] = 2
    for t in data["components"]["m"]["tensors"].values():
        for p in t["pieces"]:
            del p["block_bytes"], p["xxh3_128"]
    data[DIGEST_FIELD] = content_digest(data)
    with open(path, "w") as f:
        json.dump(data, f)
    live = {"w": torch.zeros(64, 8), "step": torch.tensor(0)}
    loaded = _load(run_dir, live)
    assert torch.equal(loaded["w"], values["w"]) and int(loaded["step"]) == 7


def _v3_manifest() -> dict:
    piece = {"file": "m/shards-rank-00000.safetensors", "offsets": [0], "lengths": [3], "start": 0, "stop": 3,
             "bytes": [128, 140], "block_bytes": DIGEST_BLOCK_MIN, "xxh3_128": ["0" * 32]}
    return {"format_version": 3, "step": 1, "created_utc": "2026-01-01T00:00:00Z",
            "topology": {"world_size": 1, "num_nodes": 1, "local_world_size": 1, "process_groups": {}},
            "versions": {}, "metrics": {},
            "components": {"m": {"pattern": "sharded", "process_group": None, "required": True,
                                 "validation_level": "tensor", "replica_sets": [[0]],
                                 "files": [{"path": "m/shards-rank-00000.safetensors", "kind": "tensors",
                                            "writer_rank": 0, "owner": None, "nbytes": 140,
                                            "xxh3_128": "0" * 32, "tensors": []}],
                                 "tensors": {"w": {"dtype": "F32", "shape": [3], "pieces": [piece]}}}}}


def _piece(d: dict) -> dict:
    return d["components"]["m"]["tensors"]["w"]["pieces"][0]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format_version=2), r"unknown fields \['block_bytes', 'xxh3_128'\]"),
    (lambda d: _piece(d).pop("xxh3_128"), r"xxh3_128 is missing"),
    (lambda d: _piece(d).update(xxh3_128=["0" * 32] * 2), "one xxh3-128 digest per block"),
    (lambda d: _piece(d).update(xxh3_128=["zz"]), "one xxh3-128 digest per block"),
    (lambda d: _piece(d).update(block_bytes=0), "one xxh3-128 digest per block"),
])
def test_the_manifest_checks_piece_digests(mutate, message):
    assert parse_manifest(_v3_manifest(), "m.json").components["m"].tensors["w"].pieces[0].digests == ("0" * 32,)
    data = json.loads(json.dumps(_v3_manifest()))
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, "m.json")
