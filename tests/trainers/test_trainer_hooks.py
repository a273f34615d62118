"""Step hooks, the one step ending (Trainer.end_step), the null recovery object, and the shape of trainers/:
no import cycles, no imports inside functions to dodge them, recovery using only public trainer methods."""

from __future__ import annotations

import ast
import os
import re

import pytest
import torch

from tests.support.files import REPO
from tests.support.toys import Regression, TinyMLP
from trainers import SimpleTrainer, TrainingArguments
from trainers.hooks import StepHook
from trainers.recovery import NoRecovery

ROOT = REPO
TRAINERS = os.path.join(ROOT, "trainers")


def _trainer(run_dir, **kw) -> SimpleTrainer:
    torch.manual_seed(0)
    args = TrainingArguments(**{"output_dir": str(run_dir), "max_steps": 4, "per_device_train_batch_size": 4,
                                "logging_steps": 2, **kw})
    return SimpleTrainer(TinyMLP(), args, train_dataset=Regression(40))


class Recorder:
    """A StepHook writing down every call; asks to stop after step `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def train_begin(self, resumed_step):
        self.calls.append(("train_begin", resumed_step))

    def step_begin(self, step):
        self.calls.append(("step_begin", step))

    def step_computed(self, step):
        self.calls.append(("step_computed", step))

    def step_end(self, step, stop):
        self.calls.append(("step_end", step, stop))
        return stop or step == self.stop_at

    def train_end(self):
        self.calls.append(("train_end",))


def test_the_loop_calls_each_hook_around_every_step(tmp_path):
    trainer = _trainer(tmp_path)
    hook: StepHook = Recorder()
    trainer.add_step_hook(hook)
    trainer.train()
    expected = [("train_begin", None)]
    for step in range(1, 5):
        expected += [("step_begin", step), ("step_computed", step), ("step_end", step, step == 4)]  # 4: max_steps
    assert hook.calls == [*expected, ("train_end",)]


def test_a_hook_may_stop_training(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.add_step_hook(Recorder(stop_at=2))
    state = trainer.train()
    assert state.global_step == 2


def test_a_failing_step_still_ends_the_hooks(tmp_path):
    class Boom(SimpleTrainer):
        def training_step(self, batch):
            raise RuntimeError("boom in the step")

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4)
    trainer = Boom(TinyMLP(), args, train_dataset=Regression(40))
    hook = Recorder()
    trainer.add_step_hook(hook)
    with pytest.raises(RuntimeError, match="boom in the step"):
        trainer.train()
    assert hook.calls == [("train_begin", None), ("step_begin", 1), ("step_computed", 1), ("train_end",)]


def test_end_step_with_apply_false_leaves_the_weights_and_marks_the_step_skipped(tmp_path):
    class Skipping(SimpleTrainer):
        def training_step(self, batch):
            loss = self.compute_loss(self.model, batch)
            loss.backward()
            grad_norm = float(self.clip_gradients())
            return self.end_step(float(loss.detach()), grad_norm, apply=False)

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1)
    trainer = Skipping(TinyMLP(), args, train_dataset=Regression(40))
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.train()
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.unwrapped_model.parameters())  # cleared either way


def test_end_step_applies_by_default_without_a_recovery_policy(tmp_path):
    class Ending(SimpleTrainer):
        def training_step(self, batch):
            loss = self.compute_loss(self.model, batch)
            loss.backward()
            return self.end_step(float(loss.detach()), float(self.clip_gradients()))

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4)
    trainer = Ending(TinyMLP(), args, train_dataset=Regression(40))
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.train()
    after = trainer.unwrapped_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_without_a_policy_recovery_is_the_null_object(tmp_path):
    trainer = _trainer(tmp_path)
    assert isinstance(trainer.recovery, NoRecovery) and not trainer.recovery.enabled
    assert trainer.recovery.components() == []
    assert trainer.recovery.lr_scale(1) == 1.0 and trainer.recovery.gate_step(1.0, 1.0)
    assert not any(c.key.startswith("recovery") for c in trainer.all_components())


# ---- the shape of trainers/ ----------------------------------------------------------------------------

def _modules() -> dict[str, ast.Module]:
    out = {}
    for folder, _, names in os.walk(TRAINERS):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                with open(path, encoding="utf-8") as f:
                    out[rel.removesuffix(".__init__")] = ast.parse(f.read(), path)
    return out


def _module_level_imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """trainers modules this one imports at run time (TYPE_CHECKING blocks left out)."""
    package = module if module + ".__init__" in known or module == "trainers" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, ast.Try | ast.If) else [node]:
            if isinstance(sub, ast.ImportFrom):
                base = package
                for _ in range(max(sub.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (f"{base}.{sub.module}" if sub.module else base) if sub.level else (sub.module or "")
                for alias in sub.names:
                    for candidate in (f"{target}.{alias.name}", target):
                        if candidate in known:
                            found.add(candidate)
                            break
            elif isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name in known}
    found.discard(module)
    return found


def test_trainers_has_no_import_cycles():
    trees = _modules()
    packages = {m for m in trees if os.path.isdir(os.path.join(ROOT, *m.split(".")))}
    known = set(trees) | {p + ".__init__" for p in packages}
    graph = {m: _module_level_imports(m, t, known) for m, t in trees.items()}
    # A package's __init__ importing its own submodules is how packages work; a cycle through it is not.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if n in packages and m.startswith(n + "."):
                continue  # a submodule reaching its own package's __init__
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# Imports inside functions that are not about cycles: an optional dependency, and the demo's end-of-run listing.
_ALLOWED_LOCAL_IMPORTS = {("trainers.accel", "accelerate"), ("trainers.demo.cli", "ckpt.cli")}


def test_no_imports_inside_functions():
    found = []
    for module, tree in _modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if (module, name) not in _ALLOWED_LOCAL_IMPORTS:
                        found.append(f"{module}.{fn.name}: {ast.unparse(node)}")
    assert not found, found


def test_recovery_calls_no_private_trainer_method():
    private = re.compile(r"\b(?:t|trainer|host)\._[a-z]\w*")
    hits = []
    for folder, _, names in os.walk(os.path.join(TRAINERS, "recovery")):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    hits += [f"{name}: {m}" for m in private.findall(f.read())]
    assert not hits, hits
