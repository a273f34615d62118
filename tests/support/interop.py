"""A tiny GPT-2 (Hugging Face transformers, built from a config: no hub access) trained by our trainers, for the
interop tests (holds no tests)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, even by accident
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

VOCAB, LENGTH = 61, 12


def gpt2_config() -> Any:
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)


def gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config())


class Tokens:
    """Random token windows as GPT-2 batches ({input_ids, labels})."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_gpt2(run_dir: str, steps: int = 3, model: Any = None, **options: Any) -> Any:
    """A SimpleTrainer that trained a tiny GPT-2 for `steps` steps, saving at the end."""
    from trainers import SimpleTrainer, TrainingArguments

    args = TrainingArguments(output_dir=run_dir, max_steps=steps, per_device_train_batch_size=4, save_steps=steps,
                             logging_steps=steps, seed=0, learning_rate=1e-2, progress_bar=False, **options)
    trainer = SimpleTrainer(model if model is not None else gpt2(), args, train_dataset=Tokens())
    trainer.train()
    trainer.coordinator.close()
    return trainer


def logits(model: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    ids = ids if ids is not None else Tokens(4, seed=5).ids
    with torch.no_grad():
        return model(input_ids=ids).logits
