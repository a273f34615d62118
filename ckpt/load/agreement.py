"""What rank 0 decides from every rank's report in a load, so that no rank needs every other rank's report.

After the read phase: the union of the components asked for and of the optional ones found damaged, and
the ranks that found the checkpoint failing verification (only then do reports name ranks). After the apply
phase: nothing, or the one PartialLoadError every rank raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..comm import Decision
from .applying import apply_failure
from .checks import CheckReport, merged_keys, refusal


@dataclass(frozen=True)
class ReadVerdict:
    """The read phase summed up over every rank (the same on all)."""

    keys: tuple[str, ...] = ()  # components some rank passed to load()
    damaged: tuple[str, ...] = ()  # optional components that failed their checks on some rank (strict=False)
    bad: dict[int, str] = field(default_factory=dict)  # rank -> why the checkpoint failed verification there

    def to_wire(self) -> list:
        return [list(self.keys), list(self.damaged), self.bad]

    @classmethod
    def from_wire(cls, w: list) -> ReadVerdict:
        return cls(tuple(w[0]), tuple(w[1]), {int(r): str(why) for r, why in w[2].items()})


@dataclass(frozen=True)
class CheckVerdict:
    """The check phase summed up over every rank (the same on all): the ranks where the checkpoint failed
    verification, or the missing and unexpected keys per component that strict=False lets through."""

    bad: dict[int, str] = field(default_factory=dict)  # rank -> why the checkpoint failed verification there
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unexpected: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_wire(self) -> list:
        return [self.bad, {k: list(v) for k, v in self.missing.items()},
                {k: list(v) for k, v in self.unexpected.items()}]

    @classmethod
    def from_wire(cls, w: list) -> CheckVerdict:
        return cls({int(r): str(why) for r, why in w[0].items()}, {k: tuple(v) for k, v in w[1].items()},
                   {k: tuple(v) for k, v in w[2].items()})


def decide_check(path: str, results: Sequence[Mapping[str, Any]]) -> Decision:
    """Rank 0: every rank's pre-apply check summed up; raises the one refusal every rank raises when the
    components do not match the checkpoint (so the findings travel to rank 0 only, not to every rank)."""
    bad = {rank: r["bad"] for rank, r in enumerate(results) if r["bad"] is not None}
    if bad:
        return Decision(CheckVerdict(bad).to_wire())
    reports = [CheckReport.from_wire(r["report"]) for r in results]
    refused = refusal(path, reports)
    if refused is not None:
        raise refused
    return Decision(CheckVerdict({}, merged_keys(reports, "missing"), merged_keys(reports, "unexpected")).to_wire())


def decide_read(reports: Sequence[Mapping[str, Any]]) -> Decision:
    """Rank 0: every rank's read report (`Staged.wire()` or a rejection) summed up for all."""
    verdict = ReadVerdict(tuple(sorted({k for r in reports for k in r["keys"]})),
                          tuple(sorted({k for r in reports for k in r["damaged"]})),
                          {rank: r["bad"] for rank, r in enumerate(reports) if r["bad"] is not None})
    return Decision(verdict.to_wire())


def decide_apply(path: str, reports: Sequence[Mapping[str, Any]]) -> Decision:
    """Rank 0: raise the PartialLoadError every rank raises if any rank's `load_state_dict()` failed."""
    if any(r["failed"] is not None for r in reports):
        raise apply_failure(path, reports)
    return Decision()
