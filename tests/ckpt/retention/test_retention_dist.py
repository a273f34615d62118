"""Retention on 4 real gloo ranks: only rank 0 deletes, and every rank sees the same outcome and best()."""

from __future__ import annotations

import torch

from ckpt import CheckpointCoordinator, RetentionPolicy, StateComponent
from ckpt.io.storage import LocalStorage
from ckpt.retention.catalog import DELETING_SUFFIX
from tests.support.distributed import expect_ok, run_ranks
from tests.support.workers import model_and_rng

LOSSES = [0.8, 0.3, 0.9, 0.5, 0.7, 0.6]


class RecordingStorage(LocalStorage):
    """Notes every deletion this rank makes."""

    def __init__(self) -> None:
        self.deletions: list[str] = []

    def rename(self, src: str, dst: str) -> None:
        if dst.endswith(DELETING_SUFFIX):
            self.deletions.append(src)
        super().rename(src, dst)

    def remove_tree(self, path: str) -> None:
        if not path.endswith(DELETING_SUFFIX):
            self.deletions.append(path)
        super().remove_tree(path)


def _components(rank: int, step: int) -> list[StateComponent]:
    return model_and_rng({"w": torch.full((4,), float(step))}, {"seed": torch.tensor([rank])})


def _retention_run(rank: int, world: int, run_dir: str) -> dict:
    storage = RecordingStorage()
    policy = RetentionPolicy(save_total_limit=2, preserve_n_best=2, best_model_metric="eval_loss")
    coord = CheckpointCoordinator(run_dir, storage=storage, timeout=60, retention=policy)
    outcomes = []
    for step, loss in enumerate(LOSSES[:4], start=1):
        coord.save(step, _components(rank, step), {"eval_loss": loss})
        outcomes.append(coord.last_retention.to_plain())
    # Resume on every rank from step 2, then save more: step 2 is protected on rank 0 as "resumed from", and the
    # first save sets 3 and 4 aside as an abandoned timeline, which retention then removes (not pinned).
    coord.load(_components(rank, 0), checkpoint=2)
    for step, loss in enumerate(LOSSES[4:], start=5):
        coord.save(step, _components(rank, step), {"eval_loss": loss})
        outcomes.append(coord.last_retention.to_plain())
    return {"deletions": storage.deletions, "outcomes": outcomes,
            "best": [(b.rank, b.step, b.value) for b in coord.best()], "summary": coord.summary(),
            "on_disk": [c.step for c in coord.checkpoints()]}


def test_only_rank_zero_deletes_and_every_rank_agrees(tmp_path):
    results = expect_ok(run_ranks(4, _retention_run, str(tmp_path)))
    assert [len(r["deletions"]) for r in results[1:]] == [0, 0, 0]
    assert sorted(p.rsplit("-", 1)[1] for p in results[0]["deletions"]) == ["00000001", "00000003", "00000004"]
    assert sum("abandoned" in p for p in results[0]["deletions"]) == 2
    for r in results[1:]:
        assert r["outcomes"] == results[0]["outcomes"]
        assert r["best"] == results[0]["best"] == [(1, 2, 0.3), (2, 6, 0.6)]
        assert r["summary"] == results[0]["summary"]
    assert results[0]["on_disk"] == [2, 5, 6]
    last = results[0]["outcomes"][-1]["decision"]["checkpoints"]
    assert {c["step"]: c["reasons"] for c in last}[2] == ["best #1 (eval_loss=0.3)", "resumed from"]
