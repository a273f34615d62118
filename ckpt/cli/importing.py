"""`ckpt import SRC RUN_DIR --step N`: a checkpoint from another format as a committed ckpt checkpoint.

Sources (told apart by what SRC is):
- a `torch.save` file, read with `torch.load(weights_only=True)` (no code runs);
- a `torch.distributed.checkpoint` (DCP) folder (it holds `.metadata`), read in this one process; its pickled
  metadata is read by an unpickler that admits only DCP's own metadata classes, and its non-tensor values with
  `weights_only=True`;
- a Hugging Face model folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`.

What goes in: the source's state is split into the component names the trainers use (trainers/keys.py):
`model` (a model state dict: every tensor of an HF folder; a torch.save / DCP state whose values are all tensors;
or the entry under `model`, `state_dict`, `model_state_dict` or `module`) and, when the source has one,
`optimizer` (the entry under `optimizer`, `optimizer_state_dict` or `optim`, in `torch.optim` form; an optimizer
state keyed by parameter name, as DCP's `get_optimizer_state_dict` writes it, is renumbered in the order of its
param_groups). Other entries are left out and listed. `--model-key` / `--optimizer-key` name the entries instead.
Both are saved as GLOBAL components by a coordinator of one process, so the checkpoint is committed as any save
is (manifest, digests, retention); `ckpt verify` checks it, and a trainer resumes from it (docs/migration.md).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..component import SharingPattern, StateComponent
from ..coordinator import CheckpointCoordinator
from ..errors import CheckpointError
from .export_formats import HF_INDEX, HF_SINGLE
from .inspection import tensors_in

MODEL, OPTIMIZER = "model", "optimizer"  # the keys trainers give these components
MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
DCP_METADATA = ".metadata"


def source_kind(src: str) -> str:
    """"torch", "dcp" or "hf" for what `src` is, or an error saying what it is not."""
    if os.path.isfile(src):
        return "torch"
    if not os.path.isdir(src):
        raise CheckpointError(f"{src} does not exist", path=src)
    if os.path.exists(os.path.join(src, DCP_METADATA)):
        return "dcp"
    if os.path.exists(os.path.join(src, HF_SINGLE)) or os.path.exists(os.path.join(src, HF_INDEX)):
        return "hf"
    raise CheckpointError(f"{src} is a folder but neither a DCP checkpoint (no {DCP_METADATA}) nor a Hugging Face "
                          f"model folder (no {HF_SINGLE} or {HF_INDEX}); pass a torch.save file, a DCP folder or "
                          "an HF folder", path=src)


# ---- readers -----------------------------------------------------------------------------------------

def _numpy_globals() -> list[Any]:
    """What a pickled NumPy array needs, beyond weights_only's defaults: its constructor and dtype classes (an array's
    values are bytes; no code of the file's choosing runs)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            *(c for c in vars(np.dtypes).values() if isinstance(c, type))]


def _safe_load(source: Any, **kwargs: Any) -> Any:
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)


def read_torch(path: str) -> Any:
    """A torch.save file's contents, loaded with weights_only=True (tensors, containers, numbers, strings, NumPy
    arrays)."""
    try:
        try:
            return _safe_load(path, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be mapped
                raise CheckpointError(f"{path} cannot be read as a torch.save file with weights_only=True: "
                                      f"{str(exc).splitlines()[0]}", path=path) from None
        return _safe_load(path)
    except pickle.UnpicklingError as exc:
        raise _refused(path, str(exc)) from None


def _refused(path: str, text: str) -> CheckpointError:
    """The one error for a file weights_only refuses: objects that need code to rebuild, or no torch.save file."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return CheckpointError(f"{path} holds objects torch.load(weights_only=True) refuses (it would have to run "
                               f"code to rebuild them): {found.group(1)}. Save plain state dicts, e.g. "
                               "torch.save({'model': model.state_dict()}, path)", path=path)
    why = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |$)", text)
    return CheckpointError(f"{path} is not a torch.save file that torch.load(weights_only=True) can read"
                           f"{f' ({why.group(1)})' if why else ''}; pass a torch.save file, a DCP folder or a "
                           "Hugging Face model folder", path=path)


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset")}


def _is_metadata_class(obj: Any) -> bool:
    """DCP's metadata records are dataclasses and enums; nothing else of its modules belongs in `.metadata`."""
    return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata classes, torch sizes and dtypes, and nothing else. Dotted names are refused: pickle
    would follow them through a module's imports (`filesystem` + `os.system` is `os.system`)."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in _DCP_GLOBALS or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            if module in _DCP_MODULES and _is_metadata_class(found := super().find_class(module, name)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata; refusing to load it")


def read_dcp(path: str) -> dict[str, Any]:
    """Every value of a DCP checkpoint, in this process (no process group), without running pickled code."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException as CheckAPIError
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    metadata = _read_dcp_metadata(path)

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    class Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._nested_dict import set_element

            loaded = _safe_load(value)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    state: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            _load_state_dict(state, storage_reader=Reader(path), planner=Planner(), no_dist=True)
        except CheckAPIError as exc:  # DCP wraps each rank's error; this process is the only rank
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise CheckpointError(f"{path}: DCP could not read it: {lines[-1] if lines else exc}", path=path) from None
    return state


def _read_dcp_metadata(path: str) -> Any:
    with open(os.path.join(path, DCP_METADATA), "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise CheckpointError(f"{path}/{DCP_METADATA} is not DCP metadata this import reads: {exc}",
                                  path=path) from None
    if not hasattr(metadata, "state_dict_metadata"):
        raise CheckpointError(f"{path}/{DCP_METADATA} holds a {type(metadata).__name__}, not DCP metadata", path=path)
    metadata.storage_meta = getattr(metadata, "storage_meta", None)
    return metadata


def read_hf(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder (one file, or the shards its index lists)."""
    from safetensors.torch import load_file

    index = os.path.join(path, HF_INDEX)
    if not os.path.exists(index):
        return load_file(os.path.join(path, HF_SINGLE))
    with open(index, encoding="utf-8") as f:
        try:
            weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map): {exc}",
                                  path=index) from None
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        if os.path.basename(name) != name:
            raise CheckpointError(f"{index} names {name!r}, which is not a file in {path}", path=index)
        tensors.update(load_file(os.path.join(path, name)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index} lists tensors {missing[:5]} that its files do not hold", path=index)
    return {name: tensors[name] for name in weight_map}


# ---- splitting into components --------------------------------------------------------------------------

def split_state(state: Any, model_key: str | None = None, optimizer_key: str | None = None
                ) -> tuple[dict[str, Any], list[str]]:
    """({component: state}, the source's entries left out) following this module's docstring."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"the source holds a {type(state).__name__}, not a state dict")
    if model_key is None and optimizer_key is None and state and all(
            isinstance(v, torch.Tensor) for v in state.values()):
        return {MODEL: dict(state)}, []
    mkey = model_key or next((k for k in MODEL_KEYS if k in state), None)
    okey = optimizer_key or next((k for k in OPTIMIZER_KEYS if k in state), None)
    for flag, key in (("--model-key", model_key), ("--optimizer-key", optimizer_key)):
        if key is not None and key not in state:
            raise CheckpointError(f"{flag} {key}: the source has no entry {key!r}; it has {sorted(map(str, state))}")
    if mkey is None or not isinstance(state[mkey], Mapping):
        raise CheckpointError(f"cannot tell which entry of the source is the model: it has {sorted(map(str, state))[:12]}"
                              f"; name it with --model-key K (looked for {', '.join(MODEL_KEYS)})")
    out = {MODEL: dict(state[mkey])}
    if okey is not None:
        out[OPTIMIZER] = torch_optimizer_form(state[okey], okey)
    return out, sorted(str(k) for k in state if k not in (mkey, okey))


def torch_optimizer_form(opt: Any, where: str) -> dict[str, Any]:
    """An optimizer state dict as torch.optim's load_state_dict takes it (parameters numbered in group order)."""
    if not (isinstance(opt, Mapping) and "state" in opt and "param_groups" in opt):
        raise CheckpointError(f"entry {where!r} is not an optimizer state dict (with 'state' and 'param_groups')")
    params = [p for g in opt["param_groups"] for p in g["params"]]
    if all(isinstance(p, int) for p in params):  # DCP gives the numbered state's keys back as strings
        state = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in opt["state"].items()}
        return {"state": state, "param_groups": [dict(g) for g in opt["param_groups"]]}
    number = {p: i for i, p in enumerate(params)}
    return {"state": {number[k]: v for k, v in opt["state"].items() if k in number},
            "param_groups": [{**g, "params": [number[p] for p in g["params"]]} for g in opt["param_groups"]]}


# ---- the import ------------------------------------------------------------------------------------------

def import_checkpoint(src: str, run_dir: str, step: int, *, model_key: str | None = None,
                      optimizer_key: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Read `src` and save it as checkpoint `step` of `run_dir` (committed, with a manifest)."""
    src = os.fspath(src)
    kind = source_kind(src)
    raw = read_hf(src) if kind == "hf" else read_dcp(src) if kind == "dcp" else read_torch(src)
    components, left_out = split_state(raw, model_key, optimizer_key)
    if kind == "hf":
        left_out = sorted(n for n in os.listdir(src) if not n.endswith(".safetensors") and n != HF_INDEX)
    plain = {key: _plain_tensors(value) for key, value in components.items()}
    with CheckpointCoordinator(run_dir) as coordinator:
        path = coordinator.save(step, [StateComponent(key, value, SharingPattern.GLOBAL)
                                       for key, value in plain.items()], overwrite=overwrite)
    return {"source": src, "source_format": kind, "checkpoint": path, "step": step, "components": sorted(plain),
            "tensors": {key: sum(1 for _ in tensors_in(v)) for key, v in plain.items()},
            "left_out": left_out}


def _plain_tensors(value: Any) -> Any:
    """Tensors as plain CPU tensors with storage of their own (a mapped file's are copied out of it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    if isinstance(value, Mapping):
        return {k: _plain_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_tensors(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_tensors(v) for v in value)
    return value



def add_import_command(command: Any) -> None:
    """Register `ckpt import` with main's `command(name, func, help)` helper."""
    p = command("import", cmd_import, "save a torch.save file, DCP folder or Hugging Face folder as a ckpt checkpoint")
    p.add_argument("source", metavar="SRC", help="a torch.save file, a DCP checkpoint folder or a Hugging Face folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run dir to add the checkpoint to (created if missing)")
    p.add_argument("--step", type=int, required=True, help="the step the checkpoint is saved as")
    p.add_argument("--model-key", metavar="K", help="the source's entry that is the model state dict")
    p.add_argument("--optimizer-key", metavar="K", help="the source's entry that is the optimizer state dict")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint of that step")


def cmd_import(args: Any) -> int:
    if args.step < 0:
        raise ValueError(f"--step {args.step}: a step is 0 or more")
    r = import_checkpoint(args.source, args.run_dir, args.step, model_key=args.model_key,
                          optimizer_key=args.optimizer_key, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    comps = ", ".join(f"{k} ({r['tensors'][k]} tensors)" for k in r["components"])
    print(f"imported {r['source']} ({r['source_format']}) as {r['checkpoint']}: {comps}")
    if r["left_out"]:
        print(f"left out: {', '.join(r['left_out'])}")
    return 0
