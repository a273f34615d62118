"""Failures on one rank become the same error on every rank, and never a committed half checkpoint."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel
from ckpt.io.storage import LocalStorage
from tests.support.distributed import expect_ok, failures, run_ranks
from tests.support.workers import Box


class FailingStorage(LocalStorage):
    """Raises OSError on `rank` when it writes its `after`-th file (0 = the first)."""

    def __init__(self, rank: int, fail_rank: int, after: int):
        self.rank, self.fail_rank, self.after, self.count = rank, fail_rank, after, 0

    def write_file(self, path, chunks):
        if self.rank == self.fail_rank:
            if self.count == self.after:
                raise OSError(28, "No space left on device (injected)", path)
            self.count += 1
        return super().write_file(path, chunks)


def _plain(mismatches: dict) -> dict:
    return {name: list(ranks) for name, ranks in mismatches.items()}


def _replica_state(rank: int, perturb_rank: int | None) -> dict:
    torch.manual_seed(0)
    state = {"layer.weight": torch.randn(8, 8), "layer.bias": torch.randn(8), "step": 3}
    if rank == perturb_rank:
        state["layer.weight"][2, 3] += 1e-6  # one element of one tensor, barely different
    return state


def _perturbed_save(rank: int, world: int, run_dir: str, level: str, perturb_rank: int) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    comp = StateComponent("model", Box(_replica_state(rank, perturb_rank)), SharingPattern.REPLICATED,
                          validation_level=ValidationLevel(level))
    coord.save(step=1, components=[comp])
    return {"committed": [r.step for r in coord.checkpoints()]}


@pytest.mark.parametrize("level", ["quick", "tensor", "full"])
def test_perturbed_replica_raises_on_every_rank(tmp_path, level):
    results = run_ranks(4, _perturbed_save, str(tmp_path), level, 2)
    bad = failures(results)
    assert sorted(bad) == [0, 1, 2, 3], results
    for f in bad.values():
        assert f.type_name == "ReplicationError", f
        assert "model" in f.message and f.attrs["component"] == "model"
        # QUICK finds the difference with one digest, then digests per tensor to name it, as TENSOR does.
        assert _plain(f.attrs["mismatches"]) == {"layer.weight": [2]}, f.attrs
        assert "'layer.weight' (ranks [2])" in f.message and f"validation {level}" in f.message
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path)), os.listdir(tmp_path)


def _disagreeing_settings(rank: int, world: int, run_dir: str, field: str) -> None:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    settings = {"validation_level": ValidationLevel.TENSOR if rank == 0 else ValidationLevel.NONE}
    if field == "required":
        settings = {"required": rank == 0}
    comp = StateComponent("model", Box(_replica_state(rank, None)), SharingPattern.REPLICATED, **settings)
    coord.save(step=1, components=[comp])


@pytest.mark.parametrize("field,values", [("validation_level", ("tensor", "none")), ("required", ("True", "False"))])
def test_ranks_disagreeing_on_a_setting_are_named(tmp_path, field, values):
    bad = failures(run_ranks(2, _disagreeing_settings, str(tmp_path), field))
    assert sorted(bad) == [0, 1]
    for f in bad.values():
        # Not a ReplicationError: the replicas are identical, only the declarations differ.
        assert f.type_name == "CheckpointError", f
        assert (f"component 'model': rank 0 declares {field}={values[0]} but rank 1 declares "
                f"{field}={values[1]}") in f.message
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path))


def _unstorable_on_rank_one(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    state = {"layer": {"weight": torch.ones(2, device="meta" if rank == 1 else "cpu")}}
    comps = [StateComponent("model", Box(state), SharingPattern.PER_RANK)]
    try:
        coord.save(step=1, components=comps)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "failed": sorted(exc.failures),
                "component": exc.component, "key_path": exc.key_path}
    return {"type": None}


def test_unstorable_tensor_on_one_rank_fails_the_prepare_phase_everywhere(tmp_path):
    results = expect_ok(run_ranks(2, _unstorable_on_rank_one, str(tmp_path)))
    for res in results:
        assert res["type"] == "SerializationError", res
        assert "during 'prepare'" in res["message"] and "meta device" in res["message"]
        # The fields travel with the error, so rank 0 (which had nothing wrong) can read them too.
        assert (res["failed"], res["component"], res["key_path"]) == ([1], "model", "layer/weight"), res
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path))


def test_validation_none_lets_a_perturbed_replica_through(tmp_path):
    results = expect_ok(run_ranks(2, _perturbed_save, str(tmp_path), "none", 1))
    assert results[0]["committed"] == [1]


def _per_group_perturbed(rank: int, world: int, run_dir: str) -> None:
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    coord = CheckpointCoordinator(run_dir, process_groups={"dp": groups[rank // 2]}, timeout=60)
    state = _replica_state(rank, perturb_rank=3)
    state["layer.bias"] += rank // 2  # groups differ from each other, which is allowed
    coord.save(step=1, components=[StateComponent("stage", Box(state), SharingPattern.PER_GROUP,
                                                  process_group_name="dp")])


def test_per_group_mismatch_names_group_tensor_and_rank(tmp_path):
    bad = failures(run_ranks(4, _per_group_perturbed, str(tmp_path)))
    assert sorted(bad) == [0, 1, 2, 3]
    for f in bad.values():
        assert f.type_name == "ReplicationError"
        assert _plain(f.attrs["mismatches"]) == {"layer.weight": [3]}
        assert list(f.attrs["replica_ranks"]) == [2, 3]
        assert "process group 'dp'" in f.message


def _save_twice_second_fails(rank: int, world: int, run_dir: str, fail_rank: int) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    torch.manual_seed(0)
    big = {f"w{i}": torch.randn(64, 64) for i in range(8)}
    comps = [StateComponent("model", Box(big), SharingPattern.REPLICATED),
             StateComponent("rng", Box({"s": torch.tensor([rank])}), SharingPattern.PER_RANK)]
    coord.save(step=10, components=comps)
    coord.storage = FailingStorage(rank, fail_rank, after=1)  # dies after writing one file
    try:
        coord.save(step=20, components=comps)
    except Exception as exc:
        outcome = {"type": type(exc).__name__, "message": str(exc), "failed_ranks": sorted(exc.failures)}
    else:
        outcome = {"type": None}
    coord.storage = LocalStorage()
    latest = coord.latest()
    # The run goes on: the next save cleans up the unfinished folder and succeeds.
    coord.save(step=30, components=comps)
    result = coord.load(comps, checkpoint=20 if latest.step == 20 else "latest")
    return {"outcome": outcome, "latest_after_failure": latest.step, "loaded": result.step,
            "dirs": sorted(os.listdir(run_dir))}


def test_failed_write_on_one_rank_leaves_previous_checkpoint_latest(tmp_path):
    results = expect_ok(run_ranks(4, _save_twice_second_fails, str(tmp_path), 2))
    for res in results:
        assert res["outcome"]["type"] == "CheckpointError"
        assert res["outcome"]["failed_ranks"] == [2]
        assert "No space left on device (injected)" in res["outcome"]["message"]
        assert "rank 2" in res["outcome"]["message"]
        assert res["latest_after_failure"] == 10
        assert res["loaded"] == 30
    assert results[0]["dirs"] == [".ckpt.lock", "checkpoint-00000010", "checkpoint-00000030"]


def _corrupt_then_load(rank: int, world: int, run_dir: str, victim: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=60)
    torch.manual_seed(0)
    comps = [StateComponent("model", Box({f"w{i}": torch.randn(32, 32) for i in range(4)}),
                            SharingPattern.REPLICATED),
             StateComponent("rng", Box({"s": torch.tensor([rank]), "n": rank}), SharingPattern.PER_RANK)]
    path = coord.save(step=5, components=comps)
    coord.comm.all_gather(None, "test barrier")
    if rank == 0:
        target = os.path.join(path, victim)
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) - 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    coord.comm.all_gather(None, "test barrier")
    try:
        coord.load(comps)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "failed": sorted(exc.failures),
                "component": getattr(exc, "component", None), "path": exc.path}
    return {"type": None}


@pytest.mark.parametrize("victim,readers", [
    ("model/replicated.part-1-of-2.safetensors", [0, 1]),  # every rank reads every replicated part
    ("rng/rank-00001.msgpack", [1]),  # only its owner reads a per-rank file
])
def test_flipped_byte_is_caught_on_load_naming_the_file(tmp_path, victim, readers):
    results = expect_ok(run_ranks(2, _corrupt_then_load, str(tmp_path), victim))
    for res in results:
        assert res["type"] == "CorruptCheckpointError", res
        assert victim in res["message"] and "digest" in res["message"]
        assert res["failed"] == readers
        if len(readers) > 1:  # ranks that failed the same way: one message naming them all, not one per rank
            assert "rank 0, rank 1: CorruptCheckpointError:" in res["message"], res["message"]
            assert "; rank 1:" not in res["message"], res["message"]
        # Every rank's error carries the failing file and component, not just the ranks that read it.
        assert res["component"] == victim.split("/")[0] and res["path"].endswith(victim), res


def _hang_in_save(rank: int, world: int, run_dir: str) -> dict:
    coord = CheckpointCoordinator(run_dir, timeout=4)
    comps = [StateComponent("rng", Box({"s": torch.tensor([rank])}), SharingPattern.PER_RANK)]
    if rank == 1:
        time.sleep(15)  # never reaches the save in time
        return {"type": "slept", "woke_at": time.time()}
    try:
        coord.save(step=1, components=comps)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "raised_at": time.time()}
    return {"type": None}


def test_a_hung_rank_gives_a_timeout_error_not_a_hang(tmp_path):
    results = run_ranks(2, _hang_in_save, str(tmp_path), timeout=90)
    res = results[0]
    assert res["type"] == "CollectiveTimeoutError", res
    assert "'prepare'" in res["message"] and "timeout" in res["message"]
    # The 4 s coordinator timeout fired while rank 1 was still asleep: rank 0 did not wait for it.
    assert res["raised_at"] < results[1]["woke_at"]
    assert not any(n.startswith("checkpoint-00000001") and not n.endswith(".partial") for n in os.listdir(tmp_path))
