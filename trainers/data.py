"""A stateful sampler and loader whose state (epoch, position) makes a resume exact mid-epoch.

Each epoch's order is a permutation drawn from `seed + epoch` with a private torch.Generator, so it
touches no global random stream and can be recomputed from two integers: resuming needs no replay.
Incomplete batches at the end of an epoch are dropped (every step sees a full batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

_FORMAT = 1
# Settings that fix the order of the data; a resume with other values would not continue the same stream.
_FIXED = ("num_samples", "batch_size", "num_replicas", "rank", "seed", "shuffle")


class EpochSampler:
    """This rank's batches of sample indices, epoch after epoch, forever.

    With `num_replicas` > 1 the epoch's permutation is cut to a multiple of the replica count and rank
    r takes every `num_replicas`-th index from r (as torch's DistributedSampler does).
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if num_samples < 1 or batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler: num_samples={num_samples}, batch_size={batch_size}, rank={rank}, "
                             f"num_replicas={num_replicas}: need num_samples >= 1, batch_size >= 1, "
                             "0 <= rank < num_replicas")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.batches_per_epoch = (num_samples // num_replicas) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the training set has {num_samples} samples: too few for one batch of {batch_size} on each of "
                f"{num_replicas} rank(s). Use a smaller per_device_train_batch_size or more data")
        self.epoch = 0
        self.position = 0  # batches of `epoch` already handed out
        self._order: tuple[int, torch.Tensor] | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + self.epoch)
                perm = torch.randperm(self.num_samples, generator=gen)
            else:
                perm = torch.arange(self.num_samples)
            usable = (self.num_samples // self.num_replicas) * self.num_replicas
            self._order = (self.epoch, perm[:usable][self.rank::self.num_replicas])
        return self._order[1]

    def next_indices(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.batch_size
        self.position += 1
        return self._epoch_order()[start:start + self.batch_size].tolist()

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.position / self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "epoch": self.epoch, "position": self.position,
                **{name: getattr(self, name) for name in _FIXED}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"sampler state has format {state.get('format')!r}; this version reads {_FORMAT}")
        changed = [f"{name}: checkpoint {state.get(name)!r}, now {getattr(self, name)!r}"
                   for name in _FIXED if state.get(name) != getattr(self, name)]
        if changed:
            raise ValueError(
                "the data order saved in the checkpoint does not match this run (" + "; ".join(changed) + "). "
                "Resume with the same dataset, batch size, world size, seed and shuffle setting, or start fresh")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class StatefulDataLoader:
    """Endless batches from a map-style dataset in an EpochSampler's order; Stateful (its sampler's state)."""

    def __init__(self, dataset: Sequence[Any], sampler: EpochSampler,
                 collate_fn: Callable[[list[Any]], Any] | None = None):
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn or default_collate

    def __iter__(self) -> StatefulDataLoader:
        return self

    def __next__(self) -> Any:
        return self.collate_fn([self.dataset[i] for i in self.sampler.next_indices()])

    @property
    def progress(self) -> float:
        return self.sampler.progress

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dispatch_batches"):
            raise ValueError("the checkpoint's data state was written with dispatch_batches=True; this run has "
                             "dispatch_batches=False. Resume with the same setting")
        self.sampler.load_state_dict(state["sampler"])


def eval_batches(dataset: Sequence[Any], batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None):
    """This rank's share of `dataset` (every num_replicas-th sample from rank), in order, in batches."""
    collate = collate_fn or default_collate
    mine = range(rank, len(dataset), num_replicas)
    for start in range(0, len(mine), batch_size):
        yield collate([dataset[i] for i in mine[start:start + batch_size]])
