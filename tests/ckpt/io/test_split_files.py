"""A writer's large tensor share is spread over several files (one per I/O thread) and read back whole."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt.save.saving
from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import Box

MB = 1 << 20


@pytest.fixture
def small_files(monkeypatch):
    """Split at 1 MB instead of 64 MB, so small states exercise the split."""
    monkeypatch.setattr(ckpt.save.saving, "MIN_SPLIT_FILE_BYTES", MB)
    monkeypatch.setattr(ckpt.save.saving, "MIN_CHUNK_BYTES", MB // 4)


def _state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(6 * MB // 4, generator=gen),  # larger than a file's share: cut into ranges
            "mid": torch.randn(512, 256, generator=gen).to(torch.bfloat16),
            "small": torch.arange(10), "strided": torch.randn(1024, 512, generator=gen).t(),
            "step": 7}


def _files(path: str, key: str) -> list[dict]:
    with open(f"{path}/checkpoint_manifest.json") as f:
        manifest = json.load(f)
    return [f for f in manifest["components"][key]["files"] if f["kind"] == "tensors"]


@pytest.mark.parametrize("pattern", [SharingPattern.GLOBAL, SharingPattern.REPLICATED, SharingPattern.PER_RANK])
@pytest.mark.parametrize("in_place", [False, True])
def test_a_large_share_is_written_as_several_files_and_loads_exactly(tmp_path, small_files, pattern, in_place):
    saved = _state()
    coord = CheckpointCoordinator(tmp_path, io_threads=4)
    level = ValidationLevel.TENSOR if pattern is SharingPattern.REPLICATED else ValidationLevel.NONE
    path = coord.save(1, [StateComponent("model", Box(saved), pattern, validation_level=level)])
    files = _files(path, "model")
    assert len(files) == 4 and all(".file-" in f["path"] and "-of-4.safetensors" in f["path"] for f in files)
    pieces = [t for f in files for t in f["tensors"] if t["name"] == "big"]
    assert len(pieces) > 1 and all(t["chunk"] is not None for t in pieces)
    assert all(len({t["name"] for t in f["tensors"]}) == len(f["tensors"]) for f in files)  # a name once per file
    box = Box({k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0) for k, v in saved.items()})
    before = box.state["big"]
    coord.load([StateComponent("model", box, pattern)], in_place=in_place)
    assert box.state["step"] == 7
    for name in ("big", "mid", "small", "strided"):
        assert torch.equal(box.state[name], saved[name]) and box.state[name].dtype == saved[name].dtype, name
    # both loads read straight into the live tensor: in place at once, the default after every file was checked
    assert box.state["big"].data_ptr() == before.data_ptr()


def test_one_io_thread_keeps_one_file(tmp_path, small_files):
    path = CheckpointCoordinator(tmp_path, io_threads=1).save(1, [
        StateComponent("model", Box(_state()), SharingPattern.GLOBAL)])
    assert [f["path"] for f in _files(path, "model")] == ["model/global.safetensors"]


def _replicated_split(rank: int, world_size: int, run_dir: str) -> bool:
    ckpt.save.saving.MIN_SPLIT_FILE_BYTES, ckpt.save.saving.MIN_CHUNK_BYTES = MB, MB // 4
    saved = _state()
    coord = CheckpointCoordinator(run_dir, io_threads=2)
    coord.save(1, [StateComponent("model", Box(saved), SharingPattern.REPLICATED)])
    box = Box({k: None for k in saved})
    coord.load([StateComponent("model", box, SharingPattern.REPLICATED)])
    return all(torch.equal(box.state[k], v) if isinstance(v, torch.Tensor) else box.state[k] == v
               for k, v in saved.items())


def test_replicas_split_their_shares_into_files_too(tmp_path):
    assert expect_ok(run_ranks(2, _replicated_split, str(tmp_path))) == [True, True]
    files = _files(str(tmp_path / "checkpoint-00000001"), "model")
    writers = {f["writer_rank"] for f in files}
    assert writers == {0, 1} and len(files) > 2, [f["path"] for f in files]
