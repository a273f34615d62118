"""Model and optimizer state keyed by fully qualified parameter names: pipeline stages, and the reader of older
dp x tp checkpoints.

A pipeline stage holds part of a model. Its state is saved so that a load under another layout can find every
piece (ckpt/load/reshard.py): tensors are keyed by the parameter's fully qualified name in the whole model
(`layers.3.weight`, never a stage-local index), so a load at another number of stages takes each name from
whichever saved stage held it.

Tensor-parallel state is saved as DTensors by SharingPattern.SHARDED (`mesh_state.py`). dp x tp checkpoints
written before that hold each rank's shard as a `ckpt.shard_entry` (the local shard and where it sits in the
full tensor); loading cuts this rank's shard out of whatever the checkpoint gives: its own shard (same layout)
or the full tensor (a resharded load). Nothing writes shard entries any more.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ckpt import is_shard_entry, local_piece

_FORMAT = 1


def dtensor_box(t: DTensor) -> tuple[list[int], list[int]]:
    """(offsets, shape) of this rank's local shard inside the full tensor (Shard and Replicate placements).

    Shard(d) follows torch.chunk, as DTensor does: pieces of ceil(n / k), the last ones shorter or empty.
    """
    offsets, sizes = [0] * t.dim(), list(t.shape)
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        raise ValueError("this rank is not part of the DTensor's device mesh; it holds no shard to save")
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_shard():
            d = placement.dim if placement.dim >= 0 else placement.dim + t.dim()
            n, k = sizes[d], t.device_mesh.size(mesh_dim)
            per = -(-n // k)
            start = min(coord[mesh_dim] * per, n)
            offsets[d] += start
            sizes[d] = min(start + per, n) - start
        elif not placement.is_replicate():
            raise ValueError(f"DTensor placement {placement} is not supported in checkpoints (Shard and Replicate "
                             "are); redistribute it to Replicate or Shard before saving")
    local = list(t.to_local().shape)
    if local != sizes:
        raise ValueError(f"DTensor of shape {list(t.shape)} with placements {t.placements}: expected a local shard of "
                         f"{sizes}, found {local}; uneven sharding this code does not model")
    return offsets, sizes


def from_saved(saved: Any, like: torch.Tensor, where: str) -> torch.Tensor:
    """The value for this rank from what the checkpoint holds: the piece of a shard entry that `like` (a DTensor,
    or a plain tensor standing for the full tensor) covers. Returns a plain tensor (the local shard)."""
    if isinstance(like, DTensor):
        offsets, shape = dtensor_box(like)
    else:
        offsets, shape = [0] * like.dim(), list(like.shape)
    if is_shard_entry(saved):
        return local_piece(saved, offsets, shape, where)
    if not isinstance(saved, torch.Tensor):
        raise ValueError(f"{where}: the checkpoint holds a {type(saved).__name__}, not a tensor")
    if list(saved.shape) == shape:
        return saved
    if isinstance(like, DTensor) and list(saved.shape) == list(like.shape):  # saved whole (no tensor parallelism)
        return saved[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]
    raise ValueError(f"{where}: the checkpoint holds shape {list(saved.shape)}, this rank needs {shape}")


def _as_live(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`piece` (a local shard) shaped like `like`: a DTensor with the same mesh and placements, or a tensor."""
    piece = piece.to(dtype=like.dtype, device=like.device if not isinstance(like, DTensor) else like.to_local().device)
    if isinstance(like, DTensor):
        return DTensor.from_local(piece.clone(), like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    return piece.clone()


class ModuleState:
    """A module's parameters and buffers by fully qualified name (Stateful).

    `prefix` is prepended to every name (a stage built from part of a model keeps the model's names, so it
    is usually empty). Loading copies into the live tensors, so optimizers keep pointing at them; names the
    checkpoint holds for other stages or ranks are ignored, names this module needs and the checkpoint lacks
    are an error.
    """

    def __init__(self, module: torch.nn.Module, prefix: str = ""):
        self.module, self.prefix = module, prefix

    def _live(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((self.prefix + n, p) for n, p in self.module.named_parameters())
        yield from ((self.prefix + n, b) for n, b in self.module.named_buffers() if b is not None)

    def state_dict(self) -> dict[str, Any]:
        return {name: t.detach() for name, t in self._live()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        live = dict(self._live())
        missing = sorted(n for n in live if n not in state)
        if missing:
            raise ValueError(f"model: the checkpoint lacks {missing[:5]} (it has {sorted(state)[:5]}...); it was "
                             "saved from another model, or from part of one (load with reshard=True to gather every "
                             "stage's copy)")
        pieces = {n: from_saved(state[n], t, f"model tensor {n!r}") for n, t in live.items()}
        with torch.no_grad():
            for name, t in live.items():
                target = t.to_local() if isinstance(t, DTensor) else t
                if list(pieces[name].shape) != list(target.shape):
                    raise ValueError(f"model tensor {name!r}: the checkpoint gives {list(pieces[name].shape)}, this "
                                     f"rank holds {list(target.shape)}")
                target.copy_(pieces[name])


class OptimizerState:
    """An optimizer's state keyed by parameter name instead of position (Stateful).

    Saved as {"format", "state": {name: {...}}, "groups": {name: hyperparameters}}: every entry belongs to one
    parameter, so the copies of several stages merge into one (a resharded load) and each stage picks its own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, prefix: str = ""):
        self.optimizer, self.module, self.prefix = optimizer, module, prefix

    def _names(self) -> list[str]:
        """The name of every parameter in optimizer order (the order torch numbers them in state_dict())."""
        by_id = {id(p): self.prefix + n for n, p in self.module.named_parameters()}
        names = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError("the optimizer holds a parameter that is not in the model; build it from "
                                     "the model's parameters")
                names.append(by_id[id(p)])
        return names

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        raw = self.optimizer.state_dict()
        names = self._names()
        state = {names[i]: dict(s) for i, s in raw["state"].items()}
        groups = {}
        for group in raw["param_groups"]:
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.update({names[i]: hyper for i in group["params"]})
        return {"format": _FORMAT, "state": state, "groups": groups}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        if saved.get("format") != _FORMAT:
            raise ValueError(f"optimizer state has format {saved.get('format')!r}; this version reads {_FORMAT}")
        names, params = self._names(), self._params()
        missing = sorted(n for n in names if n not in saved["groups"])
        if missing:
            raise ValueError(f"optimizer: the checkpoint has no settings for parameters {missing[:5]}; it was saved "
                             "from another model, or from part of one (load with reshard=True)")
        raw = self.optimizer.state_dict()
        groups = []
        for group in raw["param_groups"]:
            first = names[group["params"][0]] if group["params"] else None
            hyper = dict(saved["groups"][first]) if first is not None else {}
            groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": group["params"]})
        state = {}
        for i, (name, p) in enumerate(zip(names, params, strict=True)):
            if name in saved["state"]:
                state[i] = {k: self._value(v, p, f"optimizer state {name!r}/{k!r}")
                            for k, v in saved["state"][name].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    @staticmethod
    def _value(saved: Any, param: torch.Tensor, where: str) -> Any:
        if not (is_shard_entry(saved) or isinstance(saved, torch.Tensor)):
            return saved
        if isinstance(saved, torch.Tensor) and saved.dim() == 0:  # `step` and other scalars: plain on every rank
            return saved.clone()
        piece = from_saved(saved, param, where)
        return _as_live(piece, param) if isinstance(param, DTensor) else piece.clone()
