"""`ckpt export --format torch|dcp|hf` from every sharing pattern, and `ckpt import` from each source format.

Pipeline stages (PER_RANK, keyed by parameter name) and tensor-parallel shards (PER_GROUP shard entries) written by
real 2-rank gloo jobs come out as the full model; torch.save and DCP exports read back with torch.load and
torch.distributed.checkpoint.load; imports are committed checkpoints that `ckpt verify` accepts and a trainer
resumes from.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckpt import CheckpointCoordinator, SharingPattern, StateComponent
from ckpt.cli import main
from ckpt.cli.export_formats import parse_size, split_shards
from tests.support.distributed import expect_ok, run_ranks
from tests.support.files import REPO
from tests.support.parallel import run
from tests.support.toys import Regression, TinyMLP, plain
from tests.support.workers import Box


def _parallel(rank: int, world: int, cfg: dict, run_dir: str) -> dict:
    torch.set_num_threads(1)
    return run(cfg, run_dir, total=4)["model"]


@pytest.mark.parametrize("cfg", [{"kind": "pipeline", "schedule": "gpipe", "micro": 2},
                                 {"kind": "tp", "dp": 1, "size": 2}], ids=["pipeline-per-rank", "tp-per-group"])
def test_hf_export_reassembles_the_full_model_from_a_two_rank_job(tmp_path, cfg):
    per_rank = expect_ok(run_ranks(2, _parallel, cfg, str(tmp_path / "run")))
    whole = {name: t for model in per_rank for name, t in model.items()}  # each stage's names, or full TP tensors
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run" / "checkpoint-00000004"), "--format", "hf", "-o", str(out)]) == 0
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(whole)
    for name, t in whole.items():
        assert plain(exported[name]) == t, name


def _save_simple(run_dir: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(*Regression(4)[0:4]).backward()
    opt.step()
    with CheckpointCoordinator(run_dir) as coord:
        coord.save(3, [StateComponent("model", model, SharingPattern.GLOBAL),
                       StateComponent("optimizer", opt, SharingPattern.GLOBAL),
                       StateComponent("extra", Box({"n": 5, "w": torch.arange(4)}), SharingPattern.GLOBAL)])
    return model, opt


def test_torch_and_dcp_exports_hold_the_full_state(tmp_path):
    model, opt = _save_simple(str(tmp_path / "run"))
    ck = str(tmp_path / "run" / "checkpoint-00000003")
    assert main(["export", ck, "--format", "torch", "-o", str(tmp_path / "full.pt")]) == 0
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert sorted(full) == ["extra", "model", "optimizer"] and full["extra"]["n"] == 5
    assert all(torch.equal(full["model"][k], v) for k, v in model.state_dict().items())
    assert torch.equal(full["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert main(["export", ck, "--format", "dcp", "-o", str(tmp_path / "dcp"), "--component", "model"]) == 0
    template = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(template, checkpoint_id=str(tmp_path / "dcp"))
    assert all(torch.equal(template[k], v) for k, v in model.state_dict().items())
    # The whole state too: DCP's own reader gets every component back.
    assert main(["export", ck, "--format", "dcp", "-o", str(tmp_path / "dcp_all")]) == 0
    everything = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
                  "extra": {"n": 0, "w": torch.zeros(4, dtype=torch.int64)}}
    dcp.load(everything, checkpoint_id=str(tmp_path / "dcp_all"))
    assert everything["extra"]["n"] == 5 and torch.equal(everything["extra"]["w"], torch.arange(4))


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    _save_simple(str(tmp_path / "run"))
    ck = str(tmp_path / "run" / "checkpoint-00000003")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["export", ck, "--format", "dcp", "-o", str(tmp_path / "busy")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert main(["export", ck, "--format", "hf", "-o", str(tmp_path / "hf"), "--component", "nope"]) == 2
    assert "has no component 'nope'" in capsys.readouterr().err
    assert main(["export", ck, "--format", "hf", "-o", str(tmp_path / "hf"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots' is not a size" in capsys.readouterr().err
    assert main(["export", ck, "--format", "hf", "-o", str(tmp_path / "hf"), "--rank", "1"]) == 2
    assert "--rank picks a copy for --format safetensors" in capsys.readouterr().err


def test_shard_sizes_follow_hugging_face_rules():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    from ckpt.cli.assemble import PlannedTensor

    tensors = [PlannedTensor(f"t{i}", torch.float32, (n,), ()) for i, n in enumerate([10, 10, 40, 5, 5])]
    shards = split_shards(tensors, 80)  # 40, 40, 160 (alone: larger than the limit), 20+20 bytes
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


# ---- import ---------------------------------------------------------------------------------------------------

class _AtStart:
    """What the trainer holds when training begins (right after its resume)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.step = state.global_step
        self.model = {k: v.clone() for k, v in model.state_dict().items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict()["state"])
        self.lr = optimizer.param_groups[0]["lr"]


def _trainer(run_dir: str, steps: int, callbacks=(), **options):
    from trainers import SimpleTrainer, TrainingArguments

    args = TrainingArguments(output_dir=run_dir, max_steps=steps, per_device_train_batch_size=4, save_steps=steps,
                             logging_steps=steps, seed=0, progress_bar=False, **options)
    torch.manual_seed(42)
    return SimpleTrainer(TinyMLP(), args, train_dataset=Regression(32), callbacks=list(callbacks),
                         optimizer_factory=lambda p: torch.optim.AdamW(p, lr=0.05),
                         lr_scheduler_factory=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)))


def _source_state() -> dict:
    """A model and optimizer as a user's own loop leaves them, after a few steps."""
    torch.manual_seed(3)
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = Regression(8, seed=4)
    for i in range(3):
        opt.zero_grad()
        model(*data[i * 2: i * 2 + 2]).backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}


def _resume_and_check(run_dir: str, source: dict, with_optimizer: bool) -> None:
    assert main(["verify", os.path.join(run_dir, "checkpoint-00000010")]) == 0
    start = _AtStart()
    trainer = _trainer(run_dir, 12, [start], resume_from_checkpoint="latest")
    trainer.train()
    assert start.step == 10 and trainer.state.global_step == 12
    assert start.lr == 0.05 / 11  # the schedule continues at step 10
    for k, v in source["model"].items():
        assert torch.equal(start.model[k], v), k
    if with_optimizer:
        saved = source["optimizer"]["state"]
        assert sorted(start.optimizer) == sorted(saved)
        for i, values in saved.items():  # every parameter's moments, in torch.optim's numbering
            assert all(torch.equal(start.optimizer[i][k], values[k]) for k in ("exp_avg", "exp_avg_sq", "step")), i
    else:
        assert start.optimizer == {}
    assert main(["verify", os.path.join(run_dir, "checkpoint-00000012")]) == 0
    trainer.coordinator.close()


def test_import_of_a_torch_save_file_resumes_model_and_optimizer(tmp_path, capsys):
    source = _source_state()
    torch.save(source, tmp_path / "mine.pt")
    assert main(["import", str(tmp_path / "mine.pt"), str(tmp_path / "run"), "--step", "10"]) == 0
    out = capsys.readouterr().out
    assert "model (4 tensors), optimizer (" in out and "left out: epoch" in out
    _resume_and_check(str(tmp_path / "run"), source, with_optimizer=True)


def test_import_of_a_plain_model_state_dict_resumes_the_model(tmp_path):
    source = _source_state()
    torch.save(source["model"], tmp_path / "weights.pt")
    assert main(["import", str(tmp_path / "weights.pt"), str(tmp_path / "run"), "--step", "10"]) == 0
    _resume_and_check(str(tmp_path / "run"), source, with_optimizer=False)


def test_import_of_a_dcp_checkpoint_resumes_model_and_optimizer(tmp_path):
    source = _source_state()
    dcp.save({"model": source["model"], "optimizer": source["optimizer"]}, checkpoint_id=str(tmp_path / "dcp"),
             no_dist=True)
    assert main(["import", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "10"]) == 0
    _resume_and_check(str(tmp_path / "run"), source, with_optimizer=True)


def test_import_of_a_dcp_checkpoint_keyed_by_parameter_name_resumes_the_optimizer(tmp_path):
    """DCP's get_optimizer_state_dict keys the optimizer state by parameter name; the import numbers it in the
    order of its param_groups, as torch.optim expects, and the trainer gets Adam's moments back exactly."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    source = _source_state()
    model = TinyMLP()
    model.load_state_dict(source["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt.load_state_dict(source["optimizer"])
    by_name = get_optimizer_state_dict(model, opt)
    assert "net.0.weight" in by_name["state"]  # keyed by name, not by number
    dcp.save({"model": get_model_state_dict(model), "optimizer": by_name}, checkpoint_id=str(tmp_path / "dcp"),
             no_dist=True)
    assert main(["import", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "10"]) == 0
    _resume_and_check(str(tmp_path / "run"), source, with_optimizer=True)


def test_import_refuses_code_in_a_torch_save_file(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(2)}, "hook": Box({})}, tmp_path / "evil.pt")
    assert main(["import", str(tmp_path / "evil.pt"), str(tmp_path / "run"), "--step", "1"]) == 2
    assert "torch.load(weights_only=True) refuses (it would have to run code to rebuild them): tests.support.workers.Box" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint-00000001").exists()


def test_import_of_a_file_that_is_no_torch_save_file_says_so(tmp_path, capsys):
    (tmp_path / "page.html").write_text("<html>not a checkpoint</html>")
    assert main(["import", str(tmp_path / "page.html"), str(tmp_path / "run"), "--step", "1"]) == 2
    err = capsys.readouterr().err
    assert "page.html is not a torch.save file that torch.load(weights_only=True) can read" in err
    assert "weights_only` set to `False`" not in err  # never the advice to run the file's code
    assert not (tmp_path / "run" / "checkpoint-00000001").exists()


def test_import_refuses_a_dcp_metadata_file_that_would_run_code(tmp_path, capsys):
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    marker = tmp_path / "ran"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")  # os.system(...) when unpickled
    (tmp_path / "dcp" / ".metadata").write_bytes(payload)
    assert main(["import", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "1"]) == 2
    assert "is not part of DCP's metadata" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("torch.distributed.checkpoint.filesystem", "os.system"),
                                          ("torch.distributed.checkpoint.metadata", "os.system"),
                                          ("torch.distributed.checkpoint.state_dict_saver", "save")])
def test_import_refuses_dcp_metadata_reaching_code_through_a_dcp_module(tmp_path, capsys, module, name):
    # A protocol-4 STACK_GLOBAL with a dotted name walks the module's imports: filesystem.os.system is os.system.
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    marker = tmp_path / "ran"
    arg = f"touch {marker}".encode()
    payload = (b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode()
               + b"\x93\x8c" + bytes([len(arg)]) + arg + b"\x85R.")
    (tmp_path / "dcp" / ".metadata").write_bytes(payload)
    assert main(["import", str(tmp_path / "dcp"), str(tmp_path / "run"), "--step", "1"]) == 2
    assert f"{module}.{name} is not part of DCP's metadata" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoint-00000001").exists()


def test_import_console_script_round_trip(tmp_path):
    """The installed entry point: export to torch, import back, the model is bit for bit the same."""
    model, _ = _save_simple(str(tmp_path / "run"))
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-c", "import sys; from ckpt.cli import main; sys.exit(main())"]
    subprocess.run([*cmd, "export", str(tmp_path / "run" / "checkpoint-00000003"), "--format", "torch",
                    "--component", "model", "-o", str(tmp_path / "m.pt")], check=True, env=env)
    subprocess.run([*cmd, "import", str(tmp_path / "m.pt"), str(tmp_path / "run2"), "--step", "0"], check=True, env=env)
    full = torch.load(tmp_path / "m.pt", weights_only=True)
    assert sorted(full) == sorted(model.state_dict())


def test_hf_export_memory_stays_near_one_tensor_not_the_model(tmp_path):
    """128 MiB of weights in 8 tensors of 16 MiB: the export's peak resident memory grows by under half the model
    (34 MiB measured: a couple of tensors and read buffers), where reading the model whole would grow it by 128
    MiB. The peak is Linux's VmHWM, reset just before the export (the process's peak while importing torch is
    higher than the whole export's, so a peak kept from the start would hide it)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the process's peak memory")
    model = Box({f"layer{i}.weight": torch.full((2048, 2048), float(i)) for i in range(8)})
    with CheckpointCoordinator(tmp_path / "run") as coord:
        coord.save(1, [StateComponent("model", model, SharingPattern.GLOBAL)])
    del model
    script = ("import re, sys\nfrom ckpt.cli import main\n"
              "def kib(key):\n"
              "    return int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "try:\n"
              "    with open('/proc/self/clear_refs', 'w') as f:\n"
              "        f.write('5')\n"  # VmHWM := VmRSS
              "except OSError as exc:\n"
              "    sys.exit(f'cannot reset the peak memory: {exc}')\n"
              "before = kib('VmRSS')\n"
              "code = main(['export', sys.argv[1], '--format', 'hf', '-o', sys.argv[2], '--max-shard-size', '40MB'])\n"
              "print(code, (kib('VmHWM') - before) * 1024)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run" / "checkpoint-00000001"),
                           str(tmp_path / "hf")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
                          timeout=300)
    if "cannot reset the peak memory" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    code, grew = proc.stdout.split()[-2:]
    assert code == "0", proc.stderr[-2000:]
    assert int(grew) < 64 * 2**20, f"peak memory grew by {int(grew) / 2**20:.0f} MiB exporting a 128 MiB model"
    assert len(list((tmp_path / "hf").glob("model-*-of-00004.safetensors"))) == 4
    exported = load_file(str(tmp_path / "hf" / "model-00004-of-00004.safetensors"))
    assert torch.equal(exported["layer7.weight"], torch.full((2048, 2048), 7.0))
