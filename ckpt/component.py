"""What a trainer declares about its state: the component, its sharing pattern, its validation level."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .format.layout import MANIFEST_NAME, PIN_NAME
from .patterns.kinds import SharingPattern, ValidationLevel
from .patterns.placements import placement_for
from .plain_state import RNGState, is_plain, load_into, state_of

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
# A component's folder sits at the checkpoint's root beside these files; a key equal to one of them would make
# every checkpoint look pinned, or break the manifest's write. Compared case-insensitively, since on a
# case-insensitive filesystem (macOS, Windows) `pinned` and `PINNED` are the same file.
RESERVED_KEYS = (MANIFEST_NAME, MANIFEST_NAME + ".tmp", PIN_NAME)


@runtime_checkable
class Stateful(Protocol):
    """Anything with `state_dict()` and `load_state_dict()`, as torch's own `Stateful`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


PatternSpec = SharingPattern | Callable[[], SharingPattern]


@dataclass(frozen=True)
class StateComponent:
    """One piece of trainer state, with how it is shared across ranks.

    `stateful` is a `Stateful` (a module, an optimizer, anything with `state_dict()`/`load_state_dict()`), a dict
    (saved as it is, loaded in place: tensors copied into the existing ones, other values replaced) or a tensor
    (loaded by copying into it); see ckpt/plain_state.py.
    `sharing_pattern` may be a zero-argument callable; it is resolved at every save and the resolved
    pattern is what the manifest records. `validation_level=None` picks the default for the pattern.
    """

    key: str
    stateful: Any
    sharing_pattern: PatternSpec
    process_group_name: str | None = None
    required: bool = True
    validation_level: ValidationLevel | None = None

    def __post_init__(self) -> None:
        self._check_key()
        if not is_plain(self.stateful) and not (callable(getattr(self.stateful, "state_dict", None)) and callable(
            getattr(self.stateful, "load_state_dict", None)
        )):
            raise TypeError(
                f"StateComponent {self.key!r}: stateful={type(self.stateful).__name__} is neither a dict, a tensor, "
                "nor an object with state_dict()/load_state_dict(); pass one of those"
            )
        if not isinstance(self.sharing_pattern, SharingPattern) and not callable(self.sharing_pattern):
            raise TypeError(
                f"StateComponent {self.key!r}: sharing_pattern={self.sharing_pattern!r} must be a "
                "SharingPattern or a zero-argument callable returning one"
            )
        if self.process_group_name is not None and not isinstance(self.process_group_name, str):
            raise TypeError(
                f"StateComponent {self.key!r}: process_group_name={self.process_group_name!r} must be a str "
                "(a name passed in CheckpointCoordinator(process_groups=...)) or None"
            )
        if not isinstance(self.required, bool):
            raise TypeError(f"StateComponent {self.key!r}: required={self.required!r} must be a bool")
        if self.validation_level is not None and not isinstance(self.validation_level, ValidationLevel):
            raise TypeError(
                f"StateComponent {self.key!r}: validation_level={self.validation_level!r} must be a "
                "ValidationLevel or None"
            )
        if isinstance(self.sharing_pattern, SharingPattern):
            self._check_pattern(self.sharing_pattern)

    def _check_key(self) -> None:
        if not isinstance(self.key, str) or not _KEY_RE.match(self.key) or self.key in {".", ".."}:
            raise ValueError(
                f"StateComponent.key={self.key!r} is not usable as a folder name: use 1-128 characters "
                "from letters, digits, '_', '-' and '.', not starting with '.' or '-'"
            )
        if self.key.casefold() in {name.casefold() for name in RESERVED_KEYS}:
            raise ValueError(
                f"StateComponent.key={self.key!r} is the name of a file ckpt keeps at the checkpoint's root "
                f"(reserved, in any letter case: {list(RESERVED_KEYS)}); rename the component, e.g. "
                f"{self.key.replace('.', '_') + '_state'!r}"
            )

    def _check_pattern(self, pattern: SharingPattern) -> None:
        if pattern is SharingPattern.PER_GROUP and not self.process_group_name:
            raise ValueError(
                f"StateComponent {self.key!r}: sharing_pattern=PER_GROUP needs process_group_name, the "
                "name of a group passed to CheckpointCoordinator(process_groups=...)"
            )
        level = self.validation_level
        if level not in (None, ValidationLevel.NONE) and not placement_for(pattern).compares_replicas:
            raise ValueError(
                f"StateComponent {self.key!r}: validation_level={level.value} has nothing to compare "
                f"for sharing_pattern={pattern.name} (one copy per writer); use ValidationLevel.NONE"
            )

    def state_dict(self) -> Any:
        """The state to save: the Stateful's `state_dict()`, the dict itself, or `{"tensor": t}`."""
        return state_of(self.stateful)

    def load_state_dict(self, state: Any, strict: bool = True) -> None:
        """Apply loaded `state`: to a Stateful (a module gets `strict`), or in place into a dict or a tensor."""
        load_into(self.stateful, state, strict)

    def resolve_pattern(self) -> SharingPattern:
        """The pattern in force now: the static one, or what the callable returns."""
        if isinstance(self.sharing_pattern, SharingPattern):
            return self.sharing_pattern
        pattern = self.sharing_pattern()
        if not isinstance(pattern, SharingPattern):
            raise TypeError(
                f"StateComponent {self.key!r}: its sharing_pattern callable returned {pattern!r}, "
                "not a SharingPattern"
            )
        if pattern is SharingPattern.PER_GROUP and not self.process_group_name:
            raise ValueError(
                f"StateComponent {self.key!r}: its sharing_pattern callable chose PER_GROUP but the "
                "component has no process_group_name"
            )
        return pattern

    def resolve_validation(self, pattern: SharingPattern) -> ValidationLevel:
        """The level used for this save; patterns without replicas are never compared."""
        return placement_for(pattern).validation(self.validation_level)


def rng_component(key: str = "rng", required: bool = True) -> StateComponent:
    """The process's random generators (torch, CUDA where present, Python, NumPy) as a PER_RANK component.
    Load it after building data-loader iterators and anything else that draws at construction (see RNGState)."""
    return StateComponent(key, RNGState(), SharingPattern.PER_RANK, required=required)
