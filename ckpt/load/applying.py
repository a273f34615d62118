"""The last step of a load: handing staged state to the live components, and the one error every rank
raises when a component's `load_state_dict()` fails part way (naming what each rank had applied)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..component import StateComponent
from ..errors import PartialLoadError
from ..format.serialization import flatten_state
from .loading import DeferredRead

log = logging.getLogger("ckpt")


def apply_staged(components: Sequence[StateComponent], staged: Mapping[str, Any], rank: int,
                 strict: bool = True) -> dict[str, Any]:
    """Call each component's `load_state_dict()` with its staged state, in order (a module's with `strict`;
    dicts and tensors in place). Never raises: reports
    the components applied, and the one that failed (with its error), for the exchange between ranks."""
    applied: list[str] = []
    for c in components:
        if c.key in staged:
            state = staged[c.key]
            try:
                if isinstance(state, DeferredRead):  # checked on every rank; its bytes go straight into place
                    state = state.read(flatten_state(c.state_dict(), c.key).tensors)
            except Exception as exc:
                log.debug("rank %d: reading %r into place failed", rank, c.key, exc_info=True)
                return {"applied": applied, "failed": c.key,
                        "error": f"reading its files into the live tensors failed: {type(exc).__name__}: {exc}"}
            try:
                c.load_state_dict(state, strict)
            except Exception as exc:
                log.debug("rank %d: load_state_dict() of %r failed", rank, c.key, exc_info=True)
                return {"applied": applied, "failed": c.key,
                        "error": f"load_state_dict() raised {type(exc).__name__}: {exc}"}
            applied.append(c.key)
    return {"applied": applied, "failed": None, "error": None}


def apply_failure(path: str, reports: Sequence[Mapping[str, Any]]) -> PartialLoadError:
    """One error for every rank: which component failed where, and what each rank had applied by then."""
    failed = {r: rep for r, rep in enumerate(reports) if rep["failed"] is not None}
    where = ", ".join(f"rank {r}: component {rep['failed']!r}: {rep['error']}"
                      for r, rep in list(failed.items())[:8])
    applied = {r: tuple(rep["applied"]) for r, rep in enumerate(reports)}
    state = "; ".join(f"rank {r}: {list(keys)}" + (f", then {reports[r]['failed']!r} failed and may be partly "
                                                   "changed" if r in failed else " (all)")
                      for r, keys in list(applied.items())[:8])
    return PartialLoadError(
        f"load of {path} failed while applying state ({where}). Components applied before the failure: {state}; "
        "nothing else was changed. The live state now mixes loaded and earlier values: load again before "
        "training on", applied=applied, failures={r: f"{rep['failed']}: {rep['error']}" for r, rep in failed.items()},
        path=path)
