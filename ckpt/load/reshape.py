"""What a checkpoint's layout was, and what loading it under another layout would do (`ckpt inspect --at`).

The mesh is read back from the process groups the manifest records: each group name is a mesh dimension
when its groups split the world into equal, evenly strided sets (as DeviceMesh builds them), outermost first
(largest stride). A new shape is laid out the same way, row-major. Everything here reads the manifest only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..component import SharingPattern
from ..format.manifest import ComponentEntry, Manifest
from ..patterns.base import tensor_layout_for
from ..patterns.placements import placement_for
from ..topology import RankTopology


@dataclass(frozen=True)
class MeshDim:
    """One dimension of a saved mesh: its group name, size and rank stride."""

    name: str
    size: int
    stride: int


def saved_mesh(manifest: Manifest) -> list[MeshDim] | None:
    """The mesh the process groups describe (outermost first), or None when they do not form one."""
    world = manifest.topology.world_size
    dims = []
    for name, groups in manifest.topology.process_groups.items():
        size = len(groups[0]) if groups else 0
        if size < 1 or any(len(g) != size for g in groups) or len(groups) * size != world:
            return None
        stride = groups[0][1] - groups[0][0] if size > 1 else 0
        if any(list(g) != [g[0] + i * stride for i in range(size)] for g in groups):
            return None
        dims.append(MeshDim(name, size, stride))
    if not dims or math.prod(d.size for d in dims) != world:
        return None
    dims.sort(key=lambda d: -d.stride if d.size > 1 else -world)  # a dimension of size 1 goes outermost
    return dims if mesh_groups([(d.name, d.size) for d in dims]) == _normal(manifest) else None


def _normal(manifest: Manifest) -> dict[str, list[tuple[int, ...]]]:
    return {k: sorted(tuple(g) for g in v) for k, v in manifest.topology.process_groups.items()}


def mesh_groups(shape: list[tuple[str, int]]) -> dict[str, list[tuple[int, ...]]]:
    """The groups of each dimension of a row-major mesh of `shape` (name, size), outermost first."""
    sizes = [s for _, s in shape]
    world = math.prod(sizes)
    out = {}
    for i, (name, size) in enumerate(shape):
        stride = math.prod(sizes[i + 1:])
        groups = {tuple(r - (r // stride % size) * stride + k * stride for k in range(size)) for r in range(world)}
        out[name] = sorted(groups)
    return out


def mesh_picture(shape: list[tuple[str, int]]) -> str:
    """The ranks of a mesh as a table: rows along the outer dimensions, columns along the innermost."""
    sizes = [s for _, s in shape]
    inner_name, inner = shape[-1]
    outer = shape[:-1]
    width = max(len(str(math.prod(sizes) - 1)), len(inner_name) + len(str(inner - 1)))
    label_w = max([len(",".join(f"{n}{s - 1}" for n, s in outer)) if outer else 0, 1])
    lines = [" " * (label_w + 2) + " ".join(f"{inner_name}{i}".rjust(width) for i in range(inner))]
    rows = math.prod(s for _, s in outer) if outer else 1
    for row in range(rows):
        coords, rest = [], row
        for name, size in reversed(outer):
            coords.append(f"{name}{rest % size}")
            rest //= size
        label = ",".join(reversed(coords)) or "-"
        lines.append(f"{label.ljust(label_w)}  " + " ".join(str(row * inner + i).rjust(width) for i in range(inner)))
    return "\n".join(lines)


def parse_shape(text: str) -> list[tuple[str, int]]:
    """"dp=1,tp=2" -> [("dp", 1), ("tp", 2)]."""
    shape = []
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--at {text!r}: write the new shape as name=size pairs, e.g. dp=1,tp=2 (or world=N)")
        shape.append((name.strip(), int(value)))
    return shape


def load_plan(manifest: Manifest, shape: list[tuple[str, int]]) -> list[dict[str, str]]:
    """Per component, what `load(..., reshard=True)` would do at the new shape (mesh dims, or world=N)."""
    mesh = saved_mesh(manifest)
    names = [n for n, _ in shape]
    if names == ["world"]:
        world, groups = shape[0][1], {}
        if manifest.topology.process_groups:
            raise ValueError("--at world=N: this checkpoint has process groups "
                             f"{sorted(manifest.topology.process_groups)}; give the new size of each mesh dimension")
    else:
        saved = [d.name for d in mesh] if mesh else sorted(manifest.topology.process_groups)
        if mesh is None or sorted(names) != sorted(saved):
            raise ValueError(f"--at {','.join(f'{n}={s}' for n, s in shape)}: name each saved mesh dimension once "
                             f"({', '.join(saved) or 'none: use world=N'})")
        shape = [(n, dict(shape)[n]) for n in saved]
        world, groups = math.prod(s for _, s in shape), mesh_groups(shape)
    lws = manifest.topology.local_world_size
    rows = []
    for key, entry in sorted(manifest.components.items()):
        placement = tensor_layout_for(entry.pattern)
        if placement is not None:
            action, details = placement.load_action(key, entry, world)
            rows.append({"key": key, "pattern": entry.pattern.value, "action": action, **details})
            continue
        rows.append({"key": key, "pattern": entry.pattern.value, "action": _action(entry, manifest, world, lws, groups)})
    return rows


def _action(entry: ComponentEntry, manifest: Manifest, world: int, lws: int,
            groups: Mapping[str, list[tuple[int, ...]]]) -> str:
    # The new layout as a rank of it sees it; a world that is not whole nodes of the saved size is one node.
    topo = RankTopology(0, world, lws if world % lws == 0 else world,
                        {name: tuple(tuple(g) for g in sets) for name, sets in groups.items()})
    placement = placement_for(entry.pattern)
    if not placement.needs_reshard(manifest.topology, entry.replica_sets, topo, entry.process_group):
        return placement.load_words
    return "reshard=True: " + _merge_outcome(entry)


def _merge_outcome(entry: ComponentEntry) -> str:
    """What merging every saved copy gives, judged from the tensor names each copy holds."""
    copies: dict[str, set] = {}
    for f in entry.files:
        for t in f.tensors:
            copies.setdefault(t.name, set()).add(f.owner)
    shared = sorted(n for n, owners in copies.items() if len(owners) > 1)
    if not copies:
        return ("every copy's values are merged by key; values under the same key must be identical in every copy "
                "(a per-replica sampler's position is not)")
    if not shared:
        return "each tensor is found by name in the one copy that holds it"
    shards = [n for n in shared if n.endswith("/local")]
    others = [n for n in shared if not n.endswith("/local")]
    parts = [f"{len(shards)} tensors reassembled from their saved shards"] if shards else []
    if others:
        parts.append(f"{len(others)} tensors held by several copies (e.g. {others[0]!r}) load only if identical in "
                     "every copy")
        if entry.pattern is SharingPattern.PER_RANK and not shards:
            parts.append("per-rank state such as RNG is not: leave it out, or let a trainer's LayoutChange policy "
                         "rebuild it")
    return "; ".join(parts) + ("; the rest found by name" if len(shared) < len(copies) else "")


__all__ = ["MeshDim", "load_plan", "mesh_groups", "mesh_picture", "parse_shape", "saved_mesh"]
