"""DDPTrainer: torch DistributedDataParallel over gloo or nccl.

Model, optimizer, scheduler and trainer state are identical on every rank (REPLICATED: the ranks share
the writing, and replicas are compared at `args.replica_validation`). RNG is PER_RANK. The data state is
GLOBAL when rank 0 dispatches every batch, PER_RANK with a sampler per rank; resolved at each save.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ckpt import SharingPattern, StateComponent

from .base import Trainer
from .data import EpochSampler, StatefulDataLoader
from .ddp_hooks import ordered_allreduce
from .dispatch import DispatchingLoader
from .keys import DATA, LR_SCHEDULER, MODEL, OPTIMIZER, RNG, TRAINER_STATE


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed from torchrun's environment unless it already is."""
    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"DDPTrainer needs torch.distributed: launch with torchrun, or call "
                           f"torch.distributed.init_process_group() first (environment lacks {missing})")
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def cuda_device_for_local_rank(rank: int) -> int:
    """This rank's GPU: cuda:LOCAL_RANK (without torchrun's LOCAL_RANK: rank modulo the GPU count), checked
    against the GPUs this process sees."""
    count = torch.cuda.device_count()
    local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else rank % max(count, 1)
    if local >= count:
        raise ValueError(f"local rank {local} needs cuda:{local}, but this process sees {count} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); launch at most "
                         f"{count} ranks per node (torchrun --nproc-per-node {count}), or train on the CPU with gloo")
    return local


class DDPTrainer(Trainer):
    """Data-parallel training on every rank of the job; construct it on every rank."""

    def _setup_distributed(self) -> tuple[int, int]:
        init_distributed(self.args.ddp_backend)
        self.backend = dist.get_backend()
        # Coordination traffic (flags, losses, dispatched batches) is small and lives on the CPU: its own gloo
        # group keeps it off the training backend (nccl wants GPU tensors).
        self.cpu_group = dist.new_group(backend="gloo")
        self.dispatch_batches = self.args.dispatch_batches
        return dist.get_rank(), dist.get_world_size()

    def _select_device(self) -> torch.device:
        if self.args.device is not None:
            device = torch.device(self.args.device)
        elif self.backend == "nccl" and torch.cuda.is_available():
            device = torch.device("cuda", cuda_device_for_local_rank(self.rank))
        else:
            return torch.device("cpu")
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # nccl's collectives and barriers use the current device
        return device

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        if self.args.ddp_layout_independent_reduce:
            ddp.register_comm_hook(dist.group.WORLD, ordered_allreduce)
        return ddp

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.model.module

    def _build_train_loader(self) -> Any:
        args = self.args
        n = len(self.train_dataset)
        if self.dispatch_batches:
            sampler = EpochSampler(n, args.per_device_train_batch_size * self.world_size, seed=args.shuffle_seed,
                                   shuffle=args.shuffle)
            loader = StatefulDataLoader(self.train_dataset, sampler, self.data_collator)
            return DispatchingLoader(loader, self.cpu_group, self.rank, self.world_size)
        sampler = EpochSampler(n, args.per_device_train_batch_size, seed=args.shuffle_seed, shuffle=args.shuffle,
                               num_replicas=self.world_size, rank=self.rank)
        return StatefulDataLoader(self.train_dataset, sampler, self.data_collator)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, group=self.cpu_group)
        return values

    def _data_pattern(self) -> SharingPattern:
        return SharingPattern.GLOBAL if self.dispatch_batches else SharingPattern.PER_RANK

    def get_state_components(self) -> list[StateComponent]:
        rep, level = SharingPattern.REPLICATED, self.args.replica_validation
        components = [
            StateComponent(MODEL, self.unwrapped_model, rep, validation_level=level),
            StateComponent(OPTIMIZER, self.optimizer, rep, validation_level=level),
            StateComponent(TRAINER_STATE, self.state, rep),
            StateComponent(DATA, self.train_loader, self._data_pattern),
            StateComponent(RNG, self.rng, SharingPattern.PER_RANK),
        ]
        if self.lr_scheduler is not None:
            components.insert(2, StateComponent(LR_SCHEDULER, self.lr_scheduler, rep))
        return components
