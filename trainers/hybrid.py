"""HybridTrainer: data parallelism over a DeviceMesh, with tensor parallelism (dp x tp) or pipeline stages
(dp x pp) inside each replica.

dp x tp: the model is split with `parallelize_module` (column- and row-wise layers) over "tp"; gradients are
averaged over "dp". Each tensor-parallel shard is identical across its replicas, so model and optimizer are
PER_GROUP over "dp" (one copy per tp rank, written split across the replicas that hold it), saved as each
rank's local shard with where it sits (`ckpt.shard_entry`): a load under another mesh reassembles them.
dp x pp: each replica is a pipeline over "pp"; a stage's model and optimizer are PER_GROUP over "dp" (the
same stage in every replica), keyed by the model's parameter names.
Data: one sampler per replica, followed by every rank of the replica (PER_GROUP over "tp" / "pp", the ranks
that see the same batches). Scheduler and trainer state are REPLICATED; RNG is PER_RANK.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ckpt import SharingPattern, StateComponent

from .gradients import clip_by_global_norm
from .keys import DATA, MODEL, OPTIMIZER
from .parallel_base import ParallelTrainer
from .parallel_config import ParallelConfig
from .pipeline import PipelineMixin
from .sharded_state import ModuleState, OptimizerState

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


class HybridTrainer(PipelineMixin, ParallelTrainer):
    """Training on a dp x tp or dp x pp DeviceMesh (see ParallelConfig); construct it on every rank.

    Tensor parallel: the model's forward returns the loss (as for every trainer). Pipeline: `model` is an
    nn.Sequential, batches are `(inputs, targets)` and `output_loss(output, target)` is required.
    """

    def __init__(self, model: torch.nn.Module, args: Any, *, parallel: ParallelConfig,
                 output_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, **kwargs: Any):
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel must be a trainers.ParallelConfig, not {type(parallel).__name__}")
        self.inner_dim = parallel.inner
        super().__init__(model, args, parallel=parallel, output_loss=output_loss, **kwargs)

    @property
    def pipelined(self) -> bool:
        return self.inner_dim == "pp"

    @property
    def needs_data(self) -> bool:
        return self._uses_batches if self.pipelined else True

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.pipelined:
            return self._wrap_pipeline(model)
        plan = self.parallel.tp_plan
        if plan is None:
            return model
        styles = {name: _STYLES[s]() if isinstance(s, str) else s for name, s in plan.items()}
        return parallelize_module(model, self.mesh["tp"], styles)

    def _forward_backward(self, batch: Any) -> float:
        if self.pipelined:
            return self._pipeline_step(batch)
        loss = self.compute_loss(self.model, batch)
        loss.backward()
        return float(loss.detach())

    def _clip(self, max_norm: float) -> float:
        if self.pipelined:
            return self._pipeline_clip(max_norm)
        return clip_by_global_norm(self.unwrapped_model.parameters(), max_norm, shard_group=self.inner_group,
                                   shard_count=self.inner_size)

    def _eval_batch(self, batch: Any) -> tuple[float, int]:
        if self.pipelined:
            return self._pipeline_eval(batch)
        loss = float(self.compute_loss(self.model, batch))  # every tp rank runs the forward; one counts it
        n = self._samples(batch)
        return (loss * n, n) if self.inner_rank == 0 else (0.0, 0)

    def get_state_components(self) -> list[StateComponent]:
        group, level = SharingPattern.PER_GROUP, self.args.replica_validation
        return [StateComponent(MODEL, ModuleState(self.unwrapped_model), group, process_group_name="dp",
                               validation_level=level),
                StateComponent(OPTIMIZER, OptimizerState(self.optimizer, self.unwrapped_model), group,
                               process_group_name="dp", validation_level=level),
                StateComponent(DATA, self.train_loader, group, process_group_name=self.inner_dim),
                *self._shared_components()]
