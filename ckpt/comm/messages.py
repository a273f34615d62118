"""What crosses ranks during a phase, and the one codec it crosses with.

Every message is a frozen dataclass with `to_wire()` (plain data: None, bool, int, float, str, bytes, lists
and dicts of them) and `from_wire()`; `encode`/`decode` turn messages into bytes with msgpack, and nothing
else does. An error crosses ranks as a `Failure` and is rebuilt as the same class, message and fields on
every rank, so each rank raises the same error.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgpack

from ..errors import REMOTE_ERROR_TYPES, CheckpointError, PartialLoadError, ReplicationError


class Message(Protocol):
    """A frozen dataclass that turns into plain data and back."""

    def to_wire(self) -> Any: ...

    @classmethod
    def from_wire(cls, wire: Any) -> Message: ...


M = TypeVar("M")


def pack(plain: Any) -> bytes:
    """Plain data as bytes (msgpack)."""
    return msgpack.packb(plain, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode(message: Message) -> bytes:
    """A message as bytes."""
    return pack(message.to_wire())


def decode(cls: type[M], data: bytes) -> M:
    """The message of class `cls` that `encode` turned into `data`."""
    return cls.from_wire(unpack(data))  # type: ignore[attr-defined]


# A decision made on rank 0 may raise these too; they keep their class (and fields) on every rank.
_REBUILT_TYPES: dict[str, type[CheckpointError]] = {
    **REMOTE_ERROR_TYPES, ReplicationError.__name__: ReplicationError, PartialLoadError.__name__: PartialLoadError}


@dataclass(frozen=True)
class Failure:
    """An error on its way to every rank: its class name, message, structured fields and failed ranks."""

    type: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        return cls(type(exc).__name__, str(exc), error_fields(exc), dict(getattr(exc, "failures", None) or {}))

    def to_wire(self) -> list:
        return [self.type, self.message, self.fields, self.failures]

    @classmethod
    def from_wire(cls, wire: list) -> Failure:
        return cls(str(wire[0]), str(wire[1]), dict(wire[2]), {int(r): str(e) for r, e in wire[3].items()})

    def rebuild(self) -> CheckpointError:
        """The error itself (a CheckpointError of the same class where ckpt knows it)."""
        cls = _REBUILT_TYPES.get(self.type, CheckpointError)
        kwargs = _init_fields(cls, self.fields)
        if self.failures and _accepts(cls, "failures"):
            kwargs["failures"] = self.failures
        try:
            return cls(self.message, **kwargs)
        except TypeError:  # subclasses with other required fields
            return CheckpointError(self.message, failures=self.failures, path=self.fields.get("path"))


@dataclass(frozen=True)
class Outcome:
    """One rank's result of a phase's local step, or what it raised."""

    result: Any = None
    failure: Failure | None = None

    def to_wire(self) -> list:
        return [self.result, None if self.failure is None else self.failure.to_wire()]

    @classmethod
    def from_wire(cls, wire: list) -> Outcome:
        return cls(wire[0], None if wire[1] is None else Failure.from_wire(wire[1]))


@dataclass(frozen=True)
class Verdict:
    """Rank 0's word to every rank at the end of a phase: what it decided, or the error all must raise.
    `scattered`: a part for each rank follows, sent to that rank only."""

    common: Any = None
    failure: Failure | None = None
    scattered: bool = False

    def to_wire(self) -> list:
        return [self.common, None if self.failure is None else self.failure.to_wire(), self.scattered]

    @classmethod
    def from_wire(cls, wire: list) -> Verdict:
        return cls(wire[0], None if wire[1] is None else Failure.from_wire(wire[1]), bool(wire[2]))


def combined_failure(what: str, phase: str, outcomes: Sequence[Outcome]) -> Failure | None:
    """The one error for every rank when the local step failed on some (named), or None if none did."""
    failed = {r: o.failure for r, o in enumerate(outcomes) if o.failure is not None}
    if not failed:
        return None
    failures = {r: f"{f.type}: {f.message}" for r, f in failed.items()}
    ranks = sorted(failed)
    where = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    details = "; ".join(f"rank {r}: {failures[r]}" for r in ranks[:8])
    if len(ranks) > 8:
        details += f"; ... and {len(ranks) - 8} more"
    message = f"{what} failed on {where} during '{phase}': {details}"
    types = {f.type for f in failed.values()}
    if len(types) > 1:  # mixed failures: no one rank's fields describe them
        return Failure(CheckpointError.__name__, message, {}, failures)
    # The structured fields (component, path, key_path, ...) are the lowest failed rank's, as its message is first.
    first = failed[ranks[0]]
    kind = first.type if first.type in REMOTE_ERROR_TYPES else CheckpointError.__name__
    return Failure(kind, message, first.fields, failures)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception's structured fields (component, path, key_path, ...) that can cross ranks as plain data."""
    return {name: value for name, value in vars(exc).items()
            if not name.startswith("_") and name != "failures" and _is_plain(value)}


def _is_plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool | str | bytes | float):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if depth > 4:
        return False
    if isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _init_fields(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields `cls(message, ...)` takes by keyword (an error rebuilt on another rank gets the same ones)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    accepted = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    accepted -= {"message", "failures"}
    return {n: v for n, v in fields.items() if n in accepted}
