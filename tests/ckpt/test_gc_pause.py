"""Saves and loads hold off the cyclic garbage collector (thousands of tensors made it walk the heap again and
again), and always give it back in the state they found it."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from ckpt.testing import Fault, FaultyStorage


class Probe:
    """A Stateful that records whether the collector was running when the coordinator called it."""

    def __init__(self):
        self.state = {"w": torch.ones(3)}
        self.seen: list[bool] = []

    def state_dict(self):
        self.seen.append(gc.isenabled())
        return self.state

    def load_state_dict(self, state):
        self.seen.append(gc.isenabled())
        self.state = state


@pytest.mark.parametrize("enabled_before", [True, False])
@pytest.mark.parametrize("async_save", [False, True])
def test_the_collector_is_paused_inside_and_restored_after(tmp_path, enabled_before, async_save):
    probe = Probe()
    coord = CheckpointCoordinator(tmp_path)
    (gc.enable if enabled_before else gc.disable)()
    try:
        coord.save(1, [StateComponent("p", probe, SharingPattern.GLOBAL)], async_save=async_save)
        coord.wait()
        assert gc.isenabled() == enabled_before
        coord.load([StateComponent("p", probe, SharingPattern.GLOBAL)])
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()
    # save reads state_dict(); load reads it (the live tensors it fills) and then calls load_state_dict()
    assert probe.seen == [False, False, False] and torch.equal(probe.state["w"], torch.ones(3))


def test_an_async_save_leaves_the_collector_on_while_it_writes(tmp_path):
    storage = FaultyStorage()
    storage.inject(Fault(op="write_file", match=".safetensors", error="sleep:1"))
    coord = CheckpointCoordinator(tmp_path, storage=storage)
    coord.save(1, [StateComponent("p", Probe(), SharingPattern.GLOBAL)], async_save=True)
    while not storage.fired:  # the background write has started, and sleeps in it
        time.sleep(0.01)
    assert gc.isenabled()  # the training thread goes on with its collector
    coord.wait()
    assert gc.isenabled()


def test_a_failing_save_restores_the_collector(tmp_path):
    class Broken(Probe):
        def state_dict(self):
            raise RuntimeError("no state today")

    coord = CheckpointCoordinator(tmp_path)
    with pytest.raises(Exception, match="no state today"):
        coord.save(1, [StateComponent("p", Broken(), SharingPattern.GLOBAL)])
    assert gc.isenabled()
