"""Rollback targets kept in host memory, so that a rollback reads nothing from the disk.

After each save the trainer hands recovery the state of every component; with `rollback_memory_mb` > 0 a
copy of it (tensors copied to host memory, everything else deep-copied) is kept per rank, within that
budget. A rollback whose target step is held on every rank restores from the copies; otherwise (a copy
evicted, never made, or a rank without it) every rank loads the checkpoint from the disk as before. The
disk stays the authority on which checkpoints exist: a copy is used only for a committed checkpoint that
the rollback chose.

After an async save the copy is the one that save already staged for its writer
(`CheckpointCoordinator.take_staged_state`): no second copy is made, and when a copy is dropped its buffers go
back to the coordinator for a later save to stage into.

Which copies stay: the newest ones that fit the budget, oldest evicted first, except that while a bad run
is in progress the newest copy a good observation vouches for (the likely rollback target) is never evicted
for a newer, unvouched one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckpt import StateComponent

log = logging.getLogger("trainers")

MIB = 1024 * 1024
Staged = tuple[dict[str, Any], Callable[[], None]]  # CheckpointCoordinator.take_staged_state()


class _Unsupported(Exception):
    """A state holds a tensor subclass (a DTensor, say) that a plain host copy would not restore faithfully."""


@dataclass(frozen=True)
class HostCopy:
    """One checkpoint's state on this rank, in host memory."""

    step: int
    path: str
    states: dict[str, Any]
    """Component key -> a private copy of its state_dict()."""
    metrics: dict[str, Any]
    """The metrics the checkpoint was saved with."""
    nbytes: int
    """Bytes of its tensors."""
    give_back: Callable[[], None] | None = None
    """For a copy an async save staged: hands its buffers back to the coordinator when the copy is dropped."""

    def drop(self) -> None:
        if self.give_back is not None:
            self.give_back()


def _copy_tree(value: Any, sizes: list[int] | None = None) -> Any:
    """A copy of a state dict whose tensors live in (fresh) host memory and share nothing with the original."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise _Unsupported(type(value).__name__)
        out = value.detach().to("cpu", copy=True)
        if sizes is not None:
            sizes.append(out.numel() * out.element_size())
        return out
    if isinstance(value, dict):
        return type(value)((k, _copy_tree(v, sizes)) for k, v in value.items())
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        return type(value)(_copy_tree(v, sizes) for v in value)
    return copy.deepcopy(value)


class HostCopies:
    """The copies this rank keeps, oldest first, within `budget_bytes`."""

    def __init__(self, budget_bytes: int, rank: int):
        self.budget_bytes, self.rank = budget_bytes, rank
        self.copies: list[HostCopy] = []
        self._warned = False

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.copies)

    def steps(self) -> list[int]:
        return [c.step for c in self.copies]

    def keep(self, step: int, path: str, components: Sequence[StateComponent], metrics: Mapping[str, Any],
             vouched_bound: int | None, staged: Staged | None = None) -> bool:
        """Keep every component's state as checkpoint `step`; False when it does not fit (or cannot be copied).
        `vouched_bound`: while a bad run is in progress, the newest step a good observation vouches for (its
        newest copy is never evicted for this one); None when nothing is suspect. `staged`: the (states,
        give_back) an async save staged (`CheckpointCoordinator.take_staged_state`), kept instead of a new copy;
        given back when it is not kept."""
        new = self._adopt(step, path, components, metrics, staged) if staged is not None else None
        if new is None:
            new = self._copy(step, path, components, metrics)
        if new is None:
            return False
        if new.nbytes > self.budget_bytes:
            new.drop()
            self._warn_once(f"one checkpoint's state takes {new.nbytes / MIB:.1f} MiB on this rank, more than "
                            f"rollback_memory_mb={self.budget_bytes / MIB:g}; rollbacks read the checkpoint "
                            "from the disk (raise rollback_memory_mb to keep it in memory)")
            return False
        self._discard([c for c in self.copies if c.step == step])  # a re-save of the step replaces it
        protected = self._protected(vouched_bound)
        while self.nbytes + new.nbytes > self.budget_bytes:
            victims = [c for c in self.copies if c is not protected]
            if not victims:
                new.drop()
                return False
            self._discard(victims[:1])
        self.copies.append(new)
        self.copies.sort(key=lambda c: c.step)
        return True

    def _copy(self, step: int, path: str, components: Sequence[StateComponent], metrics: Mapping[str, Any]
              ) -> HostCopy | None:
        """A private copy of every component's state now; None (with a warning) when it cannot be made."""
        sizes: list[int] = []
        try:
            states = {c.key: _copy_tree(c.state_dict(), sizes) for c in components}
        except _Unsupported as exc:
            self._warn_once(f"the state holds {exc} tensors, which a host copy does not restore faithfully; "
                            "rollbacks read the checkpoint from the disk")
            return None
        except Exception as exc:  # a state that cannot be copied: the disk copy serves (the ranks agree on it)
            self._warn_once(f"could not keep a host copy of step {step} ({exc!r}); rollbacks read the checkpoint "
                            "from the disk")
            return None
        return HostCopy(step, path, states, copy.deepcopy(dict(metrics)), sum(sizes))

    @staticmethod
    def _adopt(step: int, path: str, components: Sequence[StateComponent], metrics: Mapping[str, Any],
               staged: Staged) -> HostCopy | None:
        """The async save's staged state as the copy, when it holds exactly these components (else it is given
        back and None returned: a copy is made instead)."""
        states, give_back = staged
        if set(states) != {c.key for c in components}:
            give_back()
            return None
        sizes: list[int] = []
        _tensor_bytes(states, sizes)
        return HostCopy(step, path, dict(states), copy.deepcopy(dict(metrics)), sum(sizes), give_back)

    def _discard(self, copies: Sequence[HostCopy]) -> None:
        for c in copies:
            self.copies.remove(c)
            c.drop()

    def _protected(self, vouched_bound: int | None) -> HostCopy | None:
        if vouched_bound is None:
            return None
        vouched = [c for c in self.copies if c.step <= vouched_bound]
        return vouched[-1] if vouched else None

    def get(self, step: int) -> HostCopy | None:
        return next((c for c in self.copies if c.step == step), None)

    def forget_after(self, step: int) -> None:
        """Drop the copies newer than `step` (the stretch a rollback abandoned)."""
        self._discard([c for c in self.copies if c.step > step])

    def _warn_once(self, message: str) -> None:
        if not self._warned and self.rank == 0:
            log.warning("recovery: %s", message)
        self._warned = True


def _tensor_bytes(value: Any, sizes: list[int]) -> None:
    """Append the byte size of every tensor in a state tree to `sizes`."""
    if isinstance(value, torch.Tensor):
        sizes.append(value.numel() * value.element_size())
    elif isinstance(value, dict):
        for v in value.values():
            _tensor_bytes(v, sizes)
    elif isinstance(value, list | tuple):
        for v in value:
            _tensor_bytes(v, sizes)


def restore(held: HostCopy, components: Sequence[StateComponent]) -> None:
    """Hand each component a fresh copy of its held state (the held one stays intact for a later rollback).
    Raises KeyError when a component has no held state (it was added after the copy was made)."""
    missing = [c.key for c in components if c.key not in held.states]
    if missing:
        raise KeyError(f"the host copy of step {held.step} has no state for components {missing}")
    if held.give_back is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a staged copy's device-to-host copies were queued, not waited for
    for c in components:
        c.load_state_dict(_copy_tree(held.states[c.key]))
