"""TrainingArguments: every option of a training run, validated once when it is built.

Each field carries its documentation in `field(metadata={"help": ...})`, so it is there at run time:
`help(TrainingArguments)`, `TrainingArguments.__doc__`, and `field_help()` for tools that build a CLI.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ckpt import RetentionPolicy, ValidationLevel, infer_greater_is_better

from .keys import EVAL_PREFIX
from .recovery.policy import RecoveryPolicy, load_recovery_policy

_BACKENDS = ("gloo", "nccl")
SAVE_ERROR_CHOICES = ("raise", "warn")
_DEFAULT_METRIC = "loss"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainingArguments:
    """Options of one training run. Invalid values raise ValueError naming the option, the value and the fix."""

    output_dir: str | os.PathLike = field(metadata={
        "help": "The run directory: checkpoints (`checkpoint-<step>/`) and `metrics.jsonl` go here. "
                "Shared by all ranks."})
    max_steps: int = field(metadata={
        "help": "Optimizer steps to train for in total (a resumed run counts the steps it resumed from)."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Samples per rank per step; the global batch is this times the world size."})
    per_device_eval_batch_size: int = field(default=8, metadata={
        "help": "Samples per rank per evaluation batch."})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "Learning rate of the default optimizer (AdamW), used when no optimizer_factory is "
                "given."})
    weight_decay: float = field(default=0.0, metadata={
        "help": "Weight decay of the default optimizer (AdamW)."})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "Clip the global gradient norm to this; None never clips (the norm is still computed and"
                " logged)."})
    logging_steps: int = field(default=50, metadata={
        "help": "Log the loss (mean over the window, reduced across ranks), lr, grad norm and throughput"
                " every N steps."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate every N steps (needs an eval_dataset); None evaluates only where eval_on_save "
                "forces it."})
    save_steps: int | None = field(default=None, metadata={
        "help": "Save a checkpoint every N steps; None saves only at the end (see save_on_train_end)."})
    eval_on_save: bool = field(default=False, metadata={
        "help": "Evaluate at every save step too, so every checkpoint carries the metrics retention "
                "ranks it by (without an eval_dataset: a warning, and no metrics)."})
    save_on_train_end: bool = field(default=True, metadata={
        "help": "Save when training ends (max_steps reached or a callback stopped it) unless that step "
                "was just saved."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep the newest K checkpoints (plus the best ones, see preserve_best_model); None keeps"
                " all."})
    preserve_best_model: bool = field(default=False, metadata={
        "help": "Also keep the preserve_n_best best checkpoints by best_model_metric; False keeps only "
                "the newest."})
    best_model_metric: str = field(default=_DEFAULT_METRIC, metadata={
        "help": "Evaluation metric that ranks checkpoints; looked up as `eval_<name>` (\"loss\" means "
                "eval_loss)."})
    best_model_greater_is_better: bool | None = field(default=None, metadata={
        "help": "Direction of best_model_metric; None infers it from the name (loss/error: lower, "
                "accuracy/f1: higher)."})
    metric_for_best_model: str | None = field(default=None, metadata={
        "help": "Hugging Face's name for best_model_metric; either may be given (\"loss\", the default of "
                "best_model_metric, yields to it). After construction both hold the metric in force."})
    greater_is_better: bool | None = field(default=None, metadata={
        "help": "Hugging Face's name for best_model_greater_is_better. After construction it holds the "
                "direction in force: as given, or inferred once from the metric's name (None when the name "
                "does not say)."})
    preserve_n_best: int = field(default=1, metadata={
        "help": "How many of the best checkpoints to keep when preserve_best_model is set."})
    keep_every_n_steps: int | None = field(default=None, metadata={
        "help": "Also keep every checkpoint whose step is a multiple of N (never deleted by retention)."})
    resume_from_checkpoint: str | int | os.PathLike | None = field(default=None, metadata={
        "help": "\"latest\" (the newest committed checkpoint in output_dir; a fresh start when there is "
                "none), a step (a digit string such as \"400\" from a command line too, unless a folder of "
                "that name exists), a checkpoint path, or None to start fresh."})
    seed: int = field(default=0, metadata={
        "help": "Seed of torch, Python `random` and NumPy at the start of a fresh run (a resume restores"
                " the streams)."})
    data_seed: int | None = field(default=None, metadata={
        "help": "Seed of the training data order; None uses seed."})
    shuffle: bool = field(default=True, metadata={
        "help": "Shuffle the training data each epoch (a permutation drawn from data_seed and the epoch "
                "number)."})
    dispatch_batches: bool = field(default=False, metadata={
        "help": "DDP only. True: rank 0 draws each global batch and scatters slices (data state GLOBAL)."
                " False: every rank draws its own slice through a distributed sampler (data state "
                "PER_RANK)."})
    full_determinism: bool = field(default=False, metadata={
        "help": "Call torch.use_deterministic_algorithms(True) at the start of training (bit-exact runs "
                "on CUDA too). Sets CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset, as cuBLAS needs; that must "
                "happen before CUDA starts, so building the trainer after CUDA is initialised is an error."})
    ddp_layout_independent_reduce: bool = field(default=True, metadata={
        "help": "DDP only: average gradients by gathering every rank's bucket and adding the copies in "
                "rank order, so the sums do not depend on DDP's bucket layout, which DDP rebuilds after "
                "its first step (also the first step after a resume). Needed for bit-exact resume with "
                "more than two ranks; moves about twice the bytes of DDP's ring all-reduce. False uses "
                "DDP's own all-reduce."})
    replica_validation: ValidationLevel = field(default=ValidationLevel.TENSOR, metadata={
        "help": "DDP only: how hard to check, at every save, that model and optimizer are identical on "
                "every rank."})
    ddp_backend: str | None = field(default=None, metadata={
        "help": "DDP only: \"gloo\" or \"nccl\" when the trainer initialises torch.distributed; None "
                "picks nccl with CUDA."})
    device: str | None = field(default=None, metadata={
        "help": "Device to train on; None: cuda (one GPU per local rank) when available, else cpu."})
    async_save: bool = field(default=False, metadata={
        "help": "Copy the state into CPU buffers and write checkpoints on a background thread while "
                "training goes on. on_save fires once the checkpoint is committed (at the next save or the "
                "end of train(), which wait for it), so its `checkpoint` always names one that exists."})
    checkpoint_timeout_s: float = field(default=1800.0, metadata={
        "help": "How long a rank waits for the others at one step of a save or load before failing with "
                "an error."})
    step_timeout_s: float = field(default=300.0, metadata={
        "help": "How long one training step may run before the rank decides it is hung (it, or a rank it waits "
                "for), logs the step and exits with code 75 for torchrun --max-restarts to restart the job. On "
                "with or without a recovery policy (with one, its health_check_timeout_s notices hangs first); "
                "0 turns it off. Evaluation and saves are not timed by it."})
    progress_bar: bool | None = field(default=None, metadata={
        "help": "Show a progress bar on rank 0; None shows it when stderr is a terminal."})
    recovery: str | os.PathLike | RecoveryPolicy | None = field(default=None, metadata={
        "help": "Recovery from runs that go bad (NaN, spikes, divergence, out of memory, hangs, "
                "SIGTERM): the path of a TOML file with a [recovery] table, or a "
                "trainers.recovery.RecoveryPolicy; None turns it off. docs/recovery.md."})
    on_save_error: str = field(default="raise", metadata={
        "help": "What a failed save during training does (a ckpt.CheckpointError on every rank, such as "
                "a full disk or a storage timeout): \"raise\" ends training with it; \"warn\" logs it, "
                "records it in the log history and metrics.jsonl (kind \"save_error\") and trains on. A "
                "failed save leaves nothing behind, and earlier checkpoints stay as they were. Replicas "
                "that differ (ReplicationError) and state that cannot be serialized (SerializationError)"
                " always raise."})

    def __post_init__(self) -> None:
        self._resolve_aliases()
        self._check_paths_and_counts()
        self._check_schedule()
        self._check_choices()
        try:
            self.recovery_policy()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"TrainingArguments: recovery={self.recovery!r}: {exc}") from None
        if self.preserve_best_model or self.save_total_limit is not None or self.keep_every_n_steps is not None:
            try:
                self.retention_policy()
            except ValueError as exc:
                raise ValueError(f"TrainingArguments: {exc}") from None

    # ---- validation ------------------------------------------------------------------------------

    def _resolve_aliases(self) -> None:
        """Merge each option with its Hugging Face name, once; different values for both are an error."""
        ours, theirs = self.best_model_metric, self.metric_for_best_model
        if theirs is not None:
            if ours != _DEFAULT_METRIC and _with_prefix(ours) != _with_prefix(theirs):
                raise ValueError(
                    f"TrainingArguments: best_model_metric={ours!r} and metric_for_best_model={theirs!r} name the "
                    "same option with different values; give only one of them")
            object.__setattr__(self, "best_model_metric", theirs)
        object.__setattr__(self, "metric_for_best_model", self.best_model_metric)
        mine, hf = self.best_model_greater_is_better, self.greater_is_better
        if mine is not None and hf is not None and mine != hf:
            raise ValueError(
                f"TrainingArguments: best_model_greater_is_better={mine!r} and greater_is_better={hf!r} name the "
                "same option with different values; give only one of them")
        given = mine if mine is not None else hf
        object.__setattr__(self, "best_model_greater_is_better", given)
        metric = self.best_model_metric
        inferred = infer_greater_is_better(metric) if isinstance(metric, str) and metric.strip() else None
        object.__setattr__(self, "greater_is_better", given if given is not None else inferred)

    def _check_paths_and_counts(self) -> None:
        if not isinstance(self.output_dir, str | os.PathLike) or not os.fspath(self.output_dir):
            _fail("output_dir", self.output_dir, "must be a non-empty path (the run directory)")
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps",
                     "preserve_n_best"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, value, "must be an int >= 1")
        for name in ("eval_steps", "save_steps", "save_total_limit", "keep_every_n_steps", "data_seed"):
            value = getattr(self, name)
            low = 0 if name == "data_seed" else 1
            if value is not None and (not _is_int(value) or value < low):
                _fail(name, value, f"must be an int >= {low}, or None")
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "must be an int >= 0")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, int | float) or not norm > 0):
            _fail("max_grad_norm", norm, "must be a number > 0, or None to never clip")
        timeout = self.checkpoint_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            _fail("checkpoint_timeout_s", timeout, "must be a number of seconds > 0")
        step = self.step_timeout_s
        if isinstance(step, bool) or not isinstance(step, int | float) or not step >= 0:
            _fail("step_timeout_s", step, "must be a number of seconds > 0, or 0 to turn the step watchdog off")

    def _check_schedule(self) -> None:
        for name in ("eval_on_save", "save_on_train_end", "preserve_best_model", "shuffle", "dispatch_batches",
                     "full_determinism", "ddp_layout_independent_reduce", "async_save"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        if not self.preserve_best_model:
            return
        if self.save_steps is None:
            _fail("preserve_best_model", True, "needs save_steps (checkpoints to rank); set save_steps")
        if self.eval_on_save:
            return
        if self.eval_steps is None:
            raise ValueError(
                "TrainingArguments: preserve_best_model=True needs an evaluation at every save step; set "
                f"eval_on_save=True, or eval_steps to a divisor of save_steps={self.save_steps}")
        if self.save_steps % self.eval_steps:
            fit = max(d for d in range(1, self.eval_steps + 1) if self.save_steps % d == 0)
            raise ValueError(
                f"TrainingArguments: preserve_best_model=True with save_steps={self.save_steps} and "
                f"eval_steps={self.eval_steps}: save_steps must be a multiple of eval_steps, or checkpoints are "
                f"saved at steps with no {self.metric_key!r} to rank them by. Set eval_on_save=True (evaluate at "
                f"every save), or eval_steps={fit} (divides {self.save_steps})")

    def _check_choices(self) -> None:
        resume = self.resume_from_checkpoint
        if resume is not None and not (
                (_is_int(resume) and resume >= 0) or (isinstance(resume, str | os.PathLike) and os.fspath(resume))):
            _fail("resume_from_checkpoint", resume, 'must be "latest", a step (int >= 0), a checkpoint path, or None')
        if self.ddp_backend is not None and self.ddp_backend not in _BACKENDS:
            _fail("ddp_backend", self.ddp_backend, f"must be one of {list(_BACKENDS)} or None")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            _fail("device", self.device, 'must be a device name such as "cpu" or "cuda:0", or None')
        if not isinstance(self.replica_validation, ValidationLevel):
            _fail("replica_validation", self.replica_validation,
                  f"must be a ckpt.ValidationLevel ({', '.join(v.name for v in ValidationLevel)})")
        if not isinstance(self.best_model_metric, str) or not self.best_model_metric.strip():
            _fail("best_model_metric", self.best_model_metric, 'must be a metric name such as "loss"')
        if self.best_model_greater_is_better is not None and not isinstance(self.best_model_greater_is_better, bool):
            _fail("best_model_greater_is_better", self.best_model_greater_is_better, "must be True, False or None")
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            _fail("greater_is_better", self.greater_is_better, "must be True, False or None")
        if self.progress_bar is not None and not isinstance(self.progress_bar, bool):
            _fail("progress_bar", self.progress_bar, "must be True, False or None (automatic)")
        if self.on_save_error not in SAVE_ERROR_CHOICES:
            _fail("on_save_error", self.on_save_error, f"must be one of {list(SAVE_ERROR_CHOICES)}")

    # ---- derived values --------------------------------------------------------------------------

    @property
    def metric_key(self) -> str:
        """best_model_metric as it is named in metrics: with the `eval_` prefix."""
        name = self.best_model_metric
        return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name

    @property
    def shuffle_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def retention_policy(self) -> RetentionPolicy:
        """The ckpt retention policy these options describe."""
        best = self.preserve_best_model
        return RetentionPolicy(
            save_total_limit=self.save_total_limit,
            preserve_n_best=self.preserve_n_best if best else None,
            best_model_metric=self.metric_key if best else None,
            best_model_greater_is_better=self.best_model_greater_is_better if best else None,
            keep_every_n_steps=self.keep_every_n_steps,
        )

    def recovery_policy(self) -> RecoveryPolicy | None:
        """The recovery policy: `recovery` itself, or read from its TOML file."""
        return load_recovery_policy(self.recovery)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for logs and the metrics file)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, ValidationLevel) else (
                os.fspath(value) if isinstance(value, os.PathLike) else
                value.to_plain() if isinstance(value, RecoveryPolicy) else value)
        return out


def _with_prefix(name: Any) -> Any:
    return name if not isinstance(name, str) or name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def _fail(name: str, value: Any, what: str) -> None:
    raise ValueError(f"TrainingArguments: {name}={value!r} {what}")


def check_eval_dataset(args: TrainingArguments, *, has_eval: bool) -> str | None:
    """Options that ask for evaluations the trainer cannot run without an eval_dataset: an error, or (where the
    evaluation is optional) the warning to show."""
    if has_eval:
        return None
    if args.preserve_best_model:
        raise ValueError("TrainingArguments: preserve_best_model=True ranks checkpoints by an evaluation metric, "
                         "but the trainer has no eval_dataset; pass eval_dataset, or set preserve_best_model=False")
    if args.eval_steps is not None:
        raise ValueError(f"TrainingArguments: eval_steps={args.eval_steps} asks for an evaluation every "
                         f"{args.eval_steps} steps, but the trainer has no eval_dataset; pass eval_dataset, or set "
                         "eval_steps=None")
    if args.eval_on_save:
        return ("TrainingArguments: eval_on_save=True, but the trainer has no eval_dataset: checkpoints are saved "
                "without evaluation metrics. Pass eval_dataset to evaluate at each save, or set eval_on_save=False")
    return None


def field_help() -> dict[str, str]:
    """Every option's documentation: field name -> help text."""
    return {f.name: f.metadata.get("help", "") for f in fields(TrainingArguments)}


def _generated_doc() -> str:
    lines = [(TrainingArguments.__doc__ or "").strip(), "", "Options (name: type = default):", ""]
    for f in fields(TrainingArguments):
        default = "required" if f.default is MISSING else repr(f.default)
        lines += [f"{f.name}: {f.type} = {default}", f"    {f.metadata.get('help', '')}", ""]
    return "\n".join(lines)


TrainingArguments.__doc__ = _generated_doc()
