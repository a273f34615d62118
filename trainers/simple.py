"""SimpleTrainer: one process. Every component is the job's single copy (GLOBAL), except RNG (PER_RANK)."""

from __future__ import annotations

import torch.distributed as dist

from ckpt import SharingPattern, StateComponent

from .base import Trainer
from .data import EpochSampler, StatefulDataLoader
from .keys import DATA, LR_SCHEDULER, MODEL, OPTIMIZER, RNG, TRAINER_STATE


class SimpleTrainer(Trainer):
    """Trains on one process (a torch.distributed world of one is accepted)."""

    def _setup_distributed(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(f"SimpleTrainer runs one process, but this job has {dist.get_world_size()} ranks; "
                               "use DDPTrainer (or launch one process)")
        return 0, 1

    def _build_train_loader(self) -> StatefulDataLoader:
        args = self.args
        sampler = EpochSampler(len(self.train_dataset), args.per_device_train_batch_size, seed=args.shuffle_seed,
                               shuffle=args.shuffle)
        return StatefulDataLoader(self.train_dataset, sampler, self.data_collator)

    def get_state_components(self) -> list[StateComponent]:
        g = SharingPattern.GLOBAL
        components = [
            StateComponent(MODEL, self.unwrapped_model, g),
            StateComponent(OPTIMIZER, self.optimizer, g),
            StateComponent(TRAINER_STATE, self.state, g),
            StateComponent(DATA, self.train_loader, g),
            # PER_RANK even here: random streams belong to a process, and a later run may have more of them.
            StateComponent(RNG, self.rng, SharingPattern.PER_RANK),
        ]
        if self.lr_scheduler is not None:
            components.insert(2, StateComponent(LR_SCHEDULER, self.lr_scheduler, g))
        return components
