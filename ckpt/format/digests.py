"""xxh3-128 digests of checkpoint bytes: one per file, and per block for the pieces of SHARDED tensors.

A ranged read of part of a piece checks every block it touches, so a load that reads only what a rank needs
still checks every byte it applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

# Pieces of a SHARDED tensor are also hashed in blocks, so a read of part of a piece checks every block it
# touches (reading at most one block more at each end). A block is a power of two of at least this size, and a
# piece has at most DIGEST_BLOCKS_MAX of them: the manifest grows with the pieces, not with the bytes.
DIGEST_BLOCK_MIN = 256 << 10
DIGEST_BLOCKS_MAX = 128


@dataclass(frozen=True)
class BlockDigests:
    """xxh3-128 digests of a piece's bytes in consecutive blocks of `block` bytes (the last one shorter)."""

    block: int
    digests: tuple[str, ...]


def digest_block(nbytes: int) -> int:
    """The block size the digests of a piece of `nbytes` bytes are taken over."""
    block = DIGEST_BLOCK_MIN
    while block * DIGEST_BLOCKS_MAX < nbytes:
        block *= 2
    return block


class BlockHasher:
    """Block digests of one piece, fed its bytes in order, in slices of any size."""

    def __init__(self, nbytes: int):
        self.block = digest_block(nbytes)
        self._digests: list[str] = []
        self._hasher = new_hasher()
        self._filled = 0

    def update(self, data: memoryview | bytes) -> None:
        view, at = memoryview(data), 0
        while at < len(view):
            take = min(self.block - self._filled, len(view) - at)
            self._hasher.update(view[at: at + take])
            self._filled += take
            at += take
            if self._filled == self.block:
                self._digests.append(self._hasher.hexdigest())
                self._hasher.reset()
                self._filled = 0

    def result(self) -> BlockDigests:
        tail = [self._hasher.hexdigest()] if self._filled else []
        return BlockDigests(self.block, tuple(self._digests + tail))


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


__all__ = ["DIGEST_BLOCKS_MAX", "DIGEST_BLOCK_MIN", "BlockDigests", "BlockHasher", "digest_block", "new_hasher"]
