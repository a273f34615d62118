"""The bundled corpus as fixed windows of bytes: sample i is (bytes[i*T : i*T+T], the same shifted by one)."""

from __future__ import annotations

import os

import torch

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt")


def read_corpus(path: str = CORPUS) -> torch.Tensor:
    """The file's bytes as int64 token ids."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 2:
        raise ValueError(f"corpus {path} is empty; regenerate it with `python tools/make_corpus.py`")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


class ByteWindows:
    """Non-overlapping windows of `block_size` bytes from `data`; each sample is a dict for model(**batch)."""

    def __init__(self, data: torch.Tensor, block_size: int, limit: int | None = None):
        self.data, self.block_size = data, block_size
        count = (len(data) - 1) // block_size
        self.count = count if limit is None else min(count, limit)
        if self.count < 1:
            raise ValueError(f"{len(data)} bytes make no window of {block_size}+1 bytes; use a smaller block size")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        start = i * self.block_size
        chunk = self.data[start:start + self.block_size + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def split(data: torch.Tensor, eval_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval): the last `eval_fraction` of the text is held out."""
    cut = int(len(data) * (1 - eval_fraction))
    return data[:cut], data[cut:]
