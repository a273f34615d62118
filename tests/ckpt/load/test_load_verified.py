"""The default load on a local run dir: every file is checked first (digests streamed through a small buffer),
then, once every rank agreed, the bytes go straight into the live tensors; a file that changes in between is
refused before any of it is read."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CorruptCheckpointError,
    PartialLoadError,
    SharingPattern,
    StateComponent,
)
from ckpt.format.manifest_read import read_manifest
from ckpt.io.storage import LocalStorage
from ckpt.load.loading import verify_copy


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))


class Recorder:
    """Live tensors, and the tensors its load_state_dict() was handed."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.handed: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.handed = dict(state)
        for name, tensor in state.items():
            self.state[name].copy_(tensor)


def test_default_load_reads_into_the_live_tensors_without_new_ones(tmp_path):
    saved = {f"w{i}": torch.randn(1000 + i) for i in range(5)}
    with CheckpointCoordinator(str(tmp_path)) as coord:
        coord.save(1, [StateComponent("model", Recorder(saved), SharingPattern.REPLICATED)])
        live = Recorder({n: torch.zeros_like(t) for n, t in saved.items()})
        result = coord.load([StateComponent("model", live, SharingPattern.REPLICATED)])
    assert result.loaded == ("model",)
    assert {n: t.data_ptr() for n, t in live.handed.items()} == {n: t.data_ptr() for n, t in live.state.items()}
    assert all(torch.equal(live.state[n], saved[n]) for n in saved)


def test_a_fresh_optimizer_gets_its_state_in_new_tensors(tmp_path):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("optimizer", opt, SharingPattern.REPLICATED)]
    with CheckpointCoordinator(str(tmp_path)) as coord:
        coord.save(1, comps)
        fresh = _model(3)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)  # no state yet: nothing to read into
        coord.load([StateComponent("model", fresh, SharingPattern.REPLICATED),
                    StateComponent("optimizer", fresh_opt, SharingPattern.REPLICATED)])
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _checkpoint(tmp_path) -> tuple[str, str]:
    with CheckpointCoordinator(str(tmp_path)) as coord:
        path = coord.save(1, [StateComponent("model", _model(0), SharingPattern.REPLICATED)])
    tensors = next(f.path for f in read_manifest(LocalStorage(), path).components["model"].files
                   if f.kind == "tensors")
    return path, os.path.join(path, tensors)


def test_a_file_replaced_after_its_check_is_refused_before_it_is_read(tmp_path):
    path, tensors_file = _checkpoint(tmp_path)
    storage = LocalStorage()
    entry = read_manifest(storage, path).components["model"]
    checked = verify_copy(storage, path, "model", entry, None)
    shutil.copyfile(tensors_file, tensors_file + ".new")
    os.replace(tensors_file + ".new", tensors_file)  # the same bytes, another file
    live = {n: t.clone() for n, t in _model(1).state_dict().items()}
    before = {n: t.clone() for n, t in live.items()}
    with pytest.raises(CorruptCheckpointError, match=r"replaced or rewritten after this load checked it"):
        checked.read(live)
    assert all(torch.equal(live[n], before[n]) for n in live)


def test_a_damaged_file_fails_the_check_and_leaves_the_live_model_alone(tmp_path):
    _, tensors_file = _checkpoint(tmp_path)
    with open(tensors_file, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    live = _model(1)
    before = {n: t.clone() for n, t in live.state_dict().items()}
    with CheckpointCoordinator(str(tmp_path)) as coord, pytest.raises(CorruptCheckpointError,
                                                                      match=r"does not match its digest") as info:
        coord.load([StateComponent("model", live, SharingPattern.REPLICATED)])
    assert not isinstance(info.value, PartialLoadError)
    assert all(torch.equal(t, before[n]) for n, t in live.state_dict().items())
