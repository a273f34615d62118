"""Async saves: the state is captured at the call, written in the background, and failures surface later."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from ckpt import CheckpointCoordinator, CheckpointError, SharingPattern, StateComponent
from ckpt.io.storage import LocalStorage
from tests.support.distributed import expect_ok, run_ranks
from tests.support.files import REPO
from tests.support.workers import Box, make_model, same, snapshot


class GatedStorage(LocalStorage):
    """Holds every file write until `gate` is set, so a test can look at the run dir mid-save."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.writing = threading.Event()

    def write_file(self, path, chunks):
        self.writing.set()
        if not self.gate.wait(timeout=60):
            raise OSError("test gate never opened")
        return super().write_file(path, chunks)


def test_async_save_captures_state_at_the_call(tmp_path):
    storage = GatedStorage()
    coord = CheckpointCoordinator(tmp_path, storage=storage, async_save=True)
    model, opt = make_model()
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("optimizer", opt, SharingPattern.REPLICATED)]
    expected = {c.key: snapshot(c.stateful) for c in comps}
    handle = coord.save(10, comps, metrics={"loss": 1.0})
    assert storage.writing.wait(timeout=60)
    assert coord.latest() is None, "nothing is visible before the commit"
    assert handle.path is None and not handle.done() and handle.exception() is None, "nothing names it yet"
    with torch.no_grad():  # training goes on while the background thread writes
        for p in model.parameters():
            p.add_(1.0)
    storage.gate.set()
    path = handle.wait()
    assert handle.done() and handle.path == path == os.path.join(tmp_path, "checkpoint-00000010")
    assert coord.wait() == path
    assert coord.latest().step == 10
    fresh_model, fresh_opt = make_model(seed=4)
    coord.load([StateComponent("model", fresh_model, SharingPattern.REPLICATED),
                StateComponent("optimizer", fresh_opt, SharingPattern.REPLICATED)])
    assert same(expected["model"], fresh_model.state_dict())
    assert same(expected["optimizer"], fresh_opt.state_dict())


def test_staging_buffers_are_reused_and_saves_queue(tmp_path):
    coord = CheckpointCoordinator(tmp_path, async_save=True)
    box = Box({"w": torch.zeros(64, 64), "b": torch.zeros(64)})
    comps = [StateComponent("model", box, SharingPattern.GLOBAL)]
    coord.save(1, comps)
    buffers = {name: t.data_ptr() for name, t in coord._staging._buffers.items()}
    for step in range(2, 5):  # each save waits for the one before it
        box.state = {"w": torch.full((64, 64), float(step)), "b": torch.zeros(64)}
        coord.save(step, comps)
    assert {name: t.data_ptr() for name, t in coord._staging._buffers.items()} == buffers
    coord.wait()
    assert [r.step for r in coord.checkpoints()] == [1, 2, 3, 4]
    target = Box({})
    coord.load([StateComponent("model", target, SharingPattern.GLOBAL)], checkpoint=3)
    assert torch.equal(target.state["w"], torch.full((64, 64), 3.0))
    box.state = {"w": torch.zeros(8)}  # a tensor that changed shape, and one that went away
    coord.save(5, comps)
    coord.wait()
    assert sorted(name for _, name in coord._staging._buffers) == ["w"]


def test_the_staged_state_of_an_async_save_can_be_taken_and_given_back(tmp_path):
    coord = CheckpointCoordinator(tmp_path, async_save=True)
    box = Box({"w": torch.full((16, 16), 1.0), "meta": {"n": (16, "x")}})
    comps = [StateComponent("model", box, SharingPattern.GLOBAL)]
    coord.save(1, comps)
    staged_w = coord._staging._buffers[("model", "w")]
    states, give_back = coord.take_staged_state()
    assert coord.take_staged_state() is None, "a second call gets nothing"
    held = states["model"]
    assert held["w"].data_ptr() == staged_w.data_ptr(), "the save's own staged copy, not a second one"
    assert torch.equal(held["w"], torch.full((16, 16), 1.0)) and held["meta"] == {"n": (16, "x")}
    assert coord._staging._buffers == {}, "the buffers are the caller's now"
    box.state = {"w": torch.full((16, 16), 2.0), "meta": {"n": (16, "x")}}
    coord.save(2, comps)  # stages into a new buffer: the held copy keeps step 1's values
    assert torch.equal(held["w"], torch.full((16, 16), 1.0))
    assert coord._staging._buffers[("model", "w")].data_ptr() != staged_w.data_ptr()
    coord.take_staged_state()[1]()  # step 2's buffers back into the pool ...
    give_back()  # ... so step 1's find their slot taken and are dropped
    assert coord._staging._buffers[("model", "w")].data_ptr() != staged_w.data_ptr()
    coord.save(3, comps)
    states, give_back = coord.take_staged_state()
    give_back()
    coord.save(4, comps)  # a buffer given back before the next save is staged into again
    assert coord._staging._buffers[("model", "w")].data_ptr() == states["model"]["w"].data_ptr()
    coord.wait()
    coord.save(5, comps, async_save=False)
    assert coord.take_staged_state() is None, "a sync save stages no host copy"
    target = Box({})
    coord.load([StateComponent("model", target, SharingPattern.GLOBAL)], checkpoint=1)
    assert torch.equal(target.state["w"], torch.full((16, 16), 1.0))
    coord.close()


def test_snapshot_failure_surfaces_at_wait(tmp_path):
    class Broken(Box):
        def state_dict(self):
            raise ValueError("boom")

    coord = CheckpointCoordinator(tmp_path, async_save=True)
    coord.save(1, [StateComponent("bad", Broken({}), SharingPattern.GLOBAL)])
    with pytest.raises(CheckpointError, match=r"component 'bad': state_dict\(\) raised ValueError: boom"):
        coord.wait()
    assert coord.wait() is None, "the error is raised once"
    assert os.listdir(tmp_path) == [".ckpt.lock"]  # the run dir's lock, never a checkpoint


class FailOnRank(LocalStorage):
    def __init__(self, rank: int, fail_rank: int):
        self.rank, self.fail_rank = rank, fail_rank

    def write_file(self, path, chunks):
        if self.rank == self.fail_rank and path.endswith(".safetensors"):
            raise OSError(5, "Input/output error (injected)", path)
        return super().write_file(path, chunks)


def _async_failure(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60, async_save=True)
    torch.manual_seed(0)
    comps = [StateComponent("model", Box({f"w{i}": torch.randn(32, 32) for i in range(4)}), SharingPattern.REPLICATED)]
    coord.save(1, comps)
    coord.wait()
    coord.storage = FailOnRank(rank, fail_rank=1)
    coord.save(2, comps)  # returns at once; the failure happens in the background
    try:
        coord.save(3, comps)  # waits for save 2 first, and raises its error on every rank
    except CheckpointError as exc:
        error = {"type": type(exc).__name__, "failures": sorted(exc.failures), "message": str(exc)}
    else:
        error = None
    coord.storage = LocalStorage()
    return {"error": error, "steps": [r.step for r in coord.checkpoints()]}


def test_background_failure_is_raised_on_every_rank_at_the_next_save(tmp_path):
    for res in expect_ok(run_ranks(2, _async_failure, str(tmp_path))):
        assert res["error"]["failures"] == [1], res
        assert "save of step 2 failed on rank 1 during 'write'" in res["error"]["message"]
        assert "Input/output error (injected)" in res["error"]["message"]
        assert res["steps"] == [1]
    assert sorted(os.listdir(tmp_path)) == [".ckpt.lock", "checkpoint-00000001"]


def test_process_exit_waits_for_the_save_in_flight(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); "
        "from ckpt import *; from tests.support.workers import Box; "
        "c = CheckpointCoordinator(sys.argv[1], async_save=True); "
        "c.save(7, [StateComponent('m', Box({'w': torch.ones(2048, 2048)}), SharingPattern.GLOBAL)]); "
        "print('returned', c.latest())"  # exits right after: no wait()
    )
    repo = REPO
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), repo], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "returned None" in done.stdout, "save() returned before the commit"
    coord = CheckpointCoordinator(tmp_path)
    assert coord.latest().step == 7
    target = Box({})
    coord.load([StateComponent("m", target, SharingPattern.GLOBAL)])
    assert torch.equal(target.state["w"], torch.ones(2048, 2048))
