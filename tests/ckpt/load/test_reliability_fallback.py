"""load(fallback=True): a bit-rotten latest checkpoint no longer makes every restart fail. When the newest
committed checkpoint fails verification on any rank, every rank passes it over (with a warning naming the
bad file) and loads the next newest that verifies; nothing of a failed checkpoint is applied."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from ckpt import CheckpointCoordinator, CorruptCheckpointError, ManifestError, SharingPattern, StateComponent
from ckpt.format.layout import MANIFEST_NAME
from ckpt.format.manifest_read import read_manifest
from tests.support.distributed import expect_ok, run_ranks
from tests.support.files import flip_last_byte
from tests.support.workers import Box, model_and_rng

STEPS = (10, 20, 30)


def _components(rank: int, step: int) -> list[StateComponent]:
    return model_and_rng({"w": torch.full((64,), float(step))}, {"seed": torch.tensor([rank, step])})


def _empty() -> list[StateComponent]:
    return [StateComponent("model", Box({"untouched": torch.zeros(1)}), SharingPattern.REPLICATED),
            StateComponent("rng", Box({"untouched": torch.zeros(1)}), SharingPattern.PER_RANK)]


def _values(comps: list[StateComponent]) -> dict:
    return {c.key: {k: v.tolist() for k, v in c.stateful.state.items()} for c in comps}


def _tensor_file(ckpt_dir: str, key: str, owner: int | None) -> str:
    entry = read_manifest(ckpt_dir).components[key]
    return os.path.join(ckpt_dir, next(f.path for f in entry.files_for(owner) if f.kind == "tensors"))


def test_a_flipped_byte_in_the_latest_falls_back_to_the_one_before(tmp_path, caplog):
    with CheckpointCoordinator(tmp_path) as coord:
        paths = {step: coord.save(step, _components(0, step)) for step in STEPS}
    bad_file = _tensor_file(paths[30], "model", None)
    flip_last_byte(bad_file)
    comps = _empty()
    with CheckpointCoordinator(tmp_path) as coord:
        with pytest.raises(CorruptCheckpointError, match="does not match its digest"):
            coord.load(comps)  # without the opt-in, a damaged latest fails the load, as before
        assert _values(comps)["model"] == {"untouched": [0.0]}
        with caplog.at_level(logging.WARNING, logger="ckpt"):
            result = coord.load(comps, fallback=True)
        assert coord.resumed_from == paths[20], "retention protects the checkpoint actually loaded"
    assert (result.path, result.step, result.fallback_from) == (paths[20], 20, (paths[30],))
    assert _values(comps) == {"model": {"w": [20.0] * 64}, "rng": {"seed": [0, 20]}}
    warning = next(r.getMessage() for r in caplog.records if "fallback=True" in r.getMessage())
    assert f"checkpoint {paths[30]} failed verification" in warning and bad_file in warning, warning
    assert f"loading the next newest, {paths[20]}" in warning, warning


def test_fallback_passes_over_a_damaged_manifest_and_fails_clearly_when_nothing_verifies(tmp_path):
    with CheckpointCoordinator(tmp_path) as coord:
        paths = {step: coord.save(step, _components(0, step)) for step in STEPS}
    flip_last_byte(_tensor_file(paths[30], "rng", 0))
    with open(os.path.join(paths[20], MANIFEST_NAME), "a") as f:
        f.write("garbage")  # the manifest of step 20 is no longer valid JSON
    comps = _empty()
    with CheckpointCoordinator(tmp_path) as coord:
        result = coord.load(comps, fallback=True)
        assert (result.step, result.fallback_from) == (10, (paths[30], paths[20]))
        assert _values(comps) == {"model": {"w": [10.0] * 64}, "rng": {"seed": [0, 10]}}
        flip_last_byte(_tensor_file(paths[10], "model", None))
        comps = _empty()
        with pytest.raises(CorruptCheckpointError, match=r"all 3 committed checkpoints in .* failed verification") as err:
            coord.load(comps, fallback=True)
        assert all(paths[s] in str(err.value) for s in STEPS), err.value
        assert _values(comps)["model"] == {"untouched": [0.0]}, "nothing of a failed checkpoint is applied"
        with pytest.raises(ManifestError):  # a checkpoint asked for by step is loaded as asked, or not at all
            coord.load(comps, checkpoint=20)


@pytest.mark.parametrize("kwargs,match", [
    ({"checkpoint": 10}, "fallback applies to checkpoint='latest' only"),
    ({"in_place": True}, r"in_place=True, fallback=True"),
])
def test_fallback_is_refused_where_it_cannot_keep_its_promise(tmp_path, kwargs, match):
    with CheckpointCoordinator(tmp_path) as coord:
        coord.save(10, _components(0, 10))
        with pytest.raises(ValueError, match=match):
            coord.load(_empty(), fallback=True, **kwargs)


def _load_with_fallback(rank: int, world: int, run_dir: str) -> dict:
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        paths = {step: coord.save(step, _components(rank, step)) for step in STEPS}
        if rank == 0:  # rot in a file only rank 1 reads: rank 0 alone would find step 30 fine
            flip_last_byte(_tensor_file(paths[30], "rng", 1))
        coord.load([], strict=False)  # a barrier: the damage is on disk before anyone loads
        comps = _empty()
        result = coord.load(comps, fallback=True)
    return {"step": result.step, "fallback_from": list(result.fallback_from), "values": _values(comps),
            "bad": paths[30]}


def test_two_ranks_agree_to_fall_back_when_one_finds_damage(tmp_path):
    for rank, res in enumerate(expect_ok(run_ranks(2, _load_with_fallback, str(tmp_path)))):
        assert res["step"] == 20 and res["fallback_from"] == [res["bad"]], res
        assert res["values"] == {"model": {"w": [20.0] * 64}, "rng": {"seed": [rank, 20]}}, res
