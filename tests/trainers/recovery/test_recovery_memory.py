"""Rollbacks from host-memory copies (rollback_memory_mb): bit-identical to a rollback from the disk, a fall back
to the disk when the budget excludes the copy or a rank lacks it, and which copies the budget keeps."""

from __future__ import annotations

import torch

from ckpt import SharingPattern, StateComponent
from tests.support.distributed import expect_ok, run_ranks
from tests.support.recovery import train
from tests.support.toys import plain
from trainers import TrainerCallback
from trainers.recovery import FaultInjection, RecoveryPolicy, read_events
from trainers.recovery.memory import MIB, HostCopies, restore

# A per-step detector for the toy regression; the LR jump at step 25 is caught within a few steps.
PER_STEP = {"per_step": True, "warmup": 6, "patience": 3, "smoothing": 0.5, "threshold": None,
            "relative_threshold": 3.0}


def _policy(memory_mb: float) -> RecoveryPolicy:
    return RecoveryPolicy(detector=PER_STEP, lr_ramp_steps=10, grad_norm_spike_factor=0,
                          rollback_memory_mb=memory_mb)


def _outcome(t, rec) -> dict:
    rollback = [e["values"] for e in read_events(t.run_dir) if e["kind"] == "rollback"]
    return {"model": plain(t.unwrapped_model.state_dict()), "optimizer": plain(t.optimizer.state_dict()["state"]),
            "losses": rec.losses, "step": t.state.global_step, "log": [
                {k: v for k, v in e.items() if k not in ("tokens_per_s", "steps_per_s")} for e in t.state.log_history],
            "rollback": [(v["from_step"], v["to_step"], v["restored_from"]) for v in rollback]}


def _diverging(run_dir: str, memory_mb: float, trainer: str = "simple", extra: list | None = None) -> dict:
    callbacks = [FaultInjection(divergence_step=25, divergence_lr_factor=300), *(extra or [])]
    t, rec = train(run_dir, recovery=_policy(memory_mb), callbacks=callbacks, trainer=trainer, max_steps=40)
    return _outcome(t, rec)


def test_a_rollback_from_memory_matches_one_from_the_disk_bit_for_bit(tmp_path):
    memory = _diverging(str(tmp_path / "memory"), 16)
    disk = _diverging(str(tmp_path / "disk"), 0)
    assert [r[2] for r in memory["rollback"]] == ["memory"] and [r[2] for r in disk["rollback"]] == ["disk"]
    assert [r[:2] for r in memory["rollback"]] == [r[:2] for r in disk["rollback"]]
    from_step, to_step = memory["rollback"][0][:2]
    assert 25 < from_step < 35 and to_step == 20  # caught within a few steps; the checkpoint before the fault
    for key in ("model", "optimizer", "losses", "step", "log"):
        assert memory[key] == disk[key], key


class KeptCopies(TrainerCallback):
    """Records, at each step end, the steps of the host copies and whether each is an async save's staged one."""

    def __init__(self):
        self.seen: list[list[tuple[int, bool]]] = []

    def on_step_end(self, args, state, control, **kwargs):
        copies = kwargs["trainer"].recovery.copies.copies
        self.seen.append([(c.step, c.give_back is not None) for c in copies])


def test_an_async_save_s_staged_copy_is_the_rollback_copy_and_matches_the_disk(tmp_path):
    kept = KeptCopies()
    callbacks = [FaultInjection(divergence_step=25, divergence_lr_factor=300), kept]
    t, rec = train(str(tmp_path / "async"), recovery=_policy(16), callbacks=callbacks, max_steps=40, async_save=True)
    staged = _outcome(t, rec)
    disk = _diverging(str(tmp_path / "disk"), 0)
    assert [r[2] for r in staged["rollback"]] == ["memory"]
    assert [r[:2] for r in staged["rollback"]] == [r[:2] for r in disk["rollback"]]
    held = {copy for step in kept.seen for copy in step}
    assert held and all(from_staging for _, from_staging in held), held  # no second copy of any save
    for key in ("model", "optimizer", "losses", "step"):
        assert staged[key] == disk[key], key


def test_a_budget_too_small_for_the_copy_falls_back_to_the_disk(tmp_path):
    tiny = _diverging(str(tmp_path / "tiny"), 0.001)  # ~1 KiB: less than the model and its optimizer state
    disk = _diverging(str(tmp_path / "disk"), 0)
    assert [r[2] for r in tiny["rollback"]] == ["disk"]
    assert tiny["model"] == disk["model"] and tiny["losses"] == disk["losses"]


class DropCopiesOn(TrainerCallback):
    """Empties the host copies on one rank at a step (as if that rank's budget had excluded them)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, **kwargs):
        t = kwargs["trainer"]
        if t.rank == self.rank and state.global_step == self.step:
            t.recovery.copies.copies.clear()


def _ddp(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    return {"memory": _diverging(f"{root}/memory", 16, "ddp"),
            "disk": _diverging(f"{root}/disk", 0, "ddp"),
            "one_rank_lacks": _diverging(f"{root}/lacks", 16, "ddp", [DropCopiesOn(1, 24)])}


def test_ddp_ranks_restore_from_memory_together_or_all_from_the_disk(tmp_path):
    r0, r1 = expect_ok(run_ranks(2, _ddp, str(tmp_path)))
    for name in ("memory", "disk", "one_rank_lacks"):
        assert r0[name]["model"] == r1[name]["model"], f"{name}: replicas differ"
        assert r0[name]["rollback"] == r1[name]["rollback"], name
    assert [r[2] for r in r0["memory"]["rollback"]] == ["memory"]
    assert [r[2] for r in r0["disk"]["rollback"]] == ["disk"]
    assert [r[2] for r in r0["one_rank_lacks"]["rollback"]] == ["disk"]
    for key in ("model", "optimizer", "losses", "step"):
        assert r0["memory"][key] == r0["disk"][key] == r0["one_rank_lacks"][key], key


class Box:
    """A stateful holding one tensor of `n` float32 values."""

    def __init__(self, n: int):
        self.value = torch.zeros(n)

    def state_dict(self) -> dict:
        return {"value": self.value, "meta": {"n": [len(self.value)]}}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_the_budget_evicts_the_oldest_copy_but_not_the_vouched_one_during_a_bad_run():
    box = Box(256)  # 1 KiB
    components = [StateComponent("box", box, SharingPattern.GLOBAL)]
    copies = HostCopies(int(2.5 * 1024), rank=0)  # room for two copies
    for step in (10, 20, 30):
        box.value = torch.full((256,), float(step))
        assert copies.keep(step, f"ckpt-{step}", components, {"step": step}, vouched_bound=None)
    assert copies.steps() == [20, 30]  # the oldest went
    # A bad run is in progress and only step 20 is vouched for: a new save evicts 30, never 20.
    box.value = torch.full((256,), 40.0)
    assert copies.keep(40, "ckpt-40", components, {}, vouched_bound=25)
    assert copies.steps() == [20, 40]
    # The held state is a private copy: changing the live tensor changes nothing held, and a restore hands out
    # a fresh copy each time.
    box.value.add_(1)
    restore(copies.get(20), components)
    assert torch.equal(box.value, torch.full((256,), 20.0))
    box.value.add_(5)
    restore(copies.get(20), components)
    assert torch.equal(box.value, torch.full((256,), 20.0))
    copies.forget_after(20)
    assert copies.steps() == [20] and copies.nbytes == 1024


def test_a_copy_larger_than_the_whole_budget_is_not_kept():
    components = [StateComponent("box", Box(1024), SharingPattern.GLOBAL)]
    copies = HostCopies(MIB // 1024, rank=0)
    assert not copies.keep(5, "ckpt-5", components, {}, vouched_bound=None)
    assert copies.steps() == []


class Uncopyable:
    """A stateful whose state cannot be deep-copied (it holds a lock)."""

    def state_dict(self) -> dict:
        import threading

        return {"lock": threading.Lock()}

    def load_state_dict(self, state: dict) -> None:
        del state


def test_a_state_that_cannot_be_copied_is_not_kept_and_nothing_raises(caplog):
    components = [StateComponent("box", Box(4), SharingPattern.GLOBAL),
                  StateComponent("odd", Uncopyable(), SharingPattern.GLOBAL)]
    copies = HostCopies(MIB, rank=0)
    assert not copies.keep(5, "ckpt-5", components, {}, vouched_bound=None)
    assert copies.steps() == [] and "could not keep a host copy of step 5" in caplog.text
