"""A rank that dies in any phase of a save, commit included, is named by every survivor: by its arrival
record when it never reached the phase, by its process being gone when it died inside the exchange."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest
import torch

from ckpt import CheckpointCoordinator, StateComponent
from ckpt.testing import SIGKILL, Fault, FaultyStorage
from tests.support.distributed import failures, run_ranks
from tests.support.workers import model_and_rng


def _components(rank: int) -> list[StateComponent]:
    return model_and_rng({f"w{i}": torch.ones(64) * i for i in range(4)}, {"seed": torch.tensor([rank])})


def _die_inside_the_commit_exchange(rank: int, world: int, run_dir: str, victim: int) -> dict:
    # Rank 0 takes 3 s over its commit, so the victim is surely waiting in the 'commit' exchange (having recorded
    # its arrival there) when it is killed: its arrival record cannot name it; only its dead process can.
    storage = FaultyStorage(faults=[Fault(op="rename", match=".partial -> ", rank=0, error="sleep:3")])
    coord = CheckpointCoordinator(run_dir, timeout=60, storage=storage)
    if rank == victim:
        real = coord.comm._exchange  # the one place every exchange starts (after recording the arrival)

        @contextlib.contextmanager
        def exchange(phase: str):
            with real(phase) as stats:
                if phase == "commit":
                    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
                yield stats

        coord.comm._exchange = exchange
    coord.save(1, _components(rank))
    return {}


def _die_before_the_commit_exchange(rank: int, world: int, run_dir: str) -> dict:
    storage = FaultyStorage(faults=[Fault(op="rename", match=".partial -> ", rank=0, error=SIGKILL)])
    coord = CheckpointCoordinator(run_dir, timeout=60, storage=storage)
    coord.save(1, _components(rank))
    return {}


def _check(results: list, victim: int) -> None:
    bad = failures(results)
    assert sorted(bad) == list(range(len(results))), results
    assert bad[victim].type_name == "RankDied", bad[victim]
    for rank, failure in bad.items():
        if rank == victim:
            continue
        assert f"rank {victim}" in failure.message and "'commit'" in failure.message, (rank, failure.message)
        assert "a rank on another host" not in failure.message, (rank, failure.message)


def test_a_rank_killed_inside_the_commit_exchange_is_named_by_every_survivor(tmp_path):
    _check(run_ranks(4, _die_inside_the_commit_exchange, str(tmp_path), 1, timeout=150), victim=1)


@pytest.mark.slow  # the 2-rank case runs in CI (test_reliability_kill.py, "before the rename")
def test_rank_zero_killed_in_its_commit_is_named_by_every_survivor(tmp_path):
    _check(run_ranks(4, _die_before_the_commit_exchange, str(tmp_path), timeout=150), victim=0)
