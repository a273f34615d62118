"""The core API where users stumble: saving after going back, checks before anything changes, subset loads,
plain dict/tensor components, the RNG component, "resume if there is anything", and steps as digit strings."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    RetentionPolicy,
    SharingPattern,
    StateComponent,
    pin_checkpoint,
    rng_component,
)
from tests.support.workers import Box, make_model, same, snapshot


def _model(width: int = 32, layers: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = [torch.nn.Linear(16, width)]
    for _ in range(layers - 1):
        mods += [torch.nn.ReLU(), torch.nn.Linear(width, width)]
    return torch.nn.Sequential(*mods)


def _save_steps(coord: CheckpointCoordinator, steps, value=lambda s: float(s)) -> None:
    for s in steps:
        coord.save(s, [StateComponent("c", Box({"v": torch.tensor(value(s))}), SharingPattern.GLOBAL)])


# ---- saving after going back -----------------------------------------------------------------------

def test_saving_after_going_back_sets_the_newer_checkpoints_aside(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    _save_steps(coord, [10, 20, 30, 40])
    target = Box({})
    assert coord.load([StateComponent("c", target, SharingPattern.GLOBAL)], checkpoint=20).step == 20
    _save_steps(coord, [30], value=lambda s: -1.0)  # a step that exists, newer than the one loaded: no error
    assert [r.step for r in coord.checkpoints()] == [10, 20, 30]
    aside = tmp_path / "abandoned" / "after-step-20-saved-30"
    assert sorted(os.listdir(aside)) == ["checkpoint-00000030", "checkpoint-00000040"]
    latest = Box({})
    assert coord.load([StateComponent("c", latest, SharingPattern.GLOBAL)]).step == 30
    assert latest.state["v"].item() == -1.0, "latest is the new timeline's step 30, never the abandoned one"
    _save_steps(coord, [40])  # the next save is in the new timeline: nothing more is set aside
    assert sorted(os.listdir(tmp_path / "abandoned")) == ["after-step-20-saved-30"]


def test_a_save_after_going_back_below_the_newest_still_sets_it_aside(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    _save_steps(coord, [10, 20, 30])
    coord.load([StateComponent("c", Box({}), SharingPattern.GLOBAL)], checkpoint=10)
    _save_steps(coord, [15])  # 20 and 30 would otherwise stay "latest" over this run's own saves
    assert [r.step for r in coord.checkpoints()] == [10, 15]


def test_loading_the_latest_sets_nothing_aside(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    _save_steps(coord, [10, 20])
    coord.load([StateComponent("c", Box({}), SharingPattern.GLOBAL)])
    _save_steps(coord, [30])
    assert [r.step for r in coord.checkpoints()] == [10, 20, 30] and not (tmp_path / "abandoned").exists()
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        _save_steps(coord, [30])  # the same step again, without going back, is still refused


def test_loading_another_runs_checkpoint_sets_nothing_aside_here(tmp_path):
    other = CheckpointCoordinator(tmp_path / "base")
    _save_steps(other, [5])
    coord = CheckpointCoordinator(tmp_path / "run")
    _save_steps(coord, [10, 20])
    coord.load([StateComponent("c", Box({}), SharingPattern.GLOBAL)], checkpoint=str(tmp_path / "base" /
                                                                                      "checkpoint-00000005"))
    _save_steps(coord, [30])  # weights from elsewhere are not a step back in this run's timeline
    assert [r.step for r in coord.checkpoints()] == [10, 20, 30]


def test_retention_removes_abandoned_checkpoints_unless_pinned(tmp_path):
    coord = CheckpointCoordinator(tmp_path, retention=RetentionPolicy(save_total_limit=3))
    _save_steps(coord, [10, 20, 30, 40])
    coord.load([StateComponent("c", Box({}), SharingPattern.GLOBAL)], checkpoint=20)
    pin_checkpoint(coord.storage, str(tmp_path / "checkpoint-00000040"))
    _save_steps(coord, [25])
    aside = tmp_path / "abandoned" / "after-step-20-saved-25"
    assert sorted(os.listdir(aside)) == ["checkpoint-00000040"], "30 removed by retention; the pinned 40 kept"
    assert [r.step for r in coord.checkpoints()] == [20, 25], "abandoned ones never count as the newest"
    best = CheckpointCoordinator(tmp_path, read_only=True, retention=RetentionPolicy(
        preserve_n_best=2, best_model_metric="eval_loss"))
    assert all("abandoned" not in b.path for b in best.best())


# ---- checks before anything changes ---------------------------------------------------------------

def test_a_changed_model_is_refused_before_any_of_it_changes(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    saved = _model(width=32, layers=2)
    coord.save(1, [StateComponent("model", saved, SharingPattern.REPLICATED),
                   StateComponent("extra", Box({"n": torch.zeros(3)}), SharingPattern.GLOBAL)])
    for in_place in (False, True):
        wider = _model(width=64, layers=3, seed=5)
        before = snapshot(wider)
        extra = Box({"n": torch.ones(3)})
        with pytest.raises(CheckpointError) as err:
            coord.load([StateComponent("extra", extra, SharingPattern.GLOBAL),
                        StateComponent("model", wider, SharingPattern.REPLICATED)], in_place=in_place)
        assert same(before, wider.state_dict()), "the live model was not partly overwritten"
        assert torch.equal(extra.state["n"], torch.ones(3)), "no other component was applied either"
        text = str(err.value)
        assert "refused before anything was changed" in text
        assert "tensor '0.weight' is F32 [32, 16] in the checkpoint, F32 [64, 16] in the live state" in text
        assert "tensor '4.weight' is in the live state but not in the checkpoint" in text
        assert text.count("component 'model'") == 6 and "difference(s)" in text


def test_many_differences_are_listed_ten_then_counted(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    coord.save(1, [StateComponent("d", {f"t{i:02d}": torch.zeros(2) for i in range(25)}, SharingPattern.GLOBAL)])
    live = {f"t{i:02d}": torch.zeros(3) for i in range(25)}
    with pytest.raises(CheckpointError, match=r"25 difference\(s\).*and 15 more difference") as err:
        coord.load([StateComponent("d", live, SharingPattern.GLOBAL)])
    assert str(err.value).count("in the checkpoint, F32 [3]") == 10


def test_non_strict_lists_missing_and_unexpected_keys_per_component(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    coord.save(1, [StateComponent("model", _model(layers=1), SharingPattern.REPLICATED),
                   StateComponent("d", {"a": torch.ones(2), "old": torch.ones(1)}, SharingPattern.GLOBAL)])
    deeper = _model(layers=2, seed=3)
    head = deeper[2].weight.detach().clone()
    live = {"a": torch.zeros(2), "new": torch.zeros(1)}
    result = coord.load([StateComponent("model", deeper, SharingPattern.REPLICATED),
                         StateComponent("d", live, SharingPattern.GLOBAL)], strict=False)
    assert result.missing_keys == {"d": ("new",), "model": ("2.bias", "2.weight")}
    assert result.unexpected_keys == {"d": ("old",)}
    assert torch.equal(deeper[2].weight, head) and torch.equal(deeper[0].weight, _model(layers=1)[0].weight)
    assert torch.equal(live["a"], torch.ones(2))
    with pytest.raises(CheckpointError, match="F32 \\[32, 16\\] in the checkpoint"):  # shapes still must match
        coord.load([StateComponent("model", _model(width=8), SharingPattern.REPLICATED)], strict=False)


def test_an_optimizer_is_checked_against_its_parameters(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    _, opt = make_model()
    coord.save(1, [StateComponent("optimizer", opt, SharingPattern.REPLICATED)])
    other = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    fresh = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match=r"optimizer state 'state/0/exp_avg' is \[32, 16\] in the checkpoint; "
                                              r"live parameter 0 is \[64, 16\]"):
        coord.load([StateComponent("optimizer", fresh, SharingPattern.REPLICATED)])
    assert fresh.state_dict()["state"] == {}
    _, same_shape = make_model(seed=3)
    coord.load([StateComponent("optimizer", same_shape, SharingPattern.REPLICATED)])
    assert same(snapshot(opt), same_shape.state_dict())


# ---- loading a subset ------------------------------------------------------------------------------

def test_an_evaluation_load_takes_only_the_model_and_stays_strict_for_it(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    model, opt = make_model()
    coord.save(1, [StateComponent("model", model, SharingPattern.REPLICATED),
                   StateComponent("optimizer", opt, SharingPattern.REPLICATED),
                   StateComponent("rng", Box({"s": 1}), SharingPattern.PER_RANK)])
    evaluator, _ = make_model(seed=9)
    result = coord.load([StateComponent("model", evaluator, SharingPattern.REPLICATED)])
    assert result.loaded == ("model",) and result.not_requested == ("optimizer", "rng")
    assert same(snapshot(model), evaluator.state_dict())
    with pytest.raises(CheckpointError, match=r"'0.weight' is F32 \[32, 16\] in the checkpoint"):
        coord.load([StateComponent("model", _model(width=4), SharingPattern.REPLICATED)])


# ---- plain state -----------------------------------------------------------------------------------

def test_a_plain_dict_loads_in_place_and_a_tensor_by_copy(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    state = {"w": torch.arange(4.0), "step": 7, "nested": {"m": torch.ones(2, 2), "name": "a"}}
    counter = torch.tensor([5, 6])
    coord.save(1, [StateComponent("d", state, SharingPattern.GLOBAL), StateComponent("t", counter, SharingPattern.GLOBAL)])
    live = {"w": torch.zeros(4), "step": 0, "nested": {"m": torch.zeros(2, 2), "name": "b"}}
    w, m, t = live["w"], live["nested"]["m"], torch.zeros(2, dtype=torch.int64)
    coord.load([StateComponent("d", live, SharingPattern.GLOBAL), StateComponent("t", t, SharingPattern.GLOBAL)])
    assert live["w"] is w and torch.equal(w, torch.arange(4.0)), "tensors are copied into the existing ones"
    assert live["nested"]["m"] is m and torch.equal(m, torch.ones(2, 2))
    assert live["step"] == 7 and live["nested"]["name"] == "a", "other values are replaced"
    assert torch.equal(t, counter)
    with pytest.raises(CheckpointError, match="tensor 'tensor' is I64 \\[2\\] in the checkpoint, I64 \\[3\\]"):
        coord.load([StateComponent("t", torch.zeros(3, dtype=torch.int64), SharingPattern.GLOBAL)], strict=False)


def test_the_rng_component_restores_every_generator(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    coord.save(1, [rng_component()])
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    coord.load([rng_component()])
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected
    assert rng_component().sharing_pattern is SharingPattern.PER_RANK


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_rng_component_restores_cuda_generators_and_tensors_load_into_the_device(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    torch.cuda.init()
    torch.cuda.manual_seed_all(1)
    on_gpu = torch.arange(4.0, device="cuda")
    coord.save(1, [rng_component(), StateComponent("t", on_gpu, SharingPattern.GLOBAL)])
    expected = torch.rand(3, device="cuda").tolist()
    torch.cuda.manual_seed_all(2)
    target = torch.zeros(4, device="cuda")
    coord.load([rng_component(), StateComponent("t", target, SharingPattern.GLOBAL)])
    assert torch.rand(3, device="cuda").tolist() == expected
    assert target.device.type == "cuda" and torch.equal(target.cpu(), torch.arange(4.0))


def _loader() -> torch.utils.data.DataLoader:
    # shuffle=True: a RandomSampler, which (like a StatefulDataLoader's) draws from torch's global generator
    # when an iterator is made and started.
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(32)), batch_size=8, shuffle=True)


def _resume(coord: CheckpointCoordinator, restore_rng_first: bool) -> tuple[list, list]:
    """A resumed job: seed, restore the RNG before or after making the data iterator, then take the batch
    after the saved position and the training step's next draw."""
    torch.manual_seed(0)
    if restore_rng_first:
        coord.load([rng_component()])
    batches = iter(_loader())
    next(batches)  # back at the saved position (a StatefulDataLoader restores it from its own state)
    if not restore_rng_first:
        coord.load([rng_component()])
    return next(batches)[0].tolist(), torch.rand(2).tolist()


def test_restore_the_rng_after_building_the_data_iterator(tmp_path):
    """The user guide's ordering pitfall: restoring the RNG and then building the iterator shifts the stream."""
    coord = CheckpointCoordinator(tmp_path)
    torch.manual_seed(0)
    batches = iter(_loader())
    next(batches)
    coord.save(1, [rng_component()])
    uninterrupted = (next(batches)[0].tolist(), torch.rand(2).tolist())
    assert _resume(coord, restore_rng_first=False) == uninterrupted, "iterator first, then the RNG: bit-exact"
    wrong = _resume(coord, restore_rng_first=True)
    assert wrong[0] != uninterrupted[0] and wrong[1] != uninterrupted[1], "RNG first: another order, other draws"


# ---- resume if there is anything; steps as digit strings; paths -------------------------------------

def test_missing_ok_loads_nothing_in_an_empty_run_dir(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    live = Box({"keep": 1})
    result = coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], missing_ok=True)
    assert not result.found and result.path is None and result.loaded == () and live.state == {"keep": 1}
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        coord.load([StateComponent("c", live, SharingPattern.GLOBAL)])
    with pytest.raises(ValueError, match="missing_ok applies to checkpoint='latest' only"):
        coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], checkpoint=3, missing_ok=True)
    _save_steps(coord, [3])
    assert coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], missing_ok=True).found


def test_a_step_as_a_digit_string_is_that_step(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    _save_steps(coord, [4, 40])
    live = Box({})
    assert coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], checkpoint="4").step == 4
    assert live.state["v"].item() == 4.0
    with pytest.raises(CheckpointNotFoundError, match=r"no committed checkpoint for step 5 .* committed steps: \[4, 40\]"):
        coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], checkpoint="5")


def test_a_missing_path_and_a_manifest_file_are_named_as_such(tmp_path):
    coord = CheckpointCoordinator(tmp_path)
    _save_steps(coord, [4])
    comps = [StateComponent("c", Box({}), SharingPattern.GLOBAL)]
    with pytest.raises(CheckpointNotFoundError, match=r"/nowhere/at-all does not exist"):
        coord.load(comps, checkpoint="/nowhere/at-all")
    manifest = os.path.join(tmp_path, "checkpoint-00000004", "checkpoint_manifest.json")
    with pytest.raises(CheckpointNotFoundError, match="is a checkpoint's manifest file; pass the checkpoint's folder"):
        coord.load(comps, checkpoint=manifest)


def test_a_damaged_newest_checkpoint_is_refused_as_latest_naming_the_way_past_it(tmp_path):
    """`ckpt ls` marks it DAMAGED; a load of "latest" refuses it saying how to pass over it; fallback=True loads
    the step before, and the next save there sets the damaged one aside with the rest of its timeline."""
    coord = CheckpointCoordinator(tmp_path)
    _save_steps(coord, [10, 20])
    (tmp_path / "checkpoint-00000020" / "checkpoint_manifest.json").write_text("{not json")
    live = Box({"v": torch.tensor(-1.0)})
    with pytest.raises(CheckpointError, match=r"checkpoint-00000020.*is not valid JSON.*newest checkpoint of its run "
                                              r"dir.*fallback=True") as err:
        coord.load([StateComponent("c", live, SharingPattern.GLOBAL)])
    assert live.state["v"].item() == -1.0 and err.value.failures == {0: err.value.failures[0]}
    with pytest.raises(CheckpointError) as named:  # asked for by number: refused, without the advice for latest
        coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], checkpoint=20)
    assert "is not valid JSON" in str(named.value) and "fallback=True" not in str(named.value)
    result = coord.load([StateComponent("c", live, SharingPattern.GLOBAL)], fallback=True)
    assert result.step == 10 and live.state["v"].item() == 10.0
    assert result.fallback_from == (str(tmp_path / "checkpoint-00000020"),)
    _save_steps(coord, [20], value=lambda s: 21.0)
    assert [r.step for r in coord.checkpoints()] == [10, 20]
    assert os.listdir(tmp_path / "abandoned" / "after-step-10-saved-20") == ["checkpoint-00000020"]
    assert coord.load([StateComponent("c", live, SharingPattern.GLOBAL)]).step == 20 and live.state["v"].item() == 21.0
