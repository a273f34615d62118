"""Recovery with DDPTrainer on 2 real gloo ranks: every rank takes the same action at the same step.

A NaN on one rank is skipped by both; an out-of-memory error on one rank halves the micro-batch on both and
keeps the global batch; a divergence rolls both back with the same LR cut and ramp; SIGTERM on one rank
makes both save at the same step boundary and return normally. All scenarios run in one spawn.
"""

from __future__ import annotations

import signal

import torch

from tests.support.distributed import expect_ok, run_ranks
from tests.support.recovery import DETECTOR, BadLoss, SendSignal, logged, train
from tests.support.toys import plain

SCENARIOS = ("nan", "oom", "divergence", "sigterm")


def _scenario(name: str, run_dir: str) -> dict:
    from trainers.recovery import FaultInjection, RecoveryPolicy

    policy = RecoveryPolicy(detector=None, health_check_interval=5, health_check_timeout_s=60)
    extra: dict = {}
    if name == "nan":
        callbacks = [BadLoss({5}, ranks={1})]
    elif name == "oom":
        callbacks, extra = [FaultInjection(oom_step=4, rank=1)], {"batch": 4}
    elif name == "divergence":
        policy = RecoveryPolicy(detector=DETECTOR, lr_ramp_steps=10, grad_norm_spike_factor=0)
        callbacks = [FaultInjection(divergence_step=25, divergence_lr_factor=300)]
    else:
        callbacks = [SendSignal(7, rank=1, sig=signal.SIGTERM)]
    t, rec = train(run_dir, recovery=policy, callbacks=callbacks, trainer="ddp",
                   max_steps=40 if name == "divergence" else 12, **extra)
    return {"events": [(e.step, e.kind, e.action, e.ranks) for e in t.recovery.events.events],
            "model": plain(t.unwrapped_model.state_dict()), "step": t.state.global_step,
            "adam_steps": int(t.optimizer.state[next(iter(t.optimizer.state))]["step"]),
            "micro": logged(t, "micro_batch_size"), "global": logged(t, "global_batch_size"),
            "lr_scale": logged(t, "lr_scale"), "losses": rec.losses,
            "checkpoints": [r.step for r in t.coordinator.checkpoints()]}


def _all(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    return {name: _scenario(name, f"{root}/{name}") for name in SCENARIOS}


def test_every_rank_takes_the_same_recovery_action(tmp_path):
    results = expect_ok(run_ranks(2, _all, str(tmp_path)))
    r0, r1 = results
    for name in SCENARIOS:
        assert r0[name]["events"] == r1[name]["events"], name
        assert r0[name]["model"] == r1[name]["model"], f"{name}: replicas differ"
    # NaN on rank 1 only: both ranks skip step 5 (one Adam step fewer), nothing else happens.
    nan = r0["nan"]
    assert nan["events"] == [(5, "non_finite", "skip", (1,))] and nan["adam_steps"] == 11
    assert [s for s, loss in r1["nan"]["losses"] if loss != loss] == [5]
    # Out of memory on rank 1 at step 4: both halve the micro-batch; the global batch stays 2 x 4.
    oom = r0["oom"]
    assert oom["events"] == [(4, "oom_retry", "retry", (1,))]
    assert oom["micro"] == {2: 4, 4: 2, 6: 2, 8: 2, 10: 2, 12: 2} and set(oom["global"].values()) == {8}
    assert oom["step"] == 12 and oom["adam_steps"] == 12
    # Divergence: the same rollback and LR ramp on both ranks.
    div = r0["divergence"]
    assert [k for _, k, _, _ in div["events"]] == ["divergence", "rollback", "lr_change"]
    assert div["step"] == 40 and div["lr_scale"][22] == 0.6 and div["lr_scale"][30] == 1.0
    # SIGTERM on rank 1 after step 7: both save step 7 and stop cleanly.
    term = r0["sigterm"]
    assert term["step"] == 7 and term["checkpoints"][-1] == 7
    assert term["events"] == [(7, "emergency_save", "save_and_stop", ())]
