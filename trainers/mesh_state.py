"""Model and optimizer state as ckpt's SharingPattern.SHARDED saves it: DTensors over the job's whole mesh.

A tensor-parallel model (`parallelize_module` over the "tp" dimension) places its parameters on the "tp"
sub-mesh only, and FSDP2 the parameters it alone shards on "dp": the ranks of the other dimension, which hold
the same shard, are invisible there, so a save could not check they agree. `OnWholeMesh` presents such a state
dict over the whole (dp, tp) mesh, each DTensor with Replicate() on the dimensions its sub-mesh lacks, and takes
loaded values back to the sub-mesh. ckpt then writes each shard once (split across its holders), compares the
holders' digests, and a load at any (dp, tp) reads only the byte ranges of its own shards."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate


class OptimizerByName:
    """An optimizer's state keyed by parameter name, as `torch.distributed.checkpoint.state_dict` gives it
    (DTensors for sharded parameters; the state is initialised when empty, so a fresh optimizer can load)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        self.optimizer, self.model = optimizer, model

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


def map_tensors(value: Any, fn: Callable[[tuple, torch.Tensor], Any], path: tuple = ()) -> Any:
    """`value` with `fn(path, tensor)` applied to every tensor in it (dicts, lists and tuples walked; `path` is the
    keys and indices that lead to the tensor)."""
    if isinstance(value, torch.Tensor):
        return fn(path, value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn, (*path, k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn, (*path, i)) for i, v in enumerate(value))
    return value


class OnWholeMesh:
    """A Stateful whose DTensors may live on sub-meshes of `mesh`, saved and loaded over the whole mesh.

    On save a DTensor on a sub-mesh (a tensor-parallel layer on "tp", an FSDP2 parameter on "dp") becomes one
    over `mesh`, its placements on the sub-mesh's dimensions and Replicate() on the others (the ranks there hold
    the same shard). On load the values ckpt gives (DTensors over `mesh`, placed like the live state) go back to
    the sub-mesh the live tensor at the same place is on, before `inner_state.load_state_dict`. DTensors already
    over `mesh`, plain tensors and other values pass through (ckpt replicates plain values across the job).
    """

    def __init__(self, inner_state: Any, mesh: DeviceMesh):
        self.inner_state, self.mesh = inner_state, mesh
        self.names = tuple(mesh.mesh_dim_names or ())

    def _dims(self, sub: DeviceMesh) -> list[int]:
        """Where each dimension of `sub` sits in the whole mesh."""
        names = tuple(sub.mesh_dim_names or ())
        if not names or any(n not in self.names for n in names):
            raise ValueError(f"a DTensor on a mesh with dimensions {list(names)} is not on a sub-mesh of the job's "
                             f"mesh {list(self.names)}; place it on the job's mesh (or mesh[name])")
        return [self.names.index(n) for n in names]

    def _lift(self, _path: tuple, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor) or t.device_mesh == self.mesh:
            return t
        placements = [Replicate()] * self.mesh.ndim
        for p, at in zip(t.placements, self._dims(t.device_mesh), strict=True):
            placements[at] = p
        return DTensor.from_local(t.to_local(), self.mesh, placements, run_check=False, shape=t.shape,
                                  stride=t.stride())

    def _lower(self, t: torch.Tensor, sub: DeviceMesh | None) -> torch.Tensor:
        if not isinstance(t, DTensor) or sub is None or t.device_mesh != self.mesh or sub == self.mesh:
            return t
        placements = [t.placements[at] for at in self._dims(sub)]
        return DTensor.from_local(t.to_local(), sub, placements, run_check=False, shape=t.shape, stride=t.stride())

    def state_dict(self) -> dict[str, Any]:
        return map_tensors(self.inner_state.state_dict(), self._lift)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        live: dict[tuple, torch.Tensor] = {}

        def note(path: tuple, t: torch.Tensor) -> torch.Tensor:
            if isinstance(t, DTensor):
                live[path] = t
            return t

        def lower(path: tuple, t: torch.Tensor) -> torch.Tensor:
            now = live.get(path)
            if now is not None and isinstance(t, DTensor) and _same_memory(t.to_local(), now.to_local()):
                # ckpt loaded straight into the live shard: hand back the live tensor itself, since a second view
                # of the same bytes with other strides is refused by the copy in load_state_dict.
                return now
            return self._lower(t, None if now is None else now.device_mesh)

        map_tensors(self.inner_state.state_dict(), note)
        self.inner_state.load_state_dict(map_tensors(state, lower))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are the same elements of the same memory."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype

__all__ = ["OnWholeMesh", "OptimizerByName", "map_tensors"]
