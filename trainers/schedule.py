"""When to log, evaluate and save: pure functions of the options, the step and the callbacks' requests."""

from __future__ import annotations

from dataclasses import dataclass

from .arguments import TrainingArguments


@dataclass(frozen=True)
class StepPlan:
    """What happens after one optimizer step (identical on every rank)."""

    log: bool
    evaluate: bool
    save: bool
    stop: bool


def on_interval(step: int, every: int | None) -> bool:
    return every is not None and step > 0 and step % every == 0


def plan_step(args: TrainingArguments, step: int, *, has_eval: bool, want_eval: bool = False,
              want_save: bool = False, want_stop: bool = False, want_abort: bool = False) -> StepPlan:
    """Decide the work after `step`. `want_*` are the callbacks' requests (already agreed across ranks)."""
    if want_abort:
        return StepPlan(log=True, evaluate=False, save=False, stop=True)
    stop = want_stop or step >= args.max_steps
    save = want_save or on_interval(step, args.save_steps) or (stop and args.save_on_train_end)
    evaluate = want_eval or on_interval(step, args.eval_steps)
    # eval_on_save makes every checkpoint carry its metrics; preserve_best_model needs them even on saves
    # that no schedule foresaw (the end of training, a callback's request).
    if save and (args.eval_on_save or args.preserve_best_model):
        evaluate = True
    # The last step always logs; an early stop does not, so its partial window (saved in the trainer state)
    # carries on after a resume and the log history matches a run that never stopped.
    log = on_interval(step, args.logging_steps) or step >= args.max_steps
    return StepPlan(log=log, evaluate=evaluate and has_eval, save=save, stop=stop)


def planned_steps(args: TrainingArguments, *, has_eval: bool = True) -> list[tuple[int, StepPlan]]:
    """Every step with an evaluation or a save, for a run without callbacks (docs, tests, dry runs)."""
    out = []
    for step in range(1, args.max_steps + 1):
        plan = plan_step(args, step, has_eval=has_eval)
        if plan.evaluate or plan.save:
            out.append((step, plan))
    return out
