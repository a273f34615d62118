"""Checking that replicas are replicas, before anything is written.

Round one sends a single summary digest per component and rank to rank 0 (with the save's declarations),
so a healthy save exchanges a few bytes per component whatever the world size. Only when summaries differ
are per-tensor digests sent to rank 0, to name what differs (TENSOR has them at hand; QUICK computes them
then). FULL compares the bytes themselves on every rank (for debugging: it all-gathers every tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import xxhash

from ..comm import Communicator, Decision
from ..component import ValidationLevel
from ..errors import ReplicationError
from ..format.serialization import FlatState
from ..format.tensor_io import tensor_bytes
from ..io.threads import parallel_map
from .planning import ComponentPlan

NON_TENSOR = "(non-tensor state)"
WHOLE = "(whole component)"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


_PARALLEL_DIGEST_BYTES = 1 << 20  # smaller tensors cost more in thread hand-offs than in hashing


def digest_table(flat: FlatState, threads: int = 1) -> dict[str, str]:
    """One digest per tensor (with dtype and shape), plus one for the non-tensor state. xxh3 releases the
    GIL, so CPU tensors of a MB or more are hashed on `threads` threads side by side."""
    def digest(item: tuple[str, torch.Tensor]) -> tuple[str, str]:
        name, tensor = item
        return name, f"{_describe(tensor)}:{xxhash.xxh3_128_hexdigest(tensor_bytes(tensor))}"

    # CPU tensors only: hashing a GPU tensor copies it to the host first, and in parallel those copies would add up.
    large = [(n, t) for n, t in flat.tensors.items()
             if t.device.type == "cpu" and t.numel() * t.element_size() >= _PARALLEL_DIGEST_BYTES]
    found = dict(parallel_map(digest, large, threads, "ckpt-digest"))
    found.update(digest(item) for item in flat.tensors.items() if item[0] not in found)
    return {NON_TENSOR: xxhash.xxh3_128_hexdigest(flat.skeleton), **{n: found[n] for n in flat.tensors}}


def summary_digest(flat: FlatState, level: ValidationLevel, threads: int = 1
                   ) -> tuple[str | None, dict[str, str] | None]:
    """(summary, per-tensor table or None) for this rank's copy at `level`."""
    if level is ValidationLevel.NONE:
        return None, None
    if level is ValidationLevel.QUICK:
        h = xxhash.xxh3_128(flat.skeleton)
        for name in sorted(flat.tensors):
            tensor = flat.tensors[name]
            h.update(f"\0{name}\0{_describe(tensor)}\0".encode())
            h.update(tensor_bytes(tensor))
        return h.hexdigest(), None
    table = digest_table(flat, threads)
    return _hash_table(table), table


def _hash_table(table: Mapping[str, str]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(table):
        h.update(f"{name}\0{table[name]}\n".encode())
    return h.hexdigest()


def differing_ranks(members: Sequence[int], values: Mapping[int, object]) -> list[int]:
    """Members whose value differs from the lowest member's."""
    ref = values.get(members[0])
    return [r for r in members[1:] if values.get(r) != ref]


@dataclass(frozen=True)
class ReplicaChecks:
    """What is left to check after rank 0 compared the summary digests: the replica sets whose summaries
    differ (`suspects`: component -> [(members, ranks that differ)]), the FULL components, and the plans of
    both (for their replica sets and the error). Sent to every rank; empty on a healthy save."""

    suspects: dict[str, tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]] = field(default_factory=dict)
    full: tuple[str, ...] = ()
    plans: dict[str, ComponentPlan] = field(default_factory=dict)

    def to_wire(self) -> list:
        return [{k: [[list(m), list(b)] for m, b in v] for k, v in self.suspects.items()}, list(self.full),
                {k: p.to_wire() for k, p in self.plans.items()}]

    @classmethod
    def from_wire(cls, w: list) -> ReplicaChecks:
        suspects = {str(k): tuple((tuple(m), tuple(b)) for m, b in v) for k, v in w[0].items()}
        return cls(suspects, tuple(w[1]), {str(k): ComponentPlan.from_wire(p) for k, p in w[2].items()})


def find_suspects(plans: Mapping[str, ComponentPlan], summaries: Sequence[Mapping[str, str | None]]
                  ) -> ReplicaChecks:
    """Rank 0: compare every replica set's summary digests (`summaries[r][key]`: rank r's)."""
    suspects: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for key, plan in sorted(plans.items()):
        if plan.validation in (ValidationLevel.QUICK, ValidationLevel.TENSOR):
            for members in plan.replica_sets:
                bad = differing_ranks(members, {r: summaries[r].get(key) for r in members})
                if bad:
                    suspects.setdefault(key, []).append((tuple(members), tuple(bad)))
    full = tuple(k for k, p in sorted(plans.items())
                 if p.validation is ValidationLevel.FULL and any(len(m) > 1 for m in p.replica_sets))
    return ReplicaChecks({k: tuple(v) for k, v in suspects.items()}, full,
                         {k: plans[k] for k in sorted({*suspects, *full})})


def check_replicas(comm: Communicator, checks: ReplicaChecks, tables: Mapping[str, dict[str, str] | None],
                   flats: Mapping[str, FlatState]) -> None:
    """Raise ReplicationError on every rank if any replicated component differs between its replicas.

    `checks` is rank 0's comparison of the summaries (the same on every rank); `tables`/`flats` are this
    rank's own data. Per-tensor digests go to rank 0 only, and only when summaries differ.
    """
    if not checks.suspects and not checks.full:
        return
    mismatches: dict[str, dict[str, set[int]]] = {}
    if checks.suspects:
        # A phase, not a bare gather: QUICK hashes here, and a rank that fails doing so must not leave the others waiting.
        found = comm.gather_phase("replication check (per tensor)", lambda: _suspect_tables(checks.suspects, tables, flats),
                                  what="replication check", decide=lambda gathered: _decide_tables(checks, gathered))
        mismatches = {k: {n: set(r) for n, r in v.items()} for k, v in found.common.items()}
    for key in checks.full:
        _compare_full(comm, key, checks.plans[key], flats.get(key), mismatches)
    if mismatches:
        key = sorted(mismatches)[0]
        raise _replication_error(key, checks.plans[key], mismatches[key], others=sorted(mismatches)[1:])


def _decide_tables(checks: ReplicaChecks, gathered: Sequence[Mapping]) -> Decision:
    """Rank 0: the tensors that differ, by component (name -> ranks), from every rank's per-tensor digests."""
    mismatches: dict[str, dict[str, set[int]]] = {}
    for key in sorted(checks.suspects):
        for members, bad in checks.suspects[key]:
            if not _compare_tables(key, members, gathered, mismatches):
                # Summaries differ but no table entry does (not expected): still name the ranks.
                mismatches.setdefault(key, {}).setdefault(WHOLE, set()).update(bad)
    return Decision({k: {n: sorted(r) for n, r in v.items()} for k, v in mismatches.items()})


def _suspect_tables(suspects: Mapping[str, object], tables: Mapping[str, dict[str, str] | None],
                    flats: Mapping[str, FlatState]) -> dict:
    """This rank's per-tensor digests of the components whose summaries differ somewhere. TENSOR computed
    them already; QUICK computes them only now, so a healthy QUICK save never pays for them."""
    mine: dict[str, dict[str, str]] = {}
    for key in sorted(suspects):
        table = tables.get(key)
        if table is None and key in flats:
            table = digest_table(flats[key])
        if table is not None:
            mine[key] = table
    return mine


def _compare_tables(key: str, members: Sequence[int], gathered: Sequence[Mapping], out: dict) -> bool:
    """Record each tensor whose digest differs from the lowest member's; whether any did."""
    tables = {r: gathered[r].get(key) or {} for r in members}
    names = sorted({n for t in tables.values() for n in t})
    found = False
    for name in names:
        bad = differing_ranks(members, {r: tables[r].get(name) for r in members})
        if bad:
            out.setdefault(key, {}).setdefault(name, set()).update(bad)
            found = True
    return found


def _compare_full(comm: Communicator, key: str, plan: ComponentPlan, flat: FlatState | None, out: dict) -> None:
    """Exchange each tensor's bytes and compare with the lowest rank of each replica set."""
    # Every rank must run the same collectives: the list of names comes from a gather, not local state.
    names_by_rank = comm.all_gather(sorted(flat.tensors) if flat is not None else [], f"full check of {key!r}")
    names = sorted({n for names in names_by_rank for n in names})
    skeletons = comm.all_gather_bytes(flat.skeleton if flat is not None else b"", f"full check of {key!r}")
    for members in plan.replica_sets:
        bad = differing_ranks(members, {r: skeletons[r] for r in members})
        if bad:
            out.setdefault(key, {}).setdefault(NON_TENSOR, set()).update(bad)
    for name in names:
        tensor = flat.tensors.get(name) if flat is not None else None
        payload = b"\x00" if tensor is None else b"\x01" + _describe(tensor).encode() + b"\x00" + bytes(tensor_bytes(tensor))
        copies = comm.all_gather_bytes(payload, f"full check of {key!r}")
        for members in plan.replica_sets:
            bad = differing_ranks(members, {r: copies[r] for r in members})
            if bad:
                out.setdefault(key, {}).setdefault(name, set()).update(bad)


def _replication_error(key: str, plan: ComponentPlan, found: Mapping[str, set[int]], others: list[str]) -> ReplicationError:
    names = sorted(found)
    bad_ranks = sorted({r for ranks in found.values() for r in ranks})
    sets = [m for m in plan.replica_sets if set(m) & set(bad_ranks)]
    group = f" in process group {plan.process_group!r}" if plan.process_group else ""
    shown = ", ".join(f"{n!r} (ranks {sorted(found[n])})" for n in names[:10])
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    also = f"; components {others} differ too" if others else ""
    return ReplicationError(
        f"component {key!r} ({plan.pattern.name}{group}, validation {plan.validation.value}) differs between "
        f"replicas {[list(m) for m in sets]}: {shown}{more} differ from the copy on rank {sets[0][0] if sets else '?'}"
        f"{also}. Nothing was saved. Replicas drifted apart (a missed all-reduce, a rank-dependent update, or "
        "non-deterministic kernels); fix the cause, or declare the component PER_RANK if it is not replicated",
        component=key, mismatches={n: sorted(r) for n, r in found.items()},
        replica_ranks=sets[0] if sets else (),
    )
