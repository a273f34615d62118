"""Model and optimizer state as ckpt's SharingPattern.SHARDED saves it: DTensors over the job's whole mesh.

FSDP2 places its parameters on the mesh it shards over, so its state dicts are saved as they are. A
tensor-parallel model (`parallelize_module` over the "tp" dimension) places them on the "tp" sub-mesh only: the
data-parallel replicas that hold the same shard are invisible there, so a save could not tell they must agree
and a load could not tell whose copy to read. `OnWholeMesh` presents such a state dict over the whole (dp, tp)
mesh, each DTensor with Replicate() on "dp" in front of its own placements, and takes loaded values back to
the sub-mesh. ckpt then writes each shard once (split across its replicas), compares the replicas' digests,
and a load at any (dp, tp) reads only the byte ranges of its own shards.
"""

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


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`value` with `fn` applied to every tensor in it (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


class OnWholeMesh:
    """A Stateful whose DTensors live on the `inner` sub-mesh of `mesh`, saved and loaded over the whole mesh.

    On save each such DTensor becomes one over `mesh` with Replicate() on every other mesh dimension (the
    replicas hold the same shard); on load the values ckpt gives (DTensors over `mesh`, placed like the live
    state) go back to the sub-mesh before `inner_state.load_state_dict`. Plain tensors and other values pass
    through (ckpt replicates them across the job's ranks).
    """

    def __init__(self, inner_state: Any, mesh: DeviceMesh, inner: str):
        names = mesh.mesh_dim_names or ()
        if inner not in names:
            raise ValueError(f"OnWholeMesh: the mesh has dimensions {list(names)}, not {inner!r}")
        self.inner_state, self.mesh, self.inner = inner_state, mesh, inner
        self.sub_mesh = mesh[inner]
        self._at = names.index(inner)

    def _lift(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor):
            return t
        if (t.device_mesh.mesh_dim_names or ()) != (self.inner,):
            raise ValueError(f"a DTensor on the mesh {t.device_mesh} (dimensions {t.device_mesh.mesh_dim_names}) is "
                             f"not on the {self.inner!r} sub-mesh this state is saved over; place tensor-parallel "
                             f"parameters on mesh[{self.inner!r}]")
        placements = [Replicate()] * self.mesh.ndim
        placements[self._at] = t.placements[0]
        return DTensor.from_local(t.to_local(), self.mesh, placements, run_check=False, shape=t.shape,
                                  stride=t.stride())

    def _lower(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor) or t.device_mesh != self.mesh:
            return t
        return DTensor.from_local(t.to_local(), self.sub_mesh, [t.placements[self._at]], run_check=False,
                                  shape=t.shape, stride=t.stride())

    def state_dict(self) -> dict[str, Any]:
        return map_tensors(self.inner_state.state_dict(), self._lift)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner_state.load_state_dict(map_tensors(state, self._lower))


__all__ = ["OnWholeMesh", "OptimizerByName", "map_tensors"]
