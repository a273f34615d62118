"""The stateful sampler and loaders: exact mid-epoch resume, per-rank shares, centralised dispatch."""

from __future__ import annotations

import pytest
import torch

from tests.support.distributed import expect_ok, run_ranks
from trainers import EpochSampler, StatefulDataLoader


class Numbers:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([i, 10 * i]), "y": torch.tensor(float(i))}


def test_each_epoch_is_a_fresh_permutation_and_incomplete_batches_are_dropped():
    s = EpochSampler(10, 3, seed=5)
    epochs = [[i for _ in range(3) for i in s.next_indices()] for _ in range(3)]
    for drawn in epochs:
        assert len(drawn) == 9 and len(set(drawn)) == 9
    assert epochs[0] != epochs[1] and s.progress == 3.0
    plain = EpochSampler(7, 2, shuffle=False)
    assert [plain.next_indices() for _ in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_ranks_share_each_epoch_without_overlap():
    draws = [EpochSampler(23, 2, seed=1, num_replicas=4, rank=r) for r in range(4)]
    taken = [i for s in draws for _ in range(s.batches_per_epoch) for i in s.next_indices()]
    assert len(taken) == len(set(taken)) == 4 * 2 * 2  # 23 // 4 = 5 per rank, 2 full batches of 2


def test_a_loader_resumed_mid_epoch_continues_exactly():
    straight = StatefulDataLoader(Numbers(11), EpochSampler(11, 4, seed=3))
    expected = [next(straight) for _ in range(9)]  # crosses three epoch boundaries (2 batches each)
    first = StatefulDataLoader(Numbers(11), EpochSampler(11, 4, seed=3))
    head = [next(first) for _ in range(3)]
    state = first.state_dict()
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["position"] == 1
    resumed = StatefulDataLoader(Numbers(11), EpochSampler(11, 4, seed=3))
    resumed.load_state_dict(state)
    got = head + [next(resumed) for _ in range(6)]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_a_changed_data_setup_is_refused_with_what_changed():
    state = StatefulDataLoader(Numbers(11), EpochSampler(11, 4, seed=3)).state_dict()
    other = StatefulDataLoader(Numbers(11), EpochSampler(11, 2, seed=4))
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 4, now 2; seed: checkpoint 3, now 4"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="written with dispatch_batches=True; this run has dispatch_batches=False"):
        other.load_state_dict({"dispatch_batches": True, **state})
    with pytest.raises(ValueError, match="too few for one batch of 4 on each of 3 rank"):
        EpochSampler(11, 4, num_replicas=3)


def _dispatch(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from trainers.dispatch import DispatchingLoader

    group = dist.new_group(backend="gloo")
    loader = DispatchingLoader(StatefulDataLoader(Numbers(13), EpochSampler(13, 2 * world, seed=7)), group, rank,
                               world)
    batches = [next(loader) for _ in range(5)]
    reference = StatefulDataLoader(Numbers(13), EpochSampler(13, 2 * world, seed=7))
    expected = [next(reference) for _ in range(5)]
    mine = [torch.equal(b["x"], e["x"][2 * rank:2 * rank + 2]) and torch.equal(b["y"], e["y"][2 * rank:2 * rank + 2])
            for b, e in zip(batches, expected, strict=True)]
    try:
        DispatchingLoader(StatefulDataLoader(Numbers(13), EpochSampler(13, 3, seed=7)), group, rank, world).__next__()
    except RuntimeError as exc:
        error = str(exc)
    return {"mine": mine, "state": loader.state_dict(), "error": error}


def test_dispatch_scatters_rank_zeros_batches_and_shares_its_state():
    results = expect_ok(run_ranks(2, _dispatch))
    for res in results:
        assert res["mine"] == [True] * 5
        assert "rank 0 could not draw the next global batch" in res["error"] and "split evenly" in res["error"]
    assert results[0]["state"] == results[1]["state"]
    assert results[0]["state"]["dispatch_batches"] and results[0]["state"]["sampler"]["position"] == 2
