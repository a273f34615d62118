"""The core API across real ranks: one refusal on every rank before anything changes, every affected component
in one message, saving after going back, and async save handles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    SharingPattern,
    StateComponent,
    rng_component,
)
from ckpt.io.storage import LocalStorage
from tests.support.distributed import expect_ok, run_ranks
from tests.support.files import REPO
from tests.support.workers import Box, same, snapshot


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(width)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Linear(width, 4))


def _changed_on_one_rank(rank: int, world: int, run_dir: str, in_place: bool) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    coord.save(1, [StateComponent("model", _model(16), SharingPattern.REPLICATED),
                   StateComponent("data", {"pos": torch.tensor([rank])}, SharingPattern.PER_RANK)])
    live = _model(32 if rank == world - 1 else 16)  # the last rank built a wider model
    with torch.no_grad():
        for p in live.parameters():
            p.fill_(-1.0)
    before, data = snapshot(live), {"pos": torch.tensor([-1])}
    try:
        coord.load([StateComponent("data", data, SharingPattern.PER_RANK),
                    StateComponent("model", live, SharingPattern.REPLICATED)], in_place=in_place)
    except CheckpointError as exc:
        error = str(exc)
    else:
        error = None
    return {"error": error, "untouched": same(before, live.state_dict()) and data["pos"].item() == -1}


@pytest.mark.parametrize("world,in_place", [(2, False), (4, True)])
def test_a_model_changed_on_one_rank_is_refused_on_every_rank_before_any_applies(tmp_path, world, in_place):
    results = expect_ok(run_ranks(world, _changed_on_one_rank, str(tmp_path), in_place))
    assert len({r["error"] for r in results}) == 1, "the same error, raised once on every rank"
    error = results[0]["error"]
    assert error is not None and "refused before anything was changed" in error
    assert f"tensor '0.weight' is F32 [16, 8] in the checkpoint, F32 [32, 8] in the live state (rank {world - 1})" in error
    assert all(r["untouched"] for r in results), "no rank applied anything, not even the ranks that matched"


def _save_layout(rank: int, world: int, run_dir: str) -> None:
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        coord.save(1, [StateComponent("model", Box({"w": torch.ones(3)}), SharingPattern.REPLICATED),
                       StateComponent("rng", Box({"r": rank}), SharingPattern.PER_RANK),
                       StateComponent("sampler", Box({"i": rank}), SharingPattern.PER_RANK),
                       StateComponent("cache", Box({"n": rank // 2}), SharingPattern.PER_NODE)])


def _load_layout(rank: int, world: int, run_dir: str) -> str:
    with CheckpointCoordinator(run_dir, timeout=60) as coord:
        try:
            coord.load([StateComponent("model", Box({}), SharingPattern.REPLICATED),
                        StateComponent("rng", Box({}), SharingPattern.PER_RANK),
                        StateComponent("sampler", Box({}), SharingPattern.PER_RANK),
                        StateComponent("cache", Box({}), SharingPattern.PER_NODE)])
        except CheckpointError as exc:
            return str(exc)
    return "loaded"


def test_a_world_size_change_lists_every_affected_component_in_one_message(tmp_path):
    expect_ok(run_ranks(4, _save_layout, str(tmp_path), env={"LOCAL_WORLD_SIZE": 2}))
    messages = expect_ok(run_ranks(2, _load_layout, str(tmp_path)))
    assert messages[0] == messages[1]
    text = messages[0]
    assert "for components ['cache', 'rng', 'sampler']" in text
    assert "component 'rng' is PER_RANK and was saved by 4 ranks; this job has 2" in text
    assert "component 'sampler' is PER_RANK" in text and "component 'cache' is PER_NODE" in text
    assert text.count("pass reshard=True") == 1, "what to do is said once"


def _go_back(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    for step in (10, 20, 30):
        coord.save(step, [rng_component(), StateComponent("w", torch.full((2,), float(step)), SharingPattern.REPLICATED)])
    w = torch.zeros(2)
    coord.load([rng_component(), StateComponent("w", w, SharingPattern.REPLICATED)], checkpoint="10")
    handle = coord.save(20, [rng_component(), StateComponent("w", w * -1, SharingPattern.REPLICATED)], async_save=True)
    path = handle.wait()
    return {"path": path, "steps": [r.step for r in coord.checkpoints()], "w": w.tolist()}


def test_saving_after_going_back_at_four_ranks(tmp_path):
    results = expect_ok(run_ranks(4, _go_back, str(tmp_path)))
    for r in results:
        assert r["steps"] == [10, 20] and r["w"] == [10.0, 10.0]
        assert r["path"] == os.path.join(tmp_path, "checkpoint-00000020")
    aside = tmp_path / "abandoned" / "after-step-10-saved-20"
    assert sorted(os.listdir(aside)) == ["checkpoint-00000020", "checkpoint-00000030"]


class FailOnRank(LocalStorage):
    def __init__(self, rank: int, fail_rank: int):
        self.rank, self.fail_rank = rank, fail_rank

    def write_file(self, path, chunks):
        if self.rank == self.fail_rank and path.endswith(".safetensors"):
            raise OSError(28, "No space left on device (injected)", path)
        return super().write_file(path, chunks)


def _async_handle(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60, async_save=True)
    comps = [StateComponent("model", {f"w{i}": torch.ones(32, 32) for i in range(4)}, SharingPattern.REPLICATED)]
    ok = coord.save(1, comps)
    first = {"type": type(ok).__name__, "path": ok.wait(), "done": ok.done(), "exception": ok.exception()}
    coord.storage = FailOnRank(rank, fail_rank=1)
    bad = coord.save(2, comps)
    try:
        coord.wait()
    except CheckpointError as exc:
        raised = str(exc)
    else:
        raised = None
    out = {"first": first, "raised": raised, "bad_path": bad.path, "bad_exception": type(bad.exception()).__name__}
    coord.storage = LocalStorage()
    coord.save(3, comps).wait()  # the failure was raised once: the next save goes ahead
    out["steps"] = [r.step for r in coord.checkpoints()]
    coord.storage = FailOnRank(rank, fail_rank=0)
    coord.save(4, comps)  # nobody waits for it: close() raises its failure
    try:
        coord.close()
    except CheckpointError as exc:
        out["at_close"] = str(exc)
    else:
        out["at_close"] = None
    return out


def test_an_async_save_returns_a_handle_and_its_failure_is_raised_on_every_rank(tmp_path):
    for r in expect_ok(run_ranks(2, _async_handle, str(tmp_path))):
        assert r["first"] == {"type": "SaveHandle", "path": os.path.join(tmp_path, "checkpoint-00000001"),
                              "done": True, "exception": None}
        assert "save of step 2 failed on rank 1 during 'write'" in r["raised"]
        assert "No space left on device (injected)" in r["raised"]
        assert r["bad_path"] is None, "a checkpoint that never committed is never named"
        assert r["bad_exception"] == "CheckpointError"
        assert r["steps"] == [1, 3]
        assert r["at_close"] is not None and "save of step 4 failed on rank 0 during 'write'" in r["at_close"]


def test_an_async_failure_nobody_waited_for_is_logged_at_exit(tmp_path):
    script = (
        "import sys, logging, torch; sys.path.insert(0, sys.argv[2]); logging.basicConfig(); "
        "from ckpt import *; "
        "c = CheckpointCoordinator(sys.argv[1], async_save=True); "
        "h = c.save(7, [StateComponent('m', {'x': object()}, SharingPattern.GLOBAL)]); "
        "print('returned', type(h).__name__, h.path)"  # exits without wait() or close()
    )
    repo = REPO
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), repo], capture_output=True, text=True,
                          timeout=120)
    assert "returned SaveHandle None" in done.stdout
    assert "async save of step 7 failed and its error was never raised" in done.stderr


def _default_levels(rank: int, world: int, run_dir: str) -> dict:
    with CheckpointCoordinator(run_dir, timeout=60, process_groups={"dp": torch.distributed.group.WORLD}) as coord:
        path = coord.save(1, [
            StateComponent("model", Box({"w": torch.ones(2)}), SharingPattern.REPLICATED),
            StateComponent("stage", Box({"w": torch.ones(2)}), SharingPattern.PER_GROUP, process_group_name="dp"),
            StateComponent("cache", Box({"w": torch.ones(2)}), SharingPattern.PER_NODE),
            StateComponent("rng", Box({"s": rank}), SharingPattern.PER_RANK)])
    manifest = json.loads(Path(path, "checkpoint_manifest.json").read_text())
    return {k: c["validation_level"] for k, c in manifest["components"].items()}


def test_replica_patterns_default_to_tensor_validation_in_the_manifest(tmp_path):
    levels = expect_ok(run_ranks(2, _default_levels, str(tmp_path)))
    assert levels[0] == levels[1] == {"model": "tensor", "stage": "tensor", "cache": "none", "rng": "none"}
