"""Errors raised by ckpt. Every error a save or load raises is raised on every rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class CheckpointError(RuntimeError):
    """A save or load failed. `failures` maps each failed rank to what went wrong there."""

    def __init__(self, message: str, *, failures: Mapping[int, str] | None = None, path: str | None = None):
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})
        self.path = path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint matches what was asked for."""


class CheckpointDeletedError(CheckpointNotFoundError):
    """A checkpoint was deleted (by retention, `ckpt prune`, a person) while it was being read: its files are
    gone with its manifest, which says nothing about whether they were intact."""


class ManifestError(CheckpointError):
    """A manifest is missing, unreadable, or describes files that cannot be trusted."""


class CorruptCheckpointError(CheckpointError):
    """A file's bytes do not match what the manifest recorded (digest, size, header), or cannot be decoded.
    `key_path`: where inside a state file decoding stopped, when it did."""

    def __init__(self, message: str, *, path: str | None = None, component: str | None = None,
                 failures: Mapping[int, str] | None = None, key_path: str | None = None):
        super().__init__(message, path=path, failures=failures)
        self.component = component
        self.key_path = key_path


class SerializationError(CheckpointError, TypeError):
    """A state dict holds a value that cannot be stored without pickle."""

    def __init__(self, message: str, *, component: str | None = None, key_path: str | None = None,
                 failures: Mapping[int, str] | None = None):
        super().__init__(message, failures=failures)
        self.component = component
        self.key_path = key_path


class ReplicationError(CheckpointError):
    """State that should be identical across replicas is not.

    `mismatches` maps a tensor (or "(non-tensor state)") to the ranks whose copy differs from the lowest
    rank of the replica set, at every validation level (QUICK computes per-tensor digests once it finds a
    difference).
    """

    def __init__(
        self,
        message: str,
        *,
        component: str,
        mismatches: Mapping[str, Sequence[int]],
        replica_ranks: Sequence[int],
    ):
        super().__init__(message)
        self.component = component
        self.mismatches = {name: tuple(ranks) for name, ranks in mismatches.items()}
        self.replica_ranks = tuple(replica_ranks)


class CollectiveTimeoutError(CheckpointError, TimeoutError):
    """Ranks did not all reach a coordination step within the coordinator's timeout."""

    def __init__(self, message: str, *, phase: str, missing_ranks: Sequence[int] | None = None):
        super().__init__(message)
        self.phase = phase
        self.missing_ranks = tuple(missing_ranks) if missing_ranks is not None else None


class RunDirInUseError(CheckpointError):
    """Another process's coordinator holds the run directory's lock. `holder` says who (host, pid, start)."""

    def __init__(self, message: str, *, holder: Mapping[str, object] | None = None,
                 failures: Mapping[int, str] | None = None, path: str | None = None):
        super().__init__(message, failures=failures, path=path)
        self.holder = dict(holder or {})


class PartialLoadError(CheckpointError):
    """A component's `load_state_dict()` raised after the load had started applying state.

    `applied` maps every rank to the components whose live state it replaced; the failing component on
    a failed rank (in `failures`) may be partly changed; the others were not touched.
    """

    def __init__(self, message: str, *, applied: Mapping[int, Sequence[str]] | None = None,
                 failures: Mapping[int, str] | None = None, path: str | None = None):
        super().__init__(message, failures=failures, path=path)
        self.applied = {rank: tuple(keys) for rank, keys in (applied or {}).items()}


# Errors that keep their class when a failure on one rank is re-raised on every rank.
REMOTE_ERROR_TYPES: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (
        CheckpointError,
        CheckpointNotFoundError,
        CheckpointDeletedError,
        ManifestError,
        CorruptCheckpointError,
        SerializationError,
        RunDirInUseError,
    )
}
