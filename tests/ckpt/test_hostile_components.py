"""Misbehaving components: a state_dict() that raises, returns what cannot be stored, or differs in keys
across replicas gives a clear error on every rank and commits nothing; a load never half-applies
silently (a failing load_state_dict() is reported with exactly what each rank applied)."""

from __future__ import annotations

import os

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    PartialLoadError,
    SharingPattern,
    StateComponent,
    ValidationLevel,
)
from tests.support.distributed import expect_ok, run_ranks
from tests.support.hostile import make_checkpoint, targets, untouched
from tests.support.workers import Box


class Raising(Box):
    """state_dict() or load_state_dict() raises (on the ranks it is built to)."""

    def __init__(self, state: dict, on_save: bool = False, on_load: bool = False):
        super().__init__(state)
        self.on_save, self.on_load = on_save, on_load

    def state_dict(self) -> dict:
        if self.on_save:
            raise ValueError("boom in state_dict")
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if self.on_load:
            raise RuntimeError("size mismatch for w")
        self.state = state


def _weights(names=("w0", "w1", "w2", "w3")) -> dict:
    return {n: torch.full((16,), float(i)) for i, n in enumerate(names)}


def _scenarios(rank: int) -> list[tuple[str, list[StateComponent]]]:
    other = rank == 1
    return [
        ("state_dict raises on rank 1",
         [StateComponent("model", Raising(_weights(), on_save=other), SharingPattern.REPLICATED)]),
        ("unstorable value on rank 0",
         [StateComponent("data", Box({"sampler": {"when": object()}} if rank == 0 else {}), SharingPattern.GLOBAL)]),
        ("not a dict", [StateComponent("data", Box([1, 2]), SharingPattern.GLOBAL)]),  # type: ignore[arg-type]
        ("extra key on rank 1, TENSOR",
         [StateComponent("model", Box({**_weights(), **({"extra": torch.ones(2)} if other else {})}),
                         SharingPattern.REPLICATED)]),
        ("missing key on rank 1, TENSOR",
         [StateComponent("model", Box(_weights(("w0", "w1", "w2") if other else ("w0", "w1", "w2", "w3"))),
                         SharingPattern.REPLICATED)]),
        # Without validation the plan is the lowest rank's: a writer lacking a tensor it must write fails.
        ("missing key on rank 1, NONE",
         [StateComponent("model", Box(_weights(("w0", "w1", "w2") if other else ("w0", "w1", "w2", "w3"))),
                         SharingPattern.REPLICATED, validation_level=ValidationLevel.NONE)]),
    ]


EXPECTED = {  # scenario -> (error type, failed ranks or None for a ReplicationError, text in the message)
    "state_dict raises on rank 1": ("CheckpointError", [1],
                                    "rank 1: CheckpointError: component 'model': state_dict() raised ValueError: boom"),
    "unstorable value on rank 0": ("SerializationError", [0], "component 'data', key 'sampler/when' holds a builtins.object"),
    "not a dict": ("SerializationError", [0, 1], "state_dict() returned list, not a dict"),
    "extra key on rank 1, TENSOR": ("ReplicationError", None, "'extra' (ranks [1])"),
    "missing key on rank 1, TENSOR": ("ReplicationError", None, "'w3' (ranks [1])"),
    "missing key on rank 1, NONE": ("CheckpointError", [1], "rank 1 was assigned tensors ['w3'] that its state "
                                                            "does not have"),
}


def _misbehave(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    outcomes = {}
    for i, (name, comps) in enumerate(_scenarios(rank)):
        try:
            coord.save(i + 1, comps)
            outcomes[name] = {"type": None}
        except CheckpointError as exc:
            outcomes[name] = {"type": type(exc).__name__, "message": str(exc), "failed": sorted(exc.failures)}
        outcomes[name]["committed"] = [r.step for r in coord.checkpoints()]
    # NONE trusts the replicas: a tensor only rank 1 has is not saved (the lowest rank's keys are the plan).
    extra = {**_weights(), **({"only_on_1": torch.ones(2)} if rank == 1 else {})}
    coord.save(50, [StateComponent("model", Box(extra), SharingPattern.REPLICATED,
                                   validation_level=ValidationLevel.NONE)])
    loaded = Box({})
    coord.load([StateComponent("model", loaded, SharingPattern.REPLICATED)], checkpoint=50)
    # A load whose second component fails to apply on rank 1 only.
    live = [StateComponent("a", Box({"v": "live"}), SharingPattern.GLOBAL),
            StateComponent("b", Raising({"v": "live"}, on_load=rank == 1), SharingPattern.GLOBAL),
            StateComponent("c", Box({"v": "live"}), SharingPattern.GLOBAL)]
    coord.save(60, [StateComponent(k, Box({"v": "saved"}), SharingPattern.GLOBAL) for k in "abc"])
    try:
        coord.load(live, checkpoint=60)
        partial = {"type": None}
    except PartialLoadError as exc:
        partial = {"type": type(exc).__name__, "message": str(exc), "applied": exc.applied,
                   "failed": sorted(exc.failures), "live": [c.stateful.state["v"] for c in live]}
    return {"outcomes": outcomes, "none_keys": sorted(loaded.state), "partial": partial}


def test_misbehaving_components_fail_clearly_on_every_rank(tmp_path):
    results = expect_ok(run_ranks(2, _misbehave, str(tmp_path)))
    for rank, res in enumerate(results):
        for name, (type_name, failed, text) in EXPECTED.items():
            out = res["outcomes"][name]
            assert out["type"] == type_name, (rank, name, out)
            assert text in out["message"], (rank, name, out["message"])
            if failed is not None:
                assert out["failed"] == failed, (rank, name, out)
                assert all(f"rank {r}" in out["message"] for r in failed)
            assert out["committed"] == [], (rank, name, "nothing may be committed")
        assert res["none_keys"] == ["w0", "w1", "w2", "w3"], "with NONE the lowest rank's keys are saved"
        partial = res["partial"]
        assert partial["type"] == "PartialLoadError", partial
        assert partial["applied"] == {0: ("a", "b", "c"), 1: ("a",)} and partial["failed"] == [1]
        assert "rank 1: component 'b': load_state_dict() raised RuntimeError: size mismatch for w" in partial["message"]
        assert "rank 0: ['a', 'b', 'c'] (all)" in partial["message"]
        assert "rank 1: ['a'], then 'b' failed" in partial["message"]
    assert results[0]["partial"]["live"] == ["saved", "saved", "saved"]
    assert results[1]["partial"]["live"] == ["saved", "live", "live"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == [
        "checkpoint-00000050", "checkpoint-00000060"]


def test_a_failing_read_changes_no_component(tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    os.truncate(os.path.join(ckpt_dir, "extra", "global.msgpack"), 3)  # the second component's file
    comps = targets()
    with pytest.raises(CheckpointError, match=r"extra/global\.msgpack"):
        CheckpointCoordinator(tmp_path).load(comps, checkpoint=ckpt_dir)
    assert untouched(comps), "the first component was read fine, but is not applied either"


def test_a_failing_load_state_dict_names_what_was_applied(tmp_path):
    live = [StateComponent("a", Box({"v": "live"}), SharingPattern.GLOBAL),
            StateComponent("b", Raising({"v": "live"}, on_load=True), SharingPattern.GLOBAL),
            StateComponent("c", Box({"v": "live"}), SharingPattern.GLOBAL)]
    with CheckpointCoordinator(tmp_path) as coord:
        coord.save(1, [StateComponent(k, Box({"v": "saved"}), SharingPattern.GLOBAL) for k in "abc"])
        with pytest.raises(PartialLoadError) as err:
            coord.load(live)
    assert err.value.applied == {0: ("a",)} and list(err.value.failures) == [0]
    assert [c.stateful.state["v"] for c in live] == ["saved", "live", "live"]
    assert coord.resumed_from is None, "a failed load is not a resume"
