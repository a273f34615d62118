"""A rank killed with SIGKILL at each phase of a save: no committed checkpoint is incomplete, `latest` is
the last complete one, the survivors get an error instead of hanging, the next save cleans up and
succeeds, and retention never loses a checkpoint it should keep."""

from __future__ import annotations

import os

import pytest
import torch

from ckpt import CheckpointCoordinator, RetentionPolicy, SharingPattern, StateComponent, list_checkpoints
from ckpt.cli.inspection import open_checkpoint, verify
from ckpt.format.layout import is_partial_name
from ckpt.io.storage import LocalStorage
from ckpt.testing import SIGKILL, Fault, FaultyStorage
from tests.support.distributed import failures, run_ranks
from tests.support.workers import Box, model_and_rng

KEEP = 2  # save_total_limit: saving step 30 deletes step 10


def _model(step: int) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((256,), float(step * 10 + i)) for i in range(4)}


def _components(rank: int, step: int) -> list[StateComponent]:
    return model_and_rng(_model(step), {"seed": torch.tensor([rank, step])})


# phase -> (the fault that kills a rank there, the rank it kills, the steps committed afterwards)
PHASES = {
    "writing tensors": (Fault(op="write_file", match=".safetensors", rank=1, error=SIGKILL), 1, [10, 20]),
    "after its files, before the barrier": (Fault(op="fsync_dir", match=".partial/rng", rank=1, error=SIGKILL), 1,
                                            [10, 20]),
    "writing the manifest": (Fault(op="write_file", match="manifest.json.tmp", rank=0, error=SIGKILL), 0, [10, 20]),
    "before the rename": (Fault(op="rename", match=".partial -> ", rank=0, error=SIGKILL), 0, [10, 20]),
    "after the rename": (Fault(op="rename", match=".partial -> ", rank=0, error=SIGKILL, when="after"), 0,
                         [10, 20, 30]),
    "uncommitting for retention": (Fault(op="rename", match=".deleting.partial", rank=0, error=SIGKILL), 0,
                                   [10, 20, 30]),
    "removing for retention": (Fault(op="remove_tree", match=".deleting.partial", rank=0, error=SIGKILL, after=1),
                               0, [20, 30]),
    # An overwrite=True save of step 20 moves the old copy aside, then renames the new one into place; killed
    # between the two, the next coordinator of the run dir puts the old copy back (see docs/reliability.md).
    "between the renames of an overwrite": (Fault(op="rename", match=".replaced.partial", rank=0, error=SIGKILL,
                                                  when="after"), 0, [10, 20]),
}
CI_PHASES = {"writing tensors", "removing for retention", "between the renames of an overwrite"}
OVERWRITE_PHASES = {"between the renames of an overwrite"}  # these save step 20 again, with overwrite=True


def _save_until_killed(rank: int, world: int, run_dir: str, fault: Fault, overwrite: bool = False) -> dict:
    storage = FaultyStorage()
    coord = CheckpointCoordinator(run_dir, timeout=30, storage=storage,
                                  retention=RetentionPolicy(save_total_limit=KEEP))
    for step in (10, 20):
        coord.save(step, _components(rank, step))
    storage.inject(fault)
    step = 20 if overwrite else 30
    coord.save(step, _components(rank, step), overwrite=overwrite)  # one rank dies in here; the other must raise
    return {"fired": storage.fired}


def _check_committed(run_dir: str, steps: list[int]) -> None:
    """Every committed checkpoint is complete: each file matches the manifest, and the model loads exactly."""
    for ref in list_checkpoints(LocalStorage(), run_dir):
        report = verify(open_checkpoint(ref.path))
        assert report["ok"], report
        target = Box({})
        with CheckpointCoordinator(run_dir) as coord:
            coord.load([StateComponent("model", target, SharingPattern.REPLICATED)], checkpoint=ref.step,
                       strict=False)
        assert all(torch.equal(target.state[k], v) for k, v in _model(ref.step).items())
    assert [r.step for r in list_checkpoints(LocalStorage(), run_dir)] == steps


@pytest.mark.parametrize("phase", [pytest.param(p, marks=() if p in CI_PHASES else pytest.mark.slow) for p in PHASES])
def test_sigkill_at_each_phase_of_a_save(tmp_path, phase):
    fault, victim, committed = PHASES[phase]
    run_dir = str(tmp_path)
    results = run_ranks(2, _save_until_killed, run_dir, fault, phase in OVERWRITE_PHASES, timeout=120)
    bad = failures(results)
    assert sorted(bad) == [0, 1], results
    assert bad[victim].type_name == "RankDied" and "SIGKILL" in bad[victim].message
    survivor = bad[1 - victim]
    assert survivor.type_name in ("CheckpointError", "CollectiveTimeoutError"), survivor
    assert f"rank {victim}" in survivor.message, survivor.message

    # No committed checkpoint is incomplete; the newest complete one is what `latest` finds.
    _check_committed(run_dir, committed)
    # A new job (here one process) resumes, and its first save cleans up and succeeds.
    with CheckpointCoordinator(run_dir, retention=RetentionPolicy(save_total_limit=KEEP)) as coord:
        assert coord.latest().step == committed[-1]
        coord.save(40, [StateComponent("model", Box(_model(40)), SharingPattern.REPLICATED)])
        kept = [r.step for r in coord.checkpoints()]
    assert not [n for n in os.listdir(run_dir) if is_partial_name(n)], os.listdir(run_dir)
    # Retention kept the newest KEEP: nothing it should keep was lost to the crash.
    assert kept == [committed[-1], 40]
    _check_committed(run_dir, kept)
