"""`ckpt diff`: two checkpoints compared component by component and tensor by tensor, by value, across
shardings (a component saved under another layout is compared as the full state it stands for)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError
from ..format.serialization import unflatten_state
from .inspection import Opened, copy_label, owners, read_copy, read_skeleton, state_path, with_real_dtypes


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| over the elements (NaN against NaN counts as equal, NaN against a number as inf;
    for complex tensors, the largest magnitude of the complex difference)."""
    if a.numel() == 0:
        return 0.0
    if a.dtype == torch.bool:
        return float((a != b).any())
    if a.is_complex():
        d = (a.to(torch.complex128) - b.to(torch.complex128)).abs()
    else:
        d = (a.to(torch.float64) - b.to(torch.float64)).abs()
    if a.is_floating_point() or a.is_complex():
        both = torch.isnan(a) & torch.isnan(b) if not a.is_complex() else torch.isnan(a).real & torch.isnan(b).real
        d = torch.where(both, torch.zeros_like(d), d).nan_to_num(nan=math.inf)
    return float(d.max())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _diff_tensors(ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], copy: str) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(ta.keys() | tb.keys()):
        a, b = ta.get(name), tb.get(name)
        row: dict[str, Any] = {"copy": copy, "name": name}
        if a is None or b is None:
            t = a if a is not None else b
            row.update(status="removed" if b is None else "added", dtype=str(t.dtype).removeprefix("torch."),
                       shape=list(t.shape))
        elif a.dtype != b.dtype or a.shape != b.shape:
            what = "dtype" if a.dtype != b.dtype else "shape"
            if a.dtype != b.dtype and a.shape != b.shape:
                what = "dtype and shape"
            row.update(status=f"{what} changed", a=_brief(a), b=_brief(b))
        elif _same_bits(a, b):
            row.update(status="same", max_abs_diff=0.0)
        elif _has_arithmetic(a.dtype):
            row.update(status="changed", max_abs_diff=max_abs_diff(a, b))
        else:  # bits and packed sub-byte dtypes have no subtraction: say how many elements differ
            row.update(status="changed", dtype=str(a.dtype).removeprefix("torch."), shape=list(a.shape),
                       differing_elements=_differing(a, b))
        rows.append(row)
    return rows


def _has_arithmetic(dtype: torch.dtype) -> bool:
    try:
        torch.zeros(1, dtype=dtype).to(torch.float64 if not dtype.is_complex else torch.complex128)
    except (RuntimeError, TypeError):
        return False
    return True


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    size = a.element_size()
    ab, bb = (t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, size) for t in (a, b))
    return int((ab != bb).any(dim=1).sum())


def _brief(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _diff_side(ck: Opened, key: str, owner: int | None) -> dict[str, torch.Tensor]:
    """One copy's tensors for `diff`, in their real dtypes; as stored when its skeleton cannot be read
    (the changed digest is reported as a non-tensor change)."""
    tensors = read_copy(ck, key, owner)
    if not any(t.dtype == torch.uint8 and t.dim() for t in tensors.values()):
        return tensors
    try:
        blob = read_skeleton(ck, key, owner)
        return tensors if blob is None else with_real_dtypes(
            unflatten_state(blob, tensors, key, source=state_path(ck, key, owner)), tensors)
    except (CheckpointError, OSError):
        return tensors


def _state_digests(ck: Opened, key: str, owner: int | None) -> list[str]:
    return [f.xxh3_128 for f in ck.manifest.components[key].files_for(owner) if f.kind == "state"]


def diff(a: Opened, b: Opened) -> dict[str, Any]:
    """Per component and tensor what changed from `a` to `b`: added, removed, dtype or shape changes, and
    the largest absolute difference of tensors that kept their dtype and shape. Tensors stored as raw
    bytes are compared in their real dtype and shape."""
    comps = []
    ma, mb = a.manifest.components, b.manifest.components
    for key in sorted(ma.keys() | mb.keys()):
        if key not in mb or key not in ma:
            comps.append({"key": key, "status": "removed" if key not in mb else "added", "tensors": []})
            continue
        ca, cb = ma[key], mb[key]
        rows, state_changed = [], []
        for owner in sorted(set(owners(ca)) | set(owners(cb)), key=lambda o: -1 if o is None else o):
            copy = copy_label(ca.pattern if owner in owners(ca) else cb.pattern, owner)
            ta = _diff_side(a, key, owner) if owner in owners(ca) else {}
            tb = _diff_side(b, key, owner) if owner in owners(cb) else {}
            rows += _diff_tensors(ta, tb, copy)
            if _state_digests(a, key, owner) != _state_digests(b, key, owner):
                state_changed.append(copy)
        changed = [r for r in rows if r["status"] != "same"]
        comps.append({"key": key, "status": "changed" if changed or state_changed or ca.pattern != cb.pattern
                      else "same", "pattern": [ca.pattern.value, cb.pattern.value],
                      "non_tensor_state_changed": state_changed, "tensors": rows})
    return {"a": a.path, "b": b.path, "steps": [a.manifest.step, b.manifest.step], "components": comps,
            "identical": all(c["status"] == "same" for c in comps)}


__all__ = ["diff", "max_abs_diff"]

