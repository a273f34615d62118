"""HybridTrainer: data parallelism over a DeviceMesh, with tensor parallelism (dp x tp) or pipeline stages
(dp x pp) inside each replica.

dp x tp: the model is split with `parallelize_module` (column- and row-wise layers) over "tp"; gradients are
averaged over "dp". Model and optimizer are SharingPattern.SHARDED, presented over the whole (dp, tp) mesh
(Replicate() on "dp", the layer's own placement on "tp"; `mesh_state.OnWholeMesh`): each shard is written once,
split across the replicas that hold it, the replicas are checked to agree, and a load at any dp and tp reads
only the byte ranges of its own shards. The optimizer is keyed by parameter name. Checkpoints written before
(PER_GROUP over "dp", shards as `ckpt.shard_entry` values) still load, through `sharded_state`.
dp x pp: each replica is a pipeline over "pp"; a stage's model and optimizer are PER_GROUP over "dp" (the
same stage in every replica), keyed by the model's parameter names.
Data: one sampler per replica, followed by every rank of the replica (PER_GROUP over "tp" / "pp", the ranks
that see the same batches). Scheduler and trainer state are REPLICATED; RNG is PER_RANK.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ckpt import Manifest, SharingPattern, StateComponent

from .gradients import clip_by_global_norm
from .keys import DATA, MODEL, OPTIMIZER
from .mesh_state import OnWholeMesh, OptimizerByName
from .parallel_base import ParallelTrainer, log
from .parallel_config import ParallelConfig
from .pipeline import PipelineMixin
from .sharded_state import ModuleState, OptimizerState

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def tensor_parallel(model: torch.nn.Module, tp_mesh: Any, plan: Mapping[str, Any] | None) -> torch.nn.Module:
    """`model` split over `tp_mesh` by `plan` (module name -> "colwise", "rowwise" or a torch ParallelStyle);
    unchanged without a plan."""
    if plan is None:
        return model
    styles = {name: _STYLES[s]() if isinstance(s, str) else s for name, s in plan.items()}
    return parallelize_module(model, tp_mesh, styles)


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
        return tensor_parallel(model, self.mesh["tp"], self.parallel.tp_plan)

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
        level = self.args.replica_validation
        if self.pipelined:
            model, optimizer = self._named_components(SharingPattern.PER_GROUP)
        else:
            sharded, module = SharingPattern.SHARDED, self.unwrapped_model
            model = StateComponent(MODEL, OnWholeMesh(module, self.mesh), sharded, validation_level=level)
            optimizer = StateComponent(OPTIMIZER, OnWholeMesh(OptimizerByName(self.optimizer, module), self.mesh),
                                       sharded, validation_level=level)
        return [model, optimizer, StateComponent(DATA, self.train_loader, SharingPattern.PER_GROUP,
                                                 process_group_name=self.inner_dim), *self._shared_components()]

    def _named_components(self, pattern: SharingPattern) -> tuple[StateComponent, StateComponent]:
        """Model and optimizer keyed by parameter name, one copy per dp group (pipeline stages, and the dp x tp
        layout of older checkpoints, whose shards are `ckpt.shard_entry` values)."""
        level = self.args.replica_validation
        return (StateComponent(MODEL, ModuleState(self.unwrapped_model), pattern, process_group_name="dp",
                               validation_level=level),
                StateComponent(OPTIMIZER, OptimizerState(self.optimizer, self.unwrapped_model), pattern,
                               process_group_name="dp", validation_level=level))

    def _components_to_load(self, manifest: Manifest) -> list[StateComponent]:
        """dp x tp checkpoints saved PER_GROUP over "dp" (before model and optimizer were SHARDED) load through
        their own readers, at any mesh."""
        saved = manifest.components.get(MODEL)
        components = self.all_components()
        if self.pipelined or saved is None or saved.pattern is not SharingPattern.PER_GROUP:
            return components
        if self.rank == 0:
            log.info("loading a dp x tp checkpoint of the older layout (model and optimizer PER_GROUP over \"dp\"); "
                     "the next save writes them SHARDED")
        legacy = dict(zip((MODEL, OPTIMIZER), self._named_components(SharingPattern.PER_GROUP), strict=True))
        return [legacy.get(c.key, c) for c in components]
