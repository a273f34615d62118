"""AccelTrainer: data parallelism through Hugging Face Accelerate (`pip install ckpt[accelerate]`).

Accelerate prepares the model (DistributedDataParallel across processes) and wraps the optimizer; the loop,
callbacks, retention, eval/save scheduling and logging are the base trainer's.

Sharing: the model and optimizer are identical on every rank (REPLICATED: the ranks share the writing). They
are compared at `args.replica_validation` (TENSOR by default): `AcceleratedOptimizer.state_dict()` is the
wrapped torch optimizer's own state, whole on every rank, because this trainer only runs Accelerate's plain
data-parallel modes (one process, multi-CPU, multi-GPU); sharded modes (DeepSpeed, FSDP, Megatron) split the
optimizer across ranks, so they are refused rather than validated at a level they cannot meet. Each rank draws
its own slice of the data through its own sampler (data PER_RANK; not Accelerate's prepared dataloader, whose
resume skips batches by replaying them), RNG is PER_RANK, scheduler and trainer state REPLICATED.

With a recovery policy the step is the base trainer's recovered step (micro-batches, NaN/Inf and spike
consensus, out-of-memory retry): in these modes `accelerator.backward(loss)` is `loss.backward()`. fp16 loss
scaling and Accelerate's own gradient accumulation change that, so recovery refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ckpt import SharingPattern, StateComponent

from .base import StepOutput, Trainer
from .data import EpochSampler, StatefulDataLoader
from .keys import DATA, LR_SCHEDULER, MODEL, OPTIMIZER, RNG, TRAINER_STATE

_PLAIN_MODES = ("NO", "MULTI_CPU", "MULTI_GPU")


class AccelTrainer(Trainer):
    """Data-parallel training with an `accelerate.Accelerator`; construct it on every rank (under torchrun or
    `accelerate launch`). `accelerator_kwargs` go to `Accelerator(...)` (cpu=True is set on a machine without
    CUDA)."""

    recovery_aware_step = True  # with a policy, training_step is the recovered step

    def __init__(self, model: torch.nn.Module, args: Any, *, accelerator_kwargs: Mapping[str, Any] | None = None,
                 **kwargs: Any):
        try:
            import accelerate
        except ImportError:
            raise ImportError("AccelTrainer needs Hugging Face Accelerate: pip install 'ckpt[accelerate]'") from None
        self._accelerate = accelerate
        self._accelerator_kwargs = dict(accelerator_kwargs or {})
        super().__init__(model, args, **kwargs)
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        if self.recovery.enabled:
            self._check_recovery()

    def _check_recovery(self) -> None:
        """Raise ValueError (on every rank) for Accelerate settings the recovered step cannot run."""
        acc = self.accelerator
        if acc.scaler is not None or acc.gradient_accumulation_steps != 1:
            raise ValueError(
                "AccelTrainer with a recovery policy runs its step as plain loss.backward() in micro-batches; this "
                f"Accelerator has mixed_precision={acc.mixed_precision!r} (a loss scaler: "
                f"{acc.scaler is not None}) and gradient_accumulation_steps={acc.gradient_accumulation_steps}. Use "
                "mixed_precision 'no' or 'bf16' and gradient_accumulation_steps=1 (recovery's micro-batches "
                "accumulate gradients themselves), or turn recovery off")

    def _setup_distributed(self) -> tuple[int, int]:
        kwargs = {"cpu": not torch.cuda.is_available(), **self._accelerator_kwargs}
        self.accelerator = self._accelerate.Accelerator(**kwargs)
        mode = self.accelerator.distributed_type.name
        if mode not in _PLAIN_MODES:
            raise ValueError(f"AccelTrainer runs Accelerate's data-parallel modes {list(_PLAIN_MODES)}; this job is "
                             f"{mode}, which shards the optimizer across ranks (its state would not be REPLICATED)")
        self.cpu_group = dist.new_group(backend="gloo") if self.accelerator.num_processes > 1 else None
        return self.accelerator.process_index, self.accelerator.num_processes

    def _select_device(self) -> torch.device:
        return self.accelerator.device

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.prepare_model(model)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _build_train_loader(self) -> StatefulDataLoader:
        args = self.args
        sampler = EpochSampler(len(self.train_dataset), args.per_device_train_batch_size, seed=args.shuffle_seed,
                               shuffle=args.shuffle, num_replicas=self.world_size, rank=self.rank)
        return StatefulDataLoader(self.train_dataset, sampler, self.data_collator)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.cpu_group is not None:
            dist.all_reduce(values, group=self.cpu_group)
        return values

    def clip_gradients(self) -> torch.Tensor:
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def training_step(self, batch: Any) -> StepOutput:
        if self.recovery.enabled:
            return self.recovery.training_step(batch)
        loss = self.compute_loss(self.model, batch)
        self.accelerator.backward(loss)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return self.end_step(float(loss.detach()), float(grad_norm), apply=True)

    def get_state_components(self) -> list[StateComponent]:
        rep, level = SharingPattern.REPLICATED, self.args.replica_validation
        components = [
            StateComponent(MODEL, self.unwrapped_model, rep, validation_level=level),
            StateComponent(OPTIMIZER, self.optimizer, rep, validation_level=level),
            StateComponent(TRAINER_STATE, self.state, rep),
            StateComponent(DATA, self.train_loader, SharingPattern.PER_RANK),
            StateComponent(RNG, self.rng, SharingPattern.PER_RANK),
        ]
        if self.lr_scheduler is not None:
            components.insert(2, StateComponent(LR_SCHEDULER, self.lr_scheduler, rep))
        return components
