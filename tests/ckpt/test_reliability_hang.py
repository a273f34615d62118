"""A rank that hangs (or writes too slowly) in a save or load: every other rank gets a timeout error naming
the missing rank(s) within the configured time, instead of waiting for ever."""

from __future__ import annotations

import time

import pytest
import torch

from ckpt import CheckpointCoordinator, StateComponent
from ckpt.testing import Fault, FaultyStorage
from tests.support.distributed import failures, run_ranks
from tests.support.workers import Box, model_and_rng

TIMEOUT = 2  # the coordinator's timeout in these tests
HANG = TIMEOUT + 3  # how long a hung rank stalls: well past the timeout, short enough to keep the test quick


class SlowState(Box):
    """A component whose state_dict() stalls on chosen ranks (a rank stuck before it reaches the save)."""

    def __init__(self, state: dict, stall: float):
        super().__init__(state)
        self.stall = stall

    def state_dict(self) -> dict:
        time.sleep(self.stall)
        return self.state


def _components(rank: int, stall: float = 0.0) -> list[StateComponent]:
    return model_and_rng(SlowState({f"w{i}": torch.ones(32) * i for i in range(4)}, stall), {"s": torch.tensor([rank])})


def _outcome(fn) -> dict:
    started = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "missing": getattr(exc, "missing_ranks", None),
                "phase": getattr(exc, "phase", None), "after": time.monotonic() - started}
    return {"type": None, "after": time.monotonic() - started}


def _hang_in_save(rank: int, world: int, run_dir: str, hung: list[int]) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=TIMEOUT)
    return _outcome(lambda: coord.save(1, _components(rank, HANG if rank in hung else 0.0)))


def _hang_in_load(rank: int, world: int, run_dir: str, hung: list[int]) -> dict:
    storage = FaultyStorage()
    coord = CheckpointCoordinator(run_dir, timeout=TIMEOUT, storage=storage)
    coord.save(1, _components(rank))
    if rank in hung:
        storage.inject(Fault(op="open_read", match=".safetensors", error=f"sleep:{HANG}"))
    return _outcome(lambda: coord.load(_components(rank)))


def _slow_write(rank: int, world: int, run_dir: str, hung: list[int]) -> dict:
    storage = FaultyStorage()
    coord = CheckpointCoordinator(run_dir, timeout=TIMEOUT, storage=storage)
    if rank in hung:
        storage.inject(Fault(op="write_file", match=".safetensors", error=f"sleep:{HANG}"))
    return _outcome(lambda: coord.save(1, _components(rank)))


def _check(results: list, hung: list[int], phase: str) -> None:
    assert not failures(results), results
    for rank, res in enumerate(results):
        # Nobody hangs: even the stalled ranks get an error once they come back.
        assert res["type"] in ("CollectiveTimeoutError", "CheckpointError"), (rank, res)
        if rank in hung:
            continue
        assert res["type"] == "CollectiveTimeoutError", (rank, res)
        assert res["phase"] == phase and list(res["missing"]) == hung, (rank, res)
        names = ("rank " if len(hung) == 1 else "ranks ") + ", ".join(map(str, hung))
        assert f"{names} never reached it" in res["message"] and f"'{phase}' step" in res["message"], res
        # It waited the configured time, and gave up while the hung ranks were still stuck.
        assert TIMEOUT - 0.5 <= res["after"] < HANG, (rank, res)


@pytest.mark.slow  # the load case below covers the same path in CI
def test_a_rank_hung_before_the_save_is_named_by_the_others(tmp_path):
    _check(run_ranks(2, _hang_in_save, str(tmp_path), [1], timeout=90), [1], "prepare")


def test_a_rank_hung_in_a_load_is_named_by_the_others(tmp_path):
    _check(run_ranks(2, _hang_in_load, str(tmp_path), [1], timeout=90), [1], "read")


@pytest.mark.slow
def test_a_slow_write_times_out_naming_the_slow_rank(tmp_path):
    results = run_ranks(2, _slow_write, str(tmp_path), [1], timeout=90)
    _check(results, [1], "write")
    # ... and the file it was stuck writing (the rank notes each file it starts in the store).
    assert "rank 1: 'prepare', then was writing " in results[0]["message"], results[0]
    assert ".safetensors" in results[0]["message"].split("then was writing ", 1)[1], results[0]


@pytest.mark.slow
def test_several_hung_ranks_are_all_named(tmp_path):
    _check(run_ranks(4, _hang_in_save, str(tmp_path), [1, 3], timeout=120), [1, 3], "prepare")


def _after_timeout(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=TIMEOUT)
    first = _outcome(lambda: coord.save(1, _components(rank, HANG if rank == 1 else 0.0)))
    second = _outcome(lambda: coord.save(2, _components(rank)))  # this coordinator's group is out of step now
    return {"first": first, "second": second}


@pytest.mark.slow
def test_after_a_timeout_the_coordinator_refuses_to_pair_collectives_wrongly(tmp_path):
    results = run_ranks(2, _after_timeout, str(tmp_path), timeout=120)
    assert not failures(results), results
    for res in results:
        assert res["second"]["type"] == "CheckpointError", res
        assert "earlier step failed" in res["second"]["message"] and "Restart the job" in res["second"]["message"]
    assert results[0]["second"]["after"] < 1, "refused at once, without waiting for the others"
