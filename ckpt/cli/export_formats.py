"""`ckpt export --format hf|dcp|torch`: a checkpoint in the formats other tools read.

- `hf`: the Hugging Face layout of one component (the model by default): `model.safetensors`, or
  `model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json` (`metadata.total_size`, `weight_map`)
  when it exceeds `--max-shard-size`. Tensors are full (reassembled from any pattern, ckpt/cli/assemble.py) and
  named as in the model's state dict. Each file is written tensor by tensor, each tensor read from the
  checkpoint just before it is written, so memory stays near the largest tensor, not the model. A tied weight
  (`lm_head.weight` by default, `--tie NAME` for others) that is bit for bit another tensor of the same dtype
  and shape is stored once, under the other name, as `save_pretrained` does; loading re-ties it.
- `torch`: one `torch.save` file of the full state: `{component: state}` for every component, or the state of
  `--component K` alone (what `module.load_state_dict` takes).
- `dcp`: the same state as a `torch.distributed.checkpoint` folder (`dcp.load` reads it).
For torch and dcp the state is read whole; a component whose copies differ (per-rank RNG streams, say) has no
single value and is left out (named in the result); export one copy with `--format safetensors --rank R`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import CheckpointError
from ..format.tensor_io import DTYPE_TO_ST, tensor_bytes
from ..load.reshard import is_shard_entry, read_merged
from ..patterns.base import tensor_layout_for
from ..retention.catalog import human_size
from .assemble import PlannedTensor, TensorReader, plan_component
from .inspection import Opened, tensors_in

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_HF_SHARD = "model-{:05d}-of-{:05d}.safetensors"
_HF_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
DEFAULT_TIES = ("lm_head.weight",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ALIGN = 8


def parse_size(text: str) -> int:
    """A size such as `5GB`, `500MB`, `2GiB` or `1000000` (bytes) as a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r} is not a size; write it like 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


# ---- Hugging Face ----------------------------------------------------------------------------------

def export_hf(ck: Opened, output: str, *, component: str = "model", max_shard_size: int = 5 * 10**9,
              dtype: torch.dtype | None = None, ties: Sequence[str] = DEFAULT_TIES) -> dict[str, Any]:
    """Write component `component` of `ck` into folder `output` in the Hugging Face layout."""
    plan = plan_component(ck, component)
    reader = TensorReader(ck, component)
    tied = find_ties(plan.tensors, reader, ties)
    source = {t.name: t for t in plan.tensors}
    tensors = [_cast_plan(t, dtype) for t in plan.tensors if t.name not in tied]
    for t in tensors:
        if t.dtype not in DTYPE_TO_ST:
            raise CheckpointError(f"component {component!r}: tensor {t.name!r} is {t.dtype}, which safetensors cannot "
                                  "hold; pass --dtype float32 (or bfloat16, float16) to convert floating tensors",
                                  path=ck.path)
    shards = split_shards(tensors, max_shard_size)
    names = [HF_SINGLE] if len(shards) == 1 else [_HF_SHARD.format(i + 1, len(shards)) for i in range(len(shards))]
    os.makedirs(output, exist_ok=True)
    token = secrets.token_hex(4)
    for name, shard in zip(names, shards, strict=True):
        _write_streaming(os.path.join(output, name), shard, reader, source, token)
    total = sum(t.nbytes for t in tensors)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard}}
        _replace_file(os.path.join(output, HF_INDEX), json.dumps(index, indent=2).encode() + b"\n", token)
    stale = [n for n in os.listdir(output) if _HF_WEIGHTS.match(n) and n not in names and
             not (n == HF_INDEX and len(shards) > 1)]
    for n in stale:  # a previous export's files that the new set replaces
        os.remove(os.path.join(output, n))
    return {"output": output, "format": "hf", "component": component, "pattern": plan.pattern.value,
            "step": ck.manifest.step, "files": names + ([HF_INDEX] if len(shards) > 1 else []),
            "tensors": len(tensors), "total_size": total, "tied": tied, "removed_stale": sorted(stale),
            "left_out_non_tensor": list(plan.non_tensor),
            "dtype": str(dtype).removeprefix("torch.") if dtype else None}


def find_ties(tensors: Sequence[PlannedTensor], reader: TensorReader, ties: Sequence[str]) -> dict[str, str]:
    """{name: the earlier tensor it is bit for bit equal to} for each of `ties` that has such a twin."""
    out: dict[str, str] = {}
    for name in ties:
        t = next((x for x in tensors if x.name == name), None)
        if t is None:
            continue
        twins = [x for x in tensors if x.name != name and x.name not in ties and x.name not in out
                 and (x.dtype, x.shape) == (t.dtype, t.shape)]
        if not twins:
            continue
        value = reader.materialize(t).reshape(-1).view(torch.uint8)
        for x in twins:
            if torch.equal(value, reader.materialize(x).reshape(-1).view(torch.uint8)):
                out[name] = x.name
                break
    return out


def _cast_plan(t: PlannedTensor, dtype: torch.dtype | None) -> PlannedTensor:
    if dtype is None or not t.dtype.is_floating_point or t.dtype == dtype:
        return t
    return PlannedTensor(t.name, dtype, t.shape, t.pieces)


def split_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors in order, cut into files of at most `max_bytes` (a larger tensor gets a file of its own), as
    Hugging Face shards them."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_streaming(path: str, tensors: list[PlannedTensor], reader: TensorReader,
                     source: Mapping[str, PlannedTensor], token: str) -> None:
    """A safetensors file whose header is known from the plan; each tensor is read, written and let go in turn."""
    ordered = sorted(tensors, key=lambda t: -torch.empty(0, dtype=t.dtype).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    tmp = f"{path}.{token}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for t in ordered:
                value = reader.materialize(source[t.name]).to(t.dtype)
                f.write(tensor_bytes(value))
                del value
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _replace_file(path: str, data: bytes, token: str) -> None:
    tmp = f"{path}.{token}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- torch.save and DCP ------------------------------------------------------------------------------

def full_state(ck: Opened, component: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """{component: its state, whole} for every component (or just `component`), and {left-out component: why}."""
    keys = [component] if component is not None else sorted(ck.manifest.components)
    state, left_out = {}, {}
    for key in keys:
        entry = ck.manifest.components.get(key)
        if entry is None:
            raise CheckpointError(f"{ck.path} has no component {key!r}; it has {sorted(ck.manifest.components)}",
                                  path=ck.path)
        try:
            placement = tensor_layout_for(entry.pattern)
            if placement is not None:  # one copy, read whole (no live state: every tensor is its full box)
                state[key] = placement.read(ck.storage, ck.path, key, entry, None, True, 1)
            else:
                state[key] = _whole(read_merged(ck.storage, ck.path, key, entry, verify=True), key)
        except CheckpointError as exc:
            if component is not None:
                raise
            copies = len({f.owner for f in entry.files})
            left_out[key] = (f"its {copies} {entry.pattern.name} copies hold different values, so there is no one "
                             f"state to write; export a copy with `ckpt export --component {key} --rank R` "
                             f"({str(exc).split(': ', 1)[-1].split(', so ')[0]})")
    return state, left_out


def _whole(value: Any, key: str, path: str = "") -> Any:
    """`value` with every shard entry replaced by its tensor (it must cover the full tensor by now)."""
    if is_shard_entry(value):
        local, shape = value["local"], list(value["global_shape"])
        if list(local.shape) != shape:
            raise CheckpointError(f"component {key!r}: key {path!r} holds only a shard {list(local.shape)} of "
                                  f"{shape} and no other copy completes it")
        return local
    if isinstance(value, Mapping):
        return type(value)((k, _whole(v, key, f"{path}/{k}")) for k, v in value.items())
    if isinstance(value, list):
        return [_whole(v, key, f"{path}/{i}") for i, v in enumerate(value)]
    return value


def export_torch(ck: Opened, output: str, component: str | None = None) -> dict[str, Any]:
    """One torch.save file of the full state (replaced atomically)."""
    state, left_out = full_state(ck, component)
    tmp = f"{output}.{secrets.token_hex(4)}.tmp"
    try:
        torch.save(state[component] if component is not None else state, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _result(ck, output, "torch", state, left_out, component)


def export_dcp(ck: Opened, output: str, component: str | None = None) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder of the full state, written by this one process."""
    import torch.distributed.checkpoint as dcp

    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CheckpointError(f"-o {output} exists and is not an empty folder; DCP writes a folder of its own, give "
                              "a new path", path=output)
    state, left_out = full_state(ck, component)
    tmp = f"{output.rstrip(os.sep)}.{secrets.token_hex(4)}.tmp"
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state[component] if component is not None else state, checkpoint_id=tmp, no_dist=True)
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _result(ck, output, "dcp", state, left_out, component)


def _result(ck: Opened, output: str, fmt: str, state: dict, left_out: dict, component: str | None) -> dict[str, Any]:
    tensors = sum(1 for v in tensors_in(state))
    return {"output": output, "format": fmt, "step": ck.manifest.step, "components": sorted(state),
            "whole_file_is": component, "tensors": tensors, "nbytes": sum(t.numel() * t.element_size()
                                                                          for t in tensors_in(state)),
            "left_out": left_out}



__all__ = ["DEFAULT_TIES", "DTYPES", "HF_INDEX", "HF_SINGLE", "export_dcp", "export_hf", "export_torch",
           "find_ties", "full_state", "parse_size", "split_shards"]


# ---- the command line ------------------------------------------------------------------------------

def add_format_flags(p: Any) -> None:
    """The options of `ckpt export` for --format hf|dcp|torch."""
    p.add_argument("--format", choices=("safetensors", "hf", "dcp", "torch"), default="safetensors",
                   help="safetensors: one component as one file (default); hf: a Hugging Face model folder; dcp: a "
                        "torch.distributed.checkpoint folder; torch: one torch.save file of the full state")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="hf: the largest weight file, e.g. 5GB, 500MB (larger models get model-0000k-of-0000N files "
                        "and model.safetensors.index.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="hf: convert floating tensors to this dtype")
    p.add_argument("--tie", action="append", metavar="NAME",
                   help="hf: a tied weight stored once when it equals another tensor bit for bit (repeatable; "
                        f"default: {', '.join(DEFAULT_TIES)})")
    p.add_argument("--no-tie", action="store_true", help="hf: store every tensor, tied or not")


def run_format(ck: Opened, args: Any) -> dict[str, Any]:
    """`ckpt export --format hf|dcp|torch` with the parsed options."""
    output = os.fspath(args.output)
    picked = [flag for flag in ("rank", "group", "node", "concat_dim") if getattr(args, flag, None) is not None]
    if picked:
        raise CheckpointError(f"--{picked[0].replace('_', '-')} picks a copy for --format safetensors; --format "
                              f"{args.format} puts every copy together into the full state (leave it out)")
    if args.format == "hf":
        ties = () if args.no_tie else tuple(args.tie or DEFAULT_TIES)
        return export_hf(ck, output, component=args.component or "model", max_shard_size=parse_size(args.max_shard_size),
                         dtype=DTYPES[args.dtype] if args.dtype else None, ties=ties)
    if os.path.isdir(output) and args.format == "torch":
        raise CheckpointError(f"-o {output} is a folder; give a file name such as {os.path.join(output, 'state.pt')}")
    return (export_torch if args.format == "torch" else export_dcp)(ck, output, args.component)


def result_lines(r: dict[str, Any]) -> list[str]:
    """What `ckpt export --format ...` prints."""
    if r["format"] == "hf":
        lines = [f"wrote {r['output']} (Hugging Face layout): {', '.join(r['files'])}; {r['tensors']} tensors, "
                 f"{human_size(r['total_size'])} (component {r['component']!r}, {r['pattern']}, step {r['step']})"]
        lines += [f"tied: {name} is stored once, as {twin}" for name, twin in r["tied"].items()]
        if r["left_out_non_tensor"]:
            lines.append(f"left out {len(r['left_out_non_tensor'])} non-tensor values: "
                         + ", ".join(r["left_out_non_tensor"][:8]))
        if r["removed_stale"]:
            lines.append(f"removed weight files of an earlier export: {', '.join(r['removed_stale'])}")
        return lines
    what = f"component {r['whole_file_is']!r}" if r["whole_file_is"] else f"components {', '.join(r['components'])}"
    lines = [f"wrote {r['output']} ({'torch.save file' if r['format'] == 'torch' else 'DCP checkpoint'}): {what}; "
             f"{r['tensors']} tensors, {human_size(r['nbytes'])} (step {r['step']})"]
    lines += [f"left out {key}: {why}" for key, why in r["left_out"].items()]
    return lines
