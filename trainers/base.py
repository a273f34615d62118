"""Trainer: the training loop, eval/save scheduling, callbacks, and saving/loading through the coordinator.

A concrete trainer says how its ranks are laid out and how each piece of state is shared:
`_setup_distributed`, `_wrap_model`, `_build_train_loader`, `all_reduce_sum`, `get_state_components`
and, where it uses process groups, `get_process_groups`. The loop here is the same for all of them.
The training step is one overridable method, `training_step`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ckpt import SaveHandle, StateComponent

from .arguments import TrainingArguments, check_eval_dataset
from .batches import call_model, extract_loss, first_tensor, to_device
from .callback_handler import CallbackHandler
from .callbacks import TrainerControl
from .data import eval_batches
from .hooks import MetricsHook, RecoveryHook, StepHook, WatchdogHook
from .keys import EVAL_PREFIX
from .liveness import StepWatchdog, die_with_parent, under_launcher
from .metrics_log import MetricsLogger
from .outcomes import StepConsensus, StepOutput, TrainingError
from .recovery.controller import RecoveryController
from .recovery.disabled import NoRecovery
from .recovery.lr import finish_step
from .rng import RNGState, prepare_full_determinism
from .schedule import StepPlan, plan_step
from .state import TrainerState
from .trainer_checkpoints import TrainerCheckpoints

log = logging.getLogger("trainers")

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
_UNSET: Any = object()


class Trainer(TrainerCheckpoints):
    """Runs a training loop and checkpoints it through a ckpt.CheckpointCoordinator.

    The model's forward returns the loss (or a dict / object with `loss`) given a batch (dicts are passed
    as keyword arguments, lists and tuples as positional ones), unless `loss_fn(model, batch)` is given.
    Datasets are map-style (`len` and `[i]`); `data_collator` turns a list of samples into a batch.
    """

    def __init__(self, model: torch.nn.Module, args: TrainingArguments, *, train_dataset: Any,
                 eval_dataset: Any = None, optimizer_factory: OptimizerFactory | None = None,
                 lr_scheduler_factory: SchedulerFactory | None = None, callbacks: Sequence[object] = (),
                 data_collator: Callable[[list[Any]], Any] | None = None, loss_fn: LossFn | None = None):
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a trainers.TrainingArguments, not {type(args).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is not None and not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
                raise TypeError(f"{name} must be map-style (len() and [i]); got {type(ds).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        eval_warning = check_eval_dataset(args, has_eval=eval_dataset is not None)
        if args.full_determinism:
            prepare_full_determinism()  # before anything here can start CUDA
        self.args = args
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.data_collator, self.loss_fn = data_collator, loss_fn
        self.rank, self.world_size = self._setup_distributed()
        if eval_warning and self.rank == 0:
            log.warning(eval_warning)
        self.device = self._select_device()
        self.model = self._wrap_model(model.to(self.device))
        params = self.unwrapped_model.parameters()
        self.optimizer = optimizer_factory(params) if optimizer_factory else torch.optim.AdamW(
            params, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.lr_scheduler = lr_scheduler_factory(self.optimizer) if lr_scheduler_factory else None
        self.state = TrainerState(max_steps=args.max_steps, world_size=self.world_size,
                                  is_world_process_zero=self.rank == 0)
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(callbacks)
        self.rng = RNGState()
        self.train_loader = self._build_train_loader()
        self.retention = args.retention_policy()
        self.coordinator = self._build_coordinator()
        self.metrics_logger = MetricsLogger(self.run_dir, enabled=self.rank == 0, max_steps=args.max_steps,
                                            progress_bar=args.progress_bar)
        self._diverged = False  # a callback reported divergence (without a recovery policy)
        self._saving_step = 0  # the step of the last save handed to the coordinator
        self._in_flight: tuple[SaveHandle, dict[str, Any]] | None = None  # an async save not yet announced
        self.last_checkpoint: str | None = None  # the newest checkpoint this trainer saved and saw committed
        self._late_errors: list[BaseException] = []  # from on_step_agreed, agreed on at the next step
        self.recovery = self._build_recovery()
        self.step_in_progress: int | None = None  # the step being computed (1-based), between its start and end
        if under_launcher():
            die_with_parent()  # a rank never outlives torchrun (nor keeps the run dir's lock)
        self.watchdog = StepWatchdog(self.rank, self._step_timeout_s(), watch_parent=under_launcher(),
                                     on_hang=self._record_hang)
        self.step_hooks: list[StepHook] = [MetricsHook(self.metrics_logger, lambda: self._last_loss),
                                           RecoveryHook(lambda: self.recovery), WatchdogHook(self.watchdog)]

    # ---- what a concrete trainer provides ---------------------------------------------------------

    def _setup_distributed(self) -> tuple[int, int]:
        """(rank, world size); initialise whatever the trainer needs."""
        raise NotImplementedError

    def _select_device(self) -> torch.device:
        if self.args.device is not None:
            return torch.device(self.args.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def _build_train_loader(self) -> Any:
        """An endless iterator of this rank's batches with state_dict()/load_state_dict() and `progress`."""
        raise NotImplementedError

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU float64 tensor over all ranks (in place) and return it."""
        return values

    def get_state_components(self) -> list[StateComponent]:
        """Every piece of state this trainer owns, with how it is shared (callbacks are added by the base)."""
        raise NotImplementedError

    def get_process_groups(self) -> dict[str, Any]:
        """Process groups that PER_GROUP components name; none by default."""
        return {}

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.model

    @property
    def run_dir(self) -> str:
        return str(self.args.output_dir)

    def _step_timeout_s(self) -> float:
        """args.step_timeout_s, made longer than recovery's own hang detection (which names the missing ranks)
        when that is on, so that it gets the first word."""
        timeout = float(self.args.step_timeout_s)
        health = getattr(self.recovery, "watchdog", None)
        if timeout <= 0 or health is None:
            return timeout
        return max(timeout, health.timeout_s + health.follow_up_s + 5.0)

    def _record_hang(self, step: int, elapsed: float) -> None:
        self.recovery.record_hang(step, elapsed, self.watchdog.timeout_s)

    def _build_recovery(self) -> RecoveryController | NoRecovery:
        policy = self.args.recovery_policy()
        if policy is None:
            return NoRecovery()
        recovery = RecoveryController(self, policy)
        if type(self).training_step is not Trainer.training_step and not getattr(
                self, "recovery_aware_step", False) and self.rank == 0:
            log.warning("%s overrides training_step: recovery's per-step checks (NaN/Inf consensus, gradient spikes, "
                        "out-of-memory retry) and the LR cut after a rollback apply only where it calls "
                        "trainer.end_step(loss, grad_norm) to end its step (docs/recovery.md)",
                        type(self).__name__)
        return recovery

    # ---- the loop ---------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | int | None = _UNSET) -> TrainerState:
        """Train until max_steps (or a callback stops it), resuming first if asked to. Collective."""
        args = self.args
        resume = args.resume_from_checkpoint if resume_from_checkpoint is _UNSET else resume_from_checkpoint
        if args.full_determinism:
            torch.use_deterministic_algorithms(True)
        resumed_from = self._resume_or_seed(resume)
        started: list[StepHook] = []
        try:
            for hook in self.step_hooks:  # the metrics file, recovery, the step watchdog, and any added
                hook.train_begin(self.state.global_step if resumed_from else None)
                started.append(hook)
            self.model.train()
            self.run_callbacks("on_train_begin", resumed_from=resumed_from)
            self._clock = (time.perf_counter(), self.state.tokens_seen, self.state.global_step)
            while self.state.global_step < args.max_steps and not self._one_step():
                pass
        finally:
            self.step_in_progress = None
            for hook in reversed(started):
                hook.train_end()
        self.wait_for_save()  # the last checkpoint is committed before train() returns
        self._agree_on_late_errors()
        self.run_callbacks("on_train_end")
        return self.state

    def _one_step(self) -> bool:
        """Compute one step between the hooks, then log, evaluate and save as planned; True to stop."""
        step = self.step_in_progress = self.state.global_step + 1
        for hook in self.step_hooks:
            hook.step_begin(step)
        try:
            plan = self._run_step()
        finally:
            for hook in reversed(self.step_hooks):
                hook.step_computed(step)
        self.step_in_progress = None
        stop = self._after_step(plan)
        done = self.state.global_step
        for hook in self.step_hooks:  # recovery's may roll back: every hook hears of the step just done
            stop = hook.step_end(done, stop)
        return stop

    def add_step_hook(self, hook: StepHook) -> None:
        """Call `hook` around every step, after the built-in ones (trainers/hooks.py)."""
        self.step_hooks.append(hook)

    def _run_step(self) -> StepPlan:
        errors, self._late_errors = self._late_errors, []  # on_step_agreed's, of the step before
        self._call_guarded("on_step_begin", errors)
        batch = next(self.train_loader)
        tokens = self.count_tokens(batch)
        out = self.training_step(to_device(batch, self.device))
        self.state.global_step += 1
        self.state.epoch = float(self.train_loader.progress)
        if not self.recovery.enabled and not (math.isfinite(out.loss) and math.isfinite(out.grad_norm)):
            self._call_guarded("on_instability", errors, reason="non_finite_loss" if not math.isfinite(out.loss)
                               else "non_finite_grad_norm", loss=out.loss, grad_norm=out.grad_norm)
        self._call_guarded("on_step_end", errors, loss=out.loss, grad_norm=out.grad_norm)
        agreed = self._agree(out, tokens, failed=bool(errors))
        if agreed.failed_ranks:
            raise TrainingError(f"a callback failed at step {self.state.global_step} on ranks "
                                f"{list(agreed.failed_ranks)}" + (f": {errors[0]!r}" if errors else ""),
                                ranks=agreed.failed_ranks, step=self.state.global_step) from (errors[0] if errors
                                                                                              else None)
        self.state.tokens_seen += agreed.tokens
        if not out.skipped:  # a skipped step changed nothing: it stays out of the logged means
            self.state.window_loss_sum += agreed.loss
            self.state.window_grad_norm_sum += out.grad_norm
            self.state.window_steps += 1
            self._last_loss = agreed.loss
        # The agreed loss is identical on every rank: a per-step DivergenceDetector decides alike everywhere.
        # Errors here are agreed on with the next step's flags, so no rank is left waiting.
        self._call_guarded("on_step_agreed", self._late_errors, loss=agreed.loss, grad_norm=out.grad_norm,
                           skipped=out.skipped)
        return plan_step(self.args, self.state.global_step, has_eval=self.eval_dataset is not None,
                         want_eval=agreed.evaluate, want_save=agreed.save, want_stop=agreed.stop,
                         want_abort=agreed.abort)

    def training_step(self, batch: Any) -> StepOutput:
        """Forward, backward, clip, optimizer and scheduler step for one batch already on the device.

        With a recovery policy the step runs in micro-batches and the ranks agree before the optimizer step
        (trainers/recovery/step.py).
        """
        if self.recovery.enabled:
            return self.recovery.training_step(batch)
        loss = self.compute_loss(self.model, batch)
        loss.backward()
        grad_norm = self.clip_gradients()
        return self.end_step(float(loss.detach()), float(grad_norm), apply=True)

    def end_step(self, loss: float, grad_norm: float, apply: bool | None = None) -> StepOutput:
        """The one way every trainer ends a training step, after backward and clipping: the optimizer step (at
        recovery's LR scale) when `apply`, then the scheduler step and cleared gradients either way.

        `apply=None` asks recovery (every rank agrees on NaN/Inf and spikes; without a policy: always applied);
        a caller that already decided (recovery's own step, a plain step) passes it. `grad_norm` must be the whole
        model's norm, the same on every rank.
        """
        if apply is None:
            apply = self.recovery.gate_step(loss, grad_norm)
        finish_step(self.optimizer, self.lr_scheduler, apply, self.recovery.lr_scale(self.state.global_step + 1))
        return StepOutput(loss=loss, grad_norm=grad_norm, skipped=not apply)

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to args.max_grad_norm (None: no clipping); returns the norm before clipping, which
        must be the whole model's norm, the same on every rank."""
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(self.unwrapped_model.parameters(), max_norm)

    def compute_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of `model` on `batch` (loss_fn when given, else what the model returns)."""
        if self.loss_fn is not None:
            return extract_loss(self.loss_fn(model, batch))
        return extract_loss(call_model(model, batch))

    def count_tokens(self, batch: Any) -> int:
        """Tokens in this rank's batch: the elements of its first tensor. Override for padded batches."""
        first = first_tensor(batch)
        return int(first.numel()) if first is not None else 0

    def _agree(self, out: StepOutput, tokens: int, *, failed: bool) -> StepConsensus:
        """Combine the step's loss, token count and control flags across ranks, so all ranks act alike."""
        failed_mask = [0.0] * self.world_size
        failed_mask[self.rank] = float(failed)
        requests = self._recovery_requests()
        summed = self._sum_with_flags([out.loss, float(tokens), *requests, *failed_mask])
        flags = self._agreed_flags(summed[:4])
        self._absorb_requests(summed[6:6 + len(requests)])
        return StepConsensus(loss=summed[4] / self.world_size, tokens=int(summed[5]), **flags,
                             failed_ranks=tuple(r for r, v in enumerate(summed[6 + len(requests):]) if v > 0))

    def _agree_on_late_errors(self) -> None:
        """on_step_agreed may have failed after the last step's agreement: one more small agreement, so every
        rank raises alike."""
        mask = torch.zeros(self.world_size, dtype=torch.float64)
        mask[self.rank] = float(bool(self._late_errors))
        ranks = tuple(r for r, v in enumerate(self.all_reduce_sum(mask).tolist()) if v > 0)
        if ranks:
            first = self._late_errors[0] if self._late_errors else None
            raise TrainingError(f"callback on_step_agreed failed at step {self.state.global_step} on ranks {list(ranks)}"
                                + (f": {first!r}" if first else ""), ranks=ranks, step=self.state.global_step) from first

    def _recovery_requests(self) -> list[float]:
        """Recovery's requests that may start on some ranks only (a report, a signal), agreed with the flags."""
        return self.recovery.local_requests()

    def _absorb_requests(self, summed: list[float]) -> None:
        self.recovery.absorb(summed)

    def _sum_with_flags(self, extra: list[float]) -> list[float]:
        c = self.control
        flags = [c.should_training_stop, c.should_save, c.should_evaluate, c.should_abort_without_save]
        values = torch.tensor([*map(float, flags), *extra], dtype=torch.float64)
        return self.all_reduce_sum(values).tolist()

    def _agreed_flags(self, summed: list[float]) -> dict[str, bool]:
        stop, save, evaluate, abort = (v > 0 for v in summed)
        self.control.should_training_stop = stop
        self.control.should_abort_without_save = abort
        self.control.reset_step_flags()  # consumed: a request applies to one step
        return {"stop": stop, "save": save, "evaluate": evaluate, "abort": abort}

    def _after_step(self, plan: StepPlan) -> bool:
        """Log, evaluate and save as planned, then honour what callbacks asked for meanwhile; True to stop."""
        self._carry_out(plan, done=None)
        # With recovery the ranks agree even on the last step: a divergence reported there means a rollback.
        if (plan.stop and not self.recovery.enabled) or not (plan.log or plan.evaluate or plan.save):
            return plan.stop
        # Hooks ran (on_log, on_evaluate, on_save): an early-stopping callback, say, may have set a flag.
        requests = self._recovery_requests()
        summed = self._sum_with_flags(requests)
        late = self._agreed_flags(summed[:4])
        self._absorb_requests(summed[4:])
        if plan.stop or not any(late.values()):
            return plan.stop
        again = plan_step(self.args, self.state.global_step, has_eval=self.eval_dataset is not None,
                          want_eval=late["evaluate"], want_save=late["save"], want_stop=late["stop"],
                          want_abort=late["abort"])
        self._carry_out(again, done=plan)
        return again.stop

    def _carry_out(self, plan: StepPlan, done: StepPlan | None) -> None:
        """The work `plan` asks for that `done` (the step's earlier plan) has not done already."""
        if plan.log:
            self._log_window()  # an empty window logs nothing
        metrics: dict[str, float] = self._step_metrics if done is not None else {}
        if plan.evaluate and not (done and done.evaluate):
            metrics = self.evaluate()
            self._record_evaluation(metrics)
        self._step_metrics = metrics
        if plan.save and not (done and done.save):
            self.save_checkpoint(metrics)

    # ---- logging and evaluation -------------------------------------------------------------------

    def current_lr(self) -> float:
        """The learning rate the next step uses (with recovery's cut and ramp, when one is in force)."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        return lr * self.recovery.lr_scale(self.state.global_step + 1)

    def _log_window(self) -> None:
        s = self.state
        if s.window_steps == 0:
            return
        entry = {"step": s.global_step, "epoch": s.epoch, "loss": s.window_loss_sum / s.window_steps,
                 "lr": self.current_lr(), "grad_norm": s.window_grad_norm_sum / s.window_steps,
                 "tokens_seen": s.tokens_seen}
        entry.update(self.recovery.log_fields())
        s.log_history.append(entry)
        s.reset_window()
        now = time.perf_counter()
        started, tokens0, step0 = self._clock
        elapsed = max(now - started, 1e-9)
        self._clock = (now, s.tokens_seen, s.global_step)
        shown = {**entry, "tokens_per_s": (s.tokens_seen - tokens0) / elapsed,
                 "steps_per_s": (s.global_step - step0) / elapsed}
        self.metrics_logger.write("train", shown)
        self.run_callbacks("on_log", logs=shown)

    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_dataset, each rank taking its share; {"eval_loss": value} on every rank."""
        if self.eval_dataset is None:
            return {}
        model = self.unwrapped_model  # not the DDP wrapper: uneven shards must not enter its collectives
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in eval_batches(self.eval_dataset, self.args.per_device_eval_batch_size,
                                      num_replicas=self.world_size, rank=self.rank, collate_fn=self.data_collator):
                first = first_tensor(batch)
                n = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
                loss = self.compute_loss(model, to_device(batch, self.device))
                totals += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        model.train(was_training)
        totals = self.all_reduce_sum(totals)
        return {EVAL_PREFIX + "loss": float(totals[0] / totals[1]) if totals[1] > 0 else math.nan}

    def _record_evaluation(self, metrics: dict[str, float]) -> None:
        s = self.state
        s.log_history.append({"step": s.global_step, "epoch": s.epoch, **metrics})
        if self.args.preserve_best_model:
            key = self.args.metric_key
            if key not in metrics:
                raise ValueError(f"TrainingArguments.best_model_metric={self.args.best_model_metric!r} ranks "
                                 f"checkpoints by {key!r}, but evaluate() returned {sorted(metrics)}; name one of "
                                 "those (without the eval_ prefix), or return it from evaluate()")
            value = metrics[key]
            better = bool(self.retention.greater_is_better)
            if math.isfinite(value) and (s.best_metric is None or (
                    value > s.best_metric if better else value < s.best_metric)):
                s.best_metric, s.best_step = value, s.global_step
        self.metrics_logger.write("eval", {"step": s.global_step, **metrics})
        self.run_callbacks("on_evaluate", metrics=metrics)

    # ---- callbacks ----------------------------------------------------------------------------------

    def run_callbacks(self, event: str, /, **kwargs: Any) -> None:  # positional: on_instability gets event=...
        self.control = self.callback_handler.call(
            event, self.args, self.state, self.control, trainer=self, model=self.unwrapped_model,
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, **kwargs)

    def _call_guarded(self, event: str, errors: list[BaseException], /, **kwargs: Any) -> None:
        """Run a per-step event; an error is held until the ranks agree on it (so no rank is left waiting)."""
        try:
            self.run_callbacks(event, **kwargs)
        except Exception as exc:
            log.error("rank %d: callback %s failed at step %d: %r", self.rank, event, self.state.global_step, exc)
            errors.append(exc)
