"""One process, no torch.distributed: every pattern degenerates to a world of one."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    SerializationError,
    SharingPattern,
    StateComponent,
    ValidationLevel,
)
from ckpt.format.serialization import flatten_state, unflatten_state
from tests.support.workers import Box, RNGState, draw, make_model, rich_state, same, snapshot


def test_every_pattern_round_trips_in_one_process(tmp_path):
    model, opt = make_model()
    comps = [
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED, validation_level=ValidationLevel.FULL),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("global", Box(rich_state(1)), SharingPattern.GLOBAL),
        StateComponent("stage", Box(rich_state(2)), SharingPattern.PER_GROUP, process_group_name="dp"),
        StateComponent("cache", Box(rich_state(3)), SharingPattern.PER_NODE),
        StateComponent("dynamic", Box({"pos": 4}), lambda: SharingPattern.GLOBAL),
    ]
    saved = {c.key: snapshot(c.stateful) for c in comps if c.key != "rng"}
    coord = CheckpointCoordinator(tmp_path)
    path = coord.save(7, comps, metrics={"loss": 0.0, "acc": np.float32(0.5), "bad": float("nan")})
    expected_draw = draw()
    fresh_model, fresh_opt = make_model(seed=3)
    targets = [StateComponent("model", fresh_model, SharingPattern.REPLICATED),
               StateComponent("optimizer", fresh_opt, SharingPattern.REPLICATED),
               StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
               *[StateComponent(c.key, Box({}), c.sharing_pattern, process_group_name=c.process_group_name)
                 for c in comps[3:]]]
    result = coord.load(targets, checkpoint=7)
    assert draw() == expected_draw
    assert same(saved["model"], fresh_model.state_dict())
    assert same(saved["optimizer"], fresh_opt.state_dict())
    for c in targets[3:]:
        assert same(saved[c.key], c.stateful.state), c.key
    assert result.step == 7 and result.path == path and result.skipped == ()
    assert result.metrics == {"loss": 0.0, "acc": 0.5, "bad": "nan"}
    with open(os.path.join(path, "checkpoint_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["components"]["dynamic"]["pattern"] == "global"
    assert manifest["components"]["optimizer"]["validation_level"] == "full"
    assert manifest["components"]["rng"]["validation_level"] == "none"


def test_files_are_plain_safetensors_and_msgpack(tmp_path):
    model, _ = make_model()
    path = CheckpointCoordinator(tmp_path).save(1, [StateComponent("model", model, SharingPattern.GLOBAL)])
    loaded = safetensors.torch.load_file(os.path.join(path, "model", "global.safetensors"))
    assert loaded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor)


def test_flatten_keeps_exact_types_and_names_tensors_by_path():
    state = rich_state(5)
    flat = flatten_state(state, "c")
    assert "nested/level/0/deep" in flat.tensors and "tuple/3/0" in flat.tensors
    assert same(unflatten_state(flat.skeleton, flat.tensors, "c"), state)
    slash = flatten_state({"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}}, "c")
    assert sorted(slash.tensors) == ["a/b", "a~1b"]


@pytest.mark.parametrize("value,where", [
    ({"x": {"y": [1, object()]}}, "x/y/1"),
    ({"fn": lambda: 1}, "fn"),
    ({"s": {1, 2}}, "s"),
    ({(1, 2): 3}, ""),
    ({"arr": np.array([object()])}, "arr"),
    ({"sparse": torch.eye(2).to_sparse()}, "sparse"),
])
def test_unstorable_values_name_component_and_key(value, where):
    with pytest.raises(SerializationError) as err:
        flatten_state(value, "comp")
    assert "'comp'" in str(err.value)
    assert err.value.key_path == where


def test_unstorable_state_fails_the_save_and_commits_nothing(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    with pytest.raises(SerializationError, match=r"component 'bad', key 'inner/when'"):
        coord.save(1, [StateComponent("bad", Box({"inner": {"when": object()}}), SharingPattern.GLOBAL)])
    assert os.listdir(tmp_path) == [".ckpt.lock"]  # the run dir's lock, never a checkpoint


def test_state_dict_that_raises_is_named(tmp_path):
    class Broken(Box):
        def state_dict(self):
            raise ValueError("boom")

    with pytest.raises(CheckpointError, match=r"component 'b': state_dict\(\) raised ValueError: boom"):
        CheckpointCoordinator(tmp_path).save(1, [StateComponent("b", Broken({}), SharingPattern.GLOBAL)])


@pytest.mark.parametrize("kwargs,match", [
    ({"key": "../up"}, "key='../up'"),
    ({"key": ""}, "key=''"),
    ({"stateful": object()}, "is neither a dict, a tensor, nor an object with state_dict"),
    ({"sharing_pattern": "global"}, "sharing_pattern='global'"),
    ({"sharing_pattern": SharingPattern.PER_GROUP}, "needs process_group_name"),
    ({"validation_level": ValidationLevel.TENSOR}, "has nothing to compare"),
    ({"required": "yes"}, "required='yes'"),
    ({"process_group_name": 3}, "process_group_name=3 must be a str"),
    # Names at the checkpoint's root: a PINNED folder would pin every checkpoint, a manifest-named one
    # would break every save. Case-insensitive filesystems make `pinned` the same file.
    ({"key": "PINNED"}, "key='PINNED' is the name of a file ckpt keeps at the checkpoint's root"),
    ({"key": "pinned"}, "key='pinned' is the name of a file"),
    ({"key": "checkpoint_manifest.json"}, "key='checkpoint_manifest.json' is the name of a file"),
    ({"key": "checkpoint_manifest.json.tmp"}, "rename the component"),
    ({"key": ".ckpt.lock"}, "not starting with '.'"),
])
def test_bad_components_are_rejected_naming_the_field(kwargs, match):
    args = {"key": "k", "stateful": Box({}), "sharing_pattern": SharingPattern.GLOBAL, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        StateComponent(**args)


def test_duplicate_keys_are_rejected(tmp_path):
    comps = [StateComponent("a", Box({}), SharingPattern.GLOBAL)] * 2
    with pytest.raises(CheckpointError, match=r"\['a'\] are passed more than once"):
        CheckpointCoordinator(tmp_path).save(1, comps)


def test_existing_step_needs_overwrite(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    box = Box({"v": torch.tensor([1.0])})
    comps = [StateComponent("a", box, SharingPattern.GLOBAL)]
    coord.save(3, comps)
    box.state = {"v": torch.tensor([2.0])}
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        coord.save(3, comps)
    coord.save(3, comps, overwrite=True)
    target = Box({})
    coord.load([StateComponent("a", target, SharingPattern.GLOBAL)], checkpoint=3)
    assert target.state["v"].item() == 2.0
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "checkpoint-00000003"]


def test_strict_and_non_strict_loading(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    coord.save(1, [StateComponent("a", Box({"x": 1}), SharingPattern.GLOBAL),
                   StateComponent("b", Box({"y": 2}), SharingPattern.GLOBAL)])
    a, c = Box({}), Box({"untouched": True})
    subset = coord.load([StateComponent("a", Box({}), SharingPattern.GLOBAL)])  # a subset, strict for what it asks
    assert subset.loaded == ("a",) and subset.not_requested == ("b",)
    with pytest.raises(CheckpointError, match="component 'c' is required"):
        coord.load([StateComponent("a", a, SharingPattern.GLOBAL), StateComponent("b", Box({}), SharingPattern.GLOBAL),
                    StateComponent("c", c, SharingPattern.GLOBAL)])
    assert a.state == {}, "a failed load must not apply any component"
    result = coord.load([StateComponent("a", a, SharingPattern.GLOBAL),
                         StateComponent("c", c, SharingPattern.GLOBAL)], strict=False)
    assert result.loaded == ("a",) and result.skipped == ("c",) and result.not_requested == ("b",)
    assert a.state == {"x": 1} and c.state == {"untouched": True}
    result = coord.load([StateComponent("a", a, SharingPattern.GLOBAL), StateComponent("b", Box({}), SharingPattern.GLOBAL),
                         StateComponent("c", c, SharingPattern.GLOBAL, required=False)])
    assert result.skipped == ("c",)


def test_latest_ignores_partial_and_unmanifested_folders(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    comps = [StateComponent("a", Box({"x": 1}), SharingPattern.GLOBAL)]
    coord.save(5, comps)
    (tmp_path / "checkpoint-00000009.partial").mkdir()
    (tmp_path / "checkpoint-00000010").mkdir()  # no manifest: not a checkpoint
    assert coord.latest().step == 5
    assert coord.load(comps).step == 5
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint for step 10"):
        coord.load(comps, checkpoint=10)
    with pytest.raises(CheckpointNotFoundError, match="an unfinished save"):
        coord.load(comps, checkpoint=str(tmp_path / "checkpoint-00000009.partial"))
    coord.save(6, comps)
    assert not (tmp_path / "checkpoint-00000009.partial").exists(), "the next save removes stale partials"
    assert (tmp_path / "checkpoint-00000010").exists(), "folders without a manifest are never touched"


def test_empty_run_dir_has_no_latest(tmp_path):
    coord = CheckpointCoordinator(tmp_path / "new")
    assert coord.latest() is None
    with pytest.raises(CheckpointNotFoundError):
        coord.load([StateComponent("a", Box({}), SharingPattern.GLOBAL)])


def test_truncated_file_is_named(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    model, _ = make_model()
    path = coord.save(1, [StateComponent("model", model, SharingPattern.REPLICATED)])
    target = os.path.join(path, "model", "replicated.part-0-of-1.safetensors")
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) - 10)
    with pytest.raises(CheckpointError, match=r"replicated.part-0-of-1.safetensors.*truncated"):
        coord.load([StateComponent("model", model, SharingPattern.REPLICATED)])


def test_a_dominant_tensor_is_split_across_writers_and_reassembled(tmp_path):
    from ckpt.save.planning import MIN_CHUNK_BYTES, balance, split

    sizes = [("embed", 8 * MIN_CHUNK_BYTES, 4), ("small", 1000, 4)]
    bins = balance(split(sizes, 4), 4)
    loads = [sum(((p.stop or 250) - (p.start or 0)) * 4 for p in b) for b in bins]
    assert max(loads) <= 1.01 * sum(loads) / 4, loads
    pieces = sorted((p.start, p.stop) for b in bins for p in b if p.name == "embed")
    assert pieces[0][0] == 0 and pieces[-1][1] == 2 * MIN_CHUNK_BYTES
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    assert [p.start for p, _ in split(sizes, 1)] == [None, None], "one writer: nothing is cut"


def test_unpadded_folder_names_are_not_checkpoints(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    coord.save(5, [StateComponent("a", Box({"x": 1}), SharingPattern.GLOBAL)])
    os.rename(tmp_path / "checkpoint-00000005", tmp_path / "checkpoint-5")
    assert coord.latest() is None
