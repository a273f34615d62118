"""ParallelTrainer: what PipelineTrainer, HybridTrainer and FSDPTrainer share.

The job is a 2-d DeviceMesh ("dp", inner) where inner is "tp" or "pp": data-parallel replicas of a model that
is itself split over the inner ranks. This class sets the mesh up, feeds each replica its own data, averages
gradients over "dp", clips by the whole model's norm, evaluates with each replica taking its share, and
resumes under another mesh (model and optimizer resharded by ckpt; RNG and data by the LayoutChange policy).
A subclass builds its part of the model (`_wrap_model`), runs forward and backward (`_forward_backward`)
and says how each component is shared (`get_state_components`).

With a recovery policy the step is gated (NaN/Inf consensus, gradient-norm spikes: `recovery.gate_step`)
before the optimizer step. Out-of-memory retry is refused: the forward pass communicates inside a replica
(tensor-parallel collectives, pipeline sends), so one rank's retry would leave its peers waiting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ckpt import CheckpointError, LoadResult, SharingPattern, StateComponent, needs_reshard

from .base import StepOutput, Trainer
from .batches import first_tensor, to_device
from .data import EpochSampler, StatefulDataLoader, eval_batches
from .ddp import init_distributed
from .gradients import average_gradients
from .keys import DATA, EVAL_PREFIX, LR_SCHEDULER, RNG, TRAINER_STATE
from .layout_change import DataProgress, reseed_from_checkpoint
from .parallel_config import LayoutChange, ParallelConfig

log = logging.getLogger("trainers")

DATA_PROGRESS = "data_progress"
_PER_RANK_KEYS = (RNG, DATA)  # state of the layout's ranks: restored as saved, or rebuilt by the policy


class _ReplicaLoader:
    """A replica's batches; ranks that use no data (middle pipeline stages) only advance the sampler."""

    def __init__(self, loader: StatefulDataLoader, needs_data: bool):
        self.loader, self.needs_data = loader, needs_data

    def __iter__(self) -> _ReplicaLoader:
        return self

    def __next__(self) -> Any:
        if self.needs_data:
            return next(self.loader)
        self.loader.sampler.next_indices()
        return None

    @property
    def progress(self) -> float:
        return self.loader.progress

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class ParallelTrainer(Trainer):
    """Base of the mesh trainers; construct a subclass on every rank."""

    inner_dim = "tp"  # the model-parallel mesh dimension; PipelineTrainer and pipeline HybridTrainers use "pp"
    recovery_aware_step = True  # training_step gates the optimizer step through recovery.gate_step

    def __init__(self, model: torch.nn.Module, args: Any, *, parallel: ParallelConfig,
                 output_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, **kwargs: Any):
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel must be a trainers.ParallelConfig, not {type(parallel).__name__}")
        _refuse_oom_retry(type(self).__name__, args)
        self.parallel = parallel
        self.output_loss = output_loss
        super().__init__(model, args, **kwargs)

    # ---- layout -------------------------------------------------------------------------------------

    def _setup_distributed(self) -> tuple[int, int]:
        init_distributed(self.args.ddp_backend or "gloo")
        world, p = dist.get_world_size(), self.parallel
        if world != p.world_size:
            raise ValueError(f"{type(self).__name__}: the mesh dp={p.dp} x {self.inner_dim}={p.inner_size} needs "
                             f"{p.world_size} ranks; this job has {world}. Launch {p.world_size} processes, or change "
                             "the ParallelConfig")
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.mesh = init_device_mesh(device_type, (p.dp, p.inner_size), mesh_dim_names=("dp", self.inner_dim))
        self.dp_size, self.inner_size = p.dp, p.inner_size
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.inner_rank = self.mesh[self.inner_dim].get_local_rank()
        self.dp_group = self.mesh["dp"].get_group()
        self.inner_group = self.mesh[self.inner_dim].get_group()
        self.cpu_group = dist.new_group(backend="gloo")  # flags and losses, off the training backend
        return dist.get_rank(), world

    def _select_device(self) -> torch.device:
        return torch.device(self.args.device) if self.args.device else torch.device(self.mesh.device_type)

    def get_process_groups(self) -> dict[str, Any]:
        # Both mesh dimensions are passed, so the manifest records the mesh (`ckpt inspect` draws it).
        return {"dp": self.dp_group, self.inner_dim: self.inner_group}

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, group=self.cpu_group)
        return values

    # ---- what a subclass provides --------------------------------------------------------------------

    @property
    def feeds_data(self) -> bool:
        """Whether this rank counts the replica's tokens and evaluation samples (one rank per replica)."""
        return self.inner_rank == 0

    @property
    def needs_data(self) -> bool:
        """Whether this rank uses the batches (others only keep the sampler's place)."""
        return True

    def _forward_backward(self, batch: Any) -> float:
        """Forward and backward of this rank's part for one batch; returns the replica's loss."""
        raise NotImplementedError

    def _clip(self, max_norm: float) -> float:
        """Clip by the whole model's norm (this rank holds part of it); returns that norm."""
        raise NotImplementedError

    def _eval_batch(self, batch: Any) -> tuple[float, int]:
        """(loss x samples, samples) this rank contributes for one evaluation batch."""
        raise NotImplementedError

    # ---- data -----------------------------------------------------------------------------------------

    def _build_train_loader(self) -> _ReplicaLoader:
        args = self.args
        sampler = EpochSampler(len(self.train_dataset), args.per_device_train_batch_size, seed=args.shuffle_seed,
                               shuffle=args.shuffle, num_replicas=self.dp_size, rank=self.dp_rank)
        self.data_progress = DataProgress(sampler)
        return _ReplicaLoader(StatefulDataLoader(self.train_dataset, sampler, self.data_collator), self.needs_data)

    def count_tokens(self, batch: Any) -> int:
        return super().count_tokens(batch) if self.feeds_data and batch is not None else 0

    # ---- the step --------------------------------------------------------------------------------------

    def training_step(self, batch: Any) -> StepOutput:
        """Forward and backward of this rank's part, gradients averaged over "dp", clipped by the whole model's
        norm; with a recovery policy every rank then agrees whether to apply the optimizer step."""
        loss = self._forward_backward(batch)
        params = list(self.unwrapped_model.parameters())
        average_gradients(params, self.dp_group, self.dp_size)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
        grad_norm = self._clip(max_norm)
        # `loss` is this replica's and `grad_norm` the whole model's (the same on every rank), so the agreed
        # flags, and with them the decision, are the same on every rank.
        return self.end_step(loss, grad_norm)

    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_dataset; each replica takes its share, one rank of it counts."""
        if self.eval_dataset is None:
            return {}
        model = self.unwrapped_model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in eval_batches(self.eval_dataset, self.args.per_device_eval_batch_size,
                                      num_replicas=self.dp_size, rank=self.dp_rank, collate_fn=self.data_collator):
                loss_sum, n = self._eval_batch(to_device(batch, self.device))
                totals += torch.tensor([loss_sum, n], dtype=torch.float64)
        model.train(was_training)
        totals = self.all_reduce_sum(totals)
        return {EVAL_PREFIX + "loss": float(totals[0] / totals[1]) if totals[1] > 0 else math.nan}

    @staticmethod
    def _samples(batch: Any) -> int:
        first = first_tensor(batch)
        return int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    # ---- state ---------------------------------------------------------------------------------------

    def _shared_components(self) -> list[StateComponent]:
        """Scheduler, trainer state and data progress (identical on every rank) and RNG (PER_RANK)."""
        rep = SharingPattern.REPLICATED
        out = [StateComponent(TRAINER_STATE, self.state, rep),
               StateComponent(DATA_PROGRESS, self.data_progress, rep),
               StateComponent(RNG, self.rng, SharingPattern.PER_RANK)]
        if self.lr_scheduler is not None:
            out.insert(0, StateComponent(LR_SCHEDULER, self.lr_scheduler, rep))
        return out

    def _load_checkpoint(self, checkpoint: str | int) -> LoadResult:
        """Load with resharding: state shared by the replicas or keyed by name loads under any mesh; RNG and
        the data position load as saved when this rank's copy exists, else follow `on_layout_change` (checked
        before anything is applied)."""
        # Resolves the checkpoint on rank 0 and reads its manifest on every rank; applies nothing.
        probe = self.coordinator.load([], checkpoint=checkpoint, strict=False)
        path, manifest = probe.path, probe.manifest
        saved_mesh = {k: manifest.topology.process_groups.get(k) for k in ("dp", self.inner_dim)}
        mesh = {k: self.coordinator.topology.groups.get(k) for k in ("dp", self.inner_dim)}
        # The same groups can mean another layout (a tp group of (dp=2, tp=2) is the whole world at dp=1), so a
        # changed mesh moves all per-rank state, except what was saved for the whole job.
        moved = self._agree_on(sorted(key for key in _PER_RANK_KEYS if key in manifest.components and (
            needs_reshard(manifest.components[key], manifest.topology, self.coordinator.topology)
            or (saved_mesh != mesh and manifest.components[key].pattern is not SharingPattern.GLOBAL))))
        if moved and self.parallel.on_layout_change is LayoutChange.ERROR:
            raise CheckpointError(
                f"{path} was saved by {manifest.topology.world_size} ranks (mesh groups {_plain(saved_mesh)}); this "
                f"job is laid out as dp={self.dp_size} x {self.inner_dim}={self.inner_size}. Model and optimizer can "
                f"be resharded, but components {moved} are state of ranks that no longer exist; nothing was loaded. "
                "Resume with the saved layout, or set on_layout_change=LayoutChange.RESEED to reseed RNG from the "
                "saved streams and restart the data at the saved global sample count", path=path)
        components = self._components_to_load(manifest)
        result = self._load_part([c for c in components if c.key not in moved], path, reshard=True)
        if RNG in moved:
            reseed_from_checkpoint(manifest, RNG, self.rank)
        if DATA in moved:
            epoch, position = self.data_progress.apply()
            if self.rank == 0:
                log.info("layout changed: data restarts at epoch %d, batch %d of each replica", epoch, position)
        return result

    def _components_to_load(self, manifest: Any) -> list[StateComponent]:
        """The components to load from a checkpoint with `manifest`: this trainer's own, unless a subclass reads
        an older layout of them."""
        return self.all_components()

    def _load_part(self, components: list[StateComponent], checkpoint: str | int, reshard: bool = False) -> LoadResult:
        """Load some of the checkpoint's components (the others are rebuilt by the layout policy); required ones
        must be there."""
        result = self.coordinator.load(components, checkpoint=checkpoint, reshard=reshard, strict=False)
        missing = [c.key for c in components if c.required and c.key in result.skipped]
        if missing:
            raise CheckpointError(f"{result.path} lacks the components {missing} that {type(self).__name__} needs; "
                                  "it was written by another trainer", path=result.path)
        return result

    def _agree_on(self, keys: list[str]) -> list[str]:
        """The union over all ranks of `keys` (components some rank cannot load as saved)."""
        flags = torch.tensor([float(k in keys) for k in _PER_RANK_KEYS], dtype=torch.float64)
        summed = self.all_reduce_sum(flags)
        return [k for k, v in zip(_PER_RANK_KEYS, summed.tolist(), strict=True) if v > 0]


def _refuse_oom_retry(trainer: str, args: Any) -> None:
    """Raise ValueError when the recovery policy asks for out-of-memory retries, which these trainers cannot do."""
    policy = args.recovery_policy() if hasattr(args, "recovery_policy") else None
    if policy is not None and policy.oom_retry:
        raise ValueError(
            f"{trainer}: the recovery policy has oom_retry = true, but a model-parallel trainer cannot retry a step "
            "with a smaller micro-batch: its forward pass communicates inside the replica (tensor-parallel "
            "collectives, pipeline sends), so the peers of a rank that ran out of memory would wait for it. Set "
            "oom_retry = false in the [recovery] policy (NaN/Inf and gradient-spike checks still apply), and lower "
            "per_device_train_batch_size (or raise PipelineConfig.n_microbatches) instead")


def _plain(groups: dict[str, Any]) -> dict[str, Any]:
    return {k: [list(g) for g in v] if v is not None else None for k, v in groups.items()}
