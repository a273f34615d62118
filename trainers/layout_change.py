"""Per-rank state when a job resumes under another layout (LayoutChange.RESEED).

RNG streams and a replica's data position belong to ranks of the old layout. RESEED rebuilds them
deterministically: every rank's RNG is seeded from the digests of the saved RNG files and its new rank, and
the data stream restarts at the global sample count saved in `DataProgress` (REPLICATED, so it loads at any
layout). A run resumed this way is reproducible, but it is not bit-identical to a run that kept its layout.
"""

from __future__ import annotations

from typing import Any

import xxhash

from ckpt import Manifest

from .data import EpochSampler
from .rng import set_seed

_FORMAT = 1
_FIXED = ("num_samples", "seed", "shuffle")


def reseed_from_checkpoint(manifest: Manifest, rng_key: str, rank: int) -> int:
    """Seed this rank's generators from the saved RNG files' digests and `rank`; returns the seed."""
    entry = manifest.components.get(rng_key)
    digests = sorted(f.xxh3_128 for f in entry.files) if entry is not None else [f"step {manifest.step}"]
    seed = xxhash.xxh3_64_intdigest(f"{'/'.join(digests)}#rank {rank}".encode()) % 2**63
    set_seed(seed)
    return seed


class DataProgress:
    """How far the data stream has gone, counted in samples over all replicas (Stateful, REPLICATED).

    Saved at every checkpoint; `apply()` moves a sampler of any replica count to the same point of the same
    epoch's permutation (rounded down to whole global batches of the new layout).
    """

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {"format": _FORMAT, "epoch": s.epoch, "samples": s.position * s.batch_size * s.num_replicas,
                **{name: getattr(s, name) for name in _FIXED}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"data progress has format {state.get('format')!r}; this version reads {_FORMAT}")
        self.loaded = dict(state)

    def apply(self) -> tuple[int, int]:
        """Move the sampler to the loaded global position; returns (epoch, position in batches)."""
        if self.loaded is None:
            raise ValueError("the checkpoint has no data progress to restart the data stream from")
        s, state = self.sampler, self.loaded
        changed = [f"{n}: checkpoint {state.get(n)!r}, now {getattr(s, n)!r}" for n in _FIXED if state.get(n) != getattr(s, n)]
        if changed:
            raise ValueError("the data order saved in the checkpoint does not match this run (" + "; ".join(changed)
                             + "); resume with the same dataset, seed and shuffle setting")
        s.epoch = int(state["epoch"])
        s.position = min(int(state["samples"]) // (s.batch_size * s.num_replicas), s.batches_per_epoch)
        return s.epoch, s.position
