"""Calling the callbacks, and turning the stateful ones into checkpoint components keyed by a stable name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckpt import SharingPattern, StateComponent

from .callbacks import EVENTS, TrainerControl, is_stateful
from .keys import CALLBACK_PREFIX


def callback_name(callback: object) -> str:
    """The stable name a stateful callback is saved under: its `state_key`, else its class name."""
    key = getattr(callback, "state_key", None)
    if key is None:
        return type(callback).__name__
    if not isinstance(key, str) or not key:
        raise TypeError(f"callback {type(callback).__name__}: state_key={key!r} must be a non-empty string")
    return key


class CallbackHandler:
    """Holds the callbacks in order and dispatches events to them."""

    def __init__(self, callbacks: Sequence[object] = ()):
        self.callbacks: list[object] = []
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: object) -> None:
        if isinstance(callback, type):
            raise TypeError(f"callbacks: got the class {callback.__name__}; pass an instance, "
                            f"{callback.__name__}(...)")
        if not any(callable(getattr(callback, e, None)) for e in EVENTS):
            raise TypeError(f"callbacks: {type(callback).__name__} has none of the hooks {list(EVENTS)}; "
                            "subclass trainers.callbacks.TrainerCallback")
        if is_stateful(callback):
            name = callback_name(callback)
            clash = [c for c in self.stateful() if callback_name(c) == name]
            if clash:
                raise ValueError(
                    f"callbacks: two stateful callbacks would both be saved as {CALLBACK_PREFIX + name!r} "
                    f"({type(clash[0]).__name__} and {type(callback).__name__}); give each a distinct "
                    "`state_key` attribute (a stable name, not its position in the list)")
        self.callbacks.append(callback)

    def stateful(self) -> list[object]:
        return [cb for cb in self.callbacks if is_stateful(cb)]

    def components(self) -> list[StateComponent]:
        """One component per stateful callback; GLOBAL unless the callback sets `sharing_pattern`."""
        out = []
        for cb in self.stateful():
            out.append(StateComponent(
                CALLBACK_PREFIX + callback_name(cb), cb,
                getattr(cb, "sharing_pattern", SharingPattern.GLOBAL),
                process_group_name=getattr(cb, "process_group_name", None),
                # A callback added after the checkpoint was written starts fresh instead of failing the resume.
                required=False,
            ))
        return out

    def call(self, event: str, args: Any, state: Any, control: TrainerControl, /, **kwargs: Any) -> TrainerControl:
        """Run `event` on every callback in order; a hook may return a TrainerControl to replace `control`."""
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is None:
                continue
            result = hook(args, state, control, **kwargs)
            if isinstance(result, TrainerControl):
                control = result
        return control
