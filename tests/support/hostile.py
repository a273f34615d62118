"""A small committed checkpoint to damage, live targets that show a refused load changed nothing, and ways to
rewrite a checkpoint as a hostile writer would (the manifest kept self-consistent), and the decoder that the
hostile value-file test runs in a child process."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import xxhash

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from ckpt.format.layout import MANIFEST_NAME
from ckpt.format.manifest import DIGEST_FIELD, content_digest
from ckpt.format.serialization import unflatten_state
from tests.support.workers import Box

SENTINEL = {"untouched": torch.tensor([42])}


def saved_state() -> dict[str, dict]:
    return {"model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(4)},
            "extra": {"step": 7, "note": "hello", "t": torch.tensor([1, 2], dtype=torch.int64)}}


def make_checkpoint(run_dir) -> str:
    """A committed checkpoint with a replicated model and a global non-tensor-heavy component."""
    state = saved_state()
    with CheckpointCoordinator(run_dir) as coord:
        return coord.save(7, [StateComponent("model", Box(state["model"]), SharingPattern.REPLICATED),
                              StateComponent("extra", Box(state["extra"]), SharingPattern.GLOBAL)])


def targets(extra_required: bool = True) -> list[StateComponent]:
    """Live components holding a sentinel, to show a refused load changed nothing."""
    return [StateComponent("model", Box(dict(SENTINEL)), SharingPattern.REPLICATED),
            StateComponent("extra", Box(dict(SENTINEL)), SharingPattern.GLOBAL, required=extra_required)]


def untouched(comps: list[StateComponent]) -> bool:
    return all(list(c.stateful.state) == ["untouched"] for c in comps)


def load(ckpt_dir: str, comps: list[StateComponent], **kwargs):
    with CheckpointCoordinator(os.path.dirname(ckpt_dir)) as coord:
        return coord.load(comps, checkpoint=ckpt_dir, **kwargs)


def load_latest(run_dir, comps: list[StateComponent]):
    with CheckpointCoordinator(run_dir) as coord:
        return coord.load(comps)


def rewrite_manifest(ckpt_dir: str, mutate: Callable[[dict], None], redigest: bool = True) -> None:
    """Change the manifest as a hostile writer would: consistently, with its own digest recomputed."""
    path = os.path.join(ckpt_dir, MANIFEST_NAME)
    with open(path) as f:
        data = json.load(f)
    mutate(data)
    if redigest and DIGEST_FIELD in data:
        data[DIGEST_FIELD] = content_digest(data)
    with open(path, "w") as f:
        json.dump(data, f)


def replace_file(ckpt_dir: str, relpath: str, data: bytes) -> None:
    """Put `data` where a checkpoint file was, and make the manifest agree on its size and digest."""
    with open(os.path.join(ckpt_dir, relpath), "wb") as f:
        f.write(data)

    def fix(d: dict) -> None:
        for c in d["components"].values():
            for entry in c["files"]:
                if entry["path"] == relpath:
                    entry["nbytes"], entry["xxh3_128"] = len(data), xxhash.xxh3_128_hexdigest(data)

    rewrite_manifest(ckpt_dir, fix)


def file_entry(d: dict, key: str = "model", kind: str = "tensors") -> dict:
    """The first file entry of component `key` with this kind, in a parsed manifest."""
    return next(f for f in d["components"][key]["files"] if f["kind"] == kind)


def decode_all(folder: str) -> None:
    """(Child process.) Decode every file in `folder`; print one JSON line per file: error type and message."""
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        try:
            unflatten_state(data, {"b": torch.ones(2), "a/1/1/b": torch.ones(2)}, "c", source=name)
            out = {"file": name, "type": None}
        except Exception as exc:
            out = {"file": name, "type": type(exc).__name__, "message": str(exc),
                   "key_path": getattr(exc, "key_path", None)}
        print(json.dumps(out), flush=True)
