"""In-place loads read straight into the caller's tensors, and say so when they fail."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CorruptCheckpointError,
    SharingPattern,
    StateComponent,
)
from ckpt.testing import Fault, FaultyStorage
from tests.support.workers import Box, make_model, same, snapshot


def test_in_place_load_restores_into_the_existing_tensors(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    model, opt = make_model()
    expected = {"model": snapshot(model), "optimizer": snapshot(opt)}
    coord.save(1, [StateComponent("model", model, SharingPattern.REPLICATED),
                   StateComponent("optimizer", opt, SharingPattern.REPLICATED)])
    target, target_opt = make_model(seed=9)
    pointers = {name: p.data_ptr() for name, p in target.named_parameters()}
    coord.load([StateComponent("model", target, SharingPattern.REPLICATED),
                StateComponent("optimizer", target_opt, SharingPattern.REPLICATED)], in_place=True)
    assert same(expected["model"], target.state_dict())
    assert same(expected["optimizer"], target_opt.state_dict())
    assert {name: p.data_ptr() for name, p in target.named_parameters()} == pointers


def test_in_place_falls_back_to_new_tensors_when_shapes_differ(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    coord.save(1, [StateComponent("c", Box({"a": torch.arange(6.0), "b": torch.ones(2, 2)}), SharingPattern.GLOBAL)])
    live = Box({"a": torch.zeros(6), "b": torch.zeros(3)})  # "b" has another shape: gets a new tensor
    keep = live.state["a"]
    coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], in_place=True)
    assert live.state["a"].data_ptr() == keep.data_ptr() and torch.equal(keep, torch.arange(6.0))
    assert torch.equal(live.state["b"], torch.ones(2, 2))


def test_failed_in_place_load_names_the_touched_components(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    model, _ = make_model()
    path = coord.save(1, [StateComponent("model", model, SharingPattern.REPLICATED)])
    target = os.path.join(path, "model", "replicated.part-0-of-1.safetensors")
    with open(target, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    fresh, _ = make_model(seed=2)
    with pytest.raises(CorruptCheckpointError, match=r"in-place load: the live tensors of components \['model'\]"):
        coord.load([StateComponent("model", fresh, SharingPattern.REPLICATED)], in_place=True)
    untouched, _ = make_model(seed=2)
    with pytest.raises(CorruptCheckpointError) as err:  # the default load leaves live state alone
        coord.load([StateComponent("model", untouched, SharingPattern.REPLICATED)])
    assert "in-place" not in str(err.value)
    assert same(make_model(seed=2)[0].state_dict(), untouched.state_dict())


def test_a_storage_error_part_way_through_an_in_place_load_names_the_touched_components(tmp_path):
    """EIO after a component was already read in place: the error says live state changed, and where."""
    storage = FaultyStorage()
    coord = CheckpointCoordinator(tmp_path, storage=storage)
    coord.save(1, [StateComponent("a", Box({"x": torch.arange(4.0)}), SharingPattern.GLOBAL),
                   StateComponent("b", Box({"y": torch.arange(3.0)}), SharingPattern.GLOBAL)])
    a, b = Box({"x": torch.zeros(4)}), Box({"y": torch.zeros(3)})
    storage.inject(Fault(op="open_read", match="b/global.safetensors", error=errno.EIO))
    with pytest.raises(CheckpointError) as err:
        coord.load([StateComponent("a", a, SharingPattern.GLOBAL), StateComponent("b", b, SharingPattern.GLOBAL)],
                   in_place=True)
    assert storage.fired, "the fault was reached"
    message = str(err.value)
    assert "Input/output error (injected)" in message and "b/global.safetensors" in message, message
    assert "in-place load: the live tensors of components ['a', 'b'] may already hold bytes from" in message
    assert torch.equal(a.state["x"], torch.arange(4.0)), "a was read in place before the fault"
