"""What a trainer adds around the coordinator's save and load.

- A resume target typed on a command line ("3") means step 3 unless a folder of that name exists (the
  coordinator's own rule for `load(checkpoint="3")`).
- Callbacks may come and go between runs: state of a callback this run no longer has is read and dropped
  (with a warning), and a callback the checkpoint does not know starts fresh (with a warning). Every other
  component is loaded strictly.
- With `on_save_error="warn"` a save that failed on every rank is logged and recorded, and training goes on.
- A checkpoint no trainer wrote (`ckpt import` of a torch.save file, a DCP or a Hugging Face folder) holds the
  model, and the optimizer where the source had one, but no trainer state: those load (a weight the source stored
  once because it is tied to another, as Hugging Face does, is accepted when the live model ties it too) and the
  rest starts fresh at the checkpoint's step (`warm_start`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CollectiveTimeoutError,
    LoadResult,
    ReplicationError,
    SerializationError,
    StateComponent,
)

from .keys import CALLBACK_PREFIX, MODEL, TRAINER_STATE
from .rng import set_seed

log = logging.getLogger("trainers")

SAVE_ERROR_KIND = "save_error"  # the kind of its line in metrics.jsonl, and the key in the log history
# A save that fails for these would fail the same way every time, or means the replicas already differ:
# training on would only hide it. A timeout is not raised on every rank alike (a stalled rank is still inside
# the save), and it leaves the coordinator unusable: going on would pair the ranks' collectives wrongly.
_ALWAYS_RAISE = (ReplicationError, SerializationError, CollectiveTimeoutError)


def resume_target(value: Any, run_dir: str, exists: Callable[[str], bool]) -> Any:
    """`value` as the coordinator takes it: a digit string such as "3" (from a CLI) is step 3, unless a path of
    that name exists (as given, or inside the run dir)."""
    if isinstance(value, str) and value.isdigit() and not exists(value) and not exists(os.path.join(run_dir, value)):
        return int(value)
    return value


class _Discard:
    """Stands in for a callback whose state the checkpoint holds but this run does not have: reads it, keeps
    nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def load_components(coordinator: CheckpointCoordinator, components: Sequence[StateComponent],
                    checkpoint: str | int, *, rank: int) -> LoadResult:
    """Load `components` strictly from `checkpoint` (collective), except for callback state on either side."""
    # Resolves the checkpoint on rank 0 and reads its manifest on every rank; applies nothing.
    probe = coordinator.load([], checkpoint=checkpoint, strict=False)
    manifest = probe.manifest
    if manifest is not None and TRAINER_STATE not in manifest.components:
        return _load_imported(coordinator, components, probe, rank=rank)
    live = {c.key for c in components}
    # A resume is strict about the trainer's own components: state the run no longer declares is an error,
    # found from the manifest before anything is read.
    extra = sorted(k for k in (manifest.components if manifest else {}) if k not in live
                   and not k.startswith(CALLBACK_PREFIX))
    if extra:
        raise CheckpointError(f"checkpoint {probe.path} holds components {extra} that no rank passed to load(); "
                              "declare them in get_state_components(), or load that checkpoint with "
                              "CheckpointCoordinator.load() directly to take a subset", path=probe.path)
    gone = sorted(k for k in (manifest.components if manifest else {}) if k.startswith(CALLBACK_PREFIX)
                  and k not in live)
    stand_ins = [StateComponent(k, _Discard(), manifest.components[k].pattern,
                                process_group_name=manifest.components[k].process_group, required=False)
                 for k in gone]
    result = coordinator.load([*components, *stand_ins], checkpoint=probe.path)
    new = [k for k in result.skipped if k.startswith(CALLBACK_PREFIX) and k in live]
    if rank == 0 and gone:
        log.warning("%s holds state of callbacks %s that this run does not have; ignoring it (the other "
                    "components load as usual)", result.path, [k[len(CALLBACK_PREFIX):] for k in gone])
    if rank == 0 and new:
        log.warning("%s has no state for callbacks %s (added since it was saved); they start fresh",
                    result.path, [k[len(CALLBACK_PREFIX):] for k in new])
    return result


class TiedAware:
    """A module's state for a checkpoint that stores each tied weight once: `state_dict()` leaves out a tensor that
    is the same tensor as an earlier one, and `load_state_dict()` accepts its absence (the live tie fills it)."""

    def __init__(self, module: Any):
        self.module = module

    def _aliases(self) -> dict[str, str]:
        seen: dict[tuple, str] = {}
        out = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if ident in seen and t.numel():
                out[name] = seen[ident]
            else:
                seen.setdefault(ident, name)
        return out

    def state_dict(self) -> dict[str, Any]:
        aliases = self._aliases()
        return {k: v for k, v in self.module.state_dict().items() if k not in aliases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        aliases, own = self._aliases(), self.module.state_dict()
        missing = sorted(k for k in own if k not in state and not (k in aliases and aliases[k] in state))
        unexpected = sorted(k for k in state if k not in own)
        if missing or unexpected:
            raise ValueError(f"model: the checkpoint lacks {missing[:5]} and holds unknown {unexpected[:5]}; it was "
                             "saved from another model")
        self.module.load_state_dict(state, strict=False)


def _load_imported(coordinator: CheckpointCoordinator, components: Sequence[StateComponent], probe: LoadResult,
                   *, rank: int) -> LoadResult:
    """Load what a checkpoint no trainer wrote holds (its model, and optimizer where present)."""
    held = set(probe.manifest.components) if probe.manifest else set()
    chosen = [StateComponent(c.key, TiedAware(c.stateful), c.sharing_pattern, c.process_group_name)
              if c.key == MODEL and hasattr(c.stateful, "named_parameters") else c
              for c in components if c.key in held]
    result = coordinator.load(chosen, checkpoint=probe.path)
    if rank == 0:
        fresh = sorted({c.key for c in components} - held)
        log.warning("%s holds no trainer state (it was imported, not written by a trainer): loaded %s; %s start "
                    "fresh at step %d", result.path, list(result.loaded), fresh, result.step)
    return result


def warm_start(trainer: Any, result: LoadResult) -> None:
    """After loading a checkpoint without trainer state: continue at its step, with the learning-rate schedule
    advanced to that step and the random streams seeded as a fresh run's."""
    set_seed(trainer.args.seed)
    trainer.state.global_step = result.step
    scheduler = trainer.lr_scheduler
    if scheduler is not None and result.step:
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no step is taken here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(result.step):
                scheduler.step()


def tolerates(on_save_error: str, exc: BaseException, coordinator: CheckpointCoordinator) -> bool:
    """Whether a save's error is logged and training goes on (on_save_error="warn"), rather than raised: only
    an error every rank raised alike, with the coordinator still usable for the next save."""
    return (on_save_error == "warn" and isinstance(exc, CheckpointError) and not isinstance(exc, _ALWAYS_RAISE)
            and coordinator.usable)


def save_failure_entry(step: int, exc: BaseException, *, rank: int, latest: Any) -> dict[str, Any]:
    """Warn (rank 0) about a save that failed on every rank; the entry to record in the log history."""
    if rank == 0:
        kept = f"the newest checkpoint is still {latest.path}" if latest is not None else "no checkpoint exists yet"
        log.warning("save of step %d failed on every rank; training goes on (on_save_error='warn'), %s: %s: %s",
                    step, kept, type(exc).__name__, exc)
    return {"step": step, SAVE_ERROR_KIND: f"{type(exc).__name__}: {exc}"}
