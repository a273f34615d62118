"""Names defined once: component keys in every checkpoint a trainer writes, and files in the run dir."""

from __future__ import annotations

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
TRAINER_STATE = "trainer_state"
DATA = "data"
RNG = "rng"
CALLBACK_PREFIX = "callback."

METRICS_FILE = "metrics.jsonl"  # one JSON object per log line / evaluation / save, written by rank 0
CHECKPOINT_KIND = "checkpoint"  # the kind of a save's line in metrics.jsonl (`ckpt report` reads it)
EVAL_PREFIX = "eval_"  # evaluation metrics are named eval_<name> in logs and checkpoint manifests
TRAIN_LOSS = "train_loss"  # the training loss as recorded in a checkpoint's metrics
