"""`ckpt export --format hf` of a GPT-2 trained by SimpleTrainer loads with `from_pretrained` and gives the same
logits; `ckpt import` of a Hugging Face folder resumes a trainer with the same weights."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from ckpt.cli import main
from tests.support.interop import gpt2, gpt2_config, logits, train_gpt2, transformers


def _keys(path: str) -> set[str]:
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def test_hf_export_of_a_trained_gpt2_loads_with_from_pretrained(tmp_path):
    trainer = train_gpt2(str(tmp_path / "run"))
    source = trainer.unwrapped_model
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run" / "checkpoint-00000003"), "--format", "hf", "-o", str(out)]) == 0
    keys = _keys(str(out / "model.safetensors"))
    # The tied weight is stored once, under the input embedding's name, as save_pretrained does.
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert keys == set(source.state_dict()) - {"lm_head.weight"}
    gpt2_config().save_pretrained(out)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert torch.equal(logits(loaded), logits(source))
    assert not torch.equal(source.transformer.wte.weight, gpt2().transformer.wte.weight)  # training changed it


def test_sharded_hf_export_writes_an_index_and_loads(tmp_path):
    trainer = train_gpt2(str(tmp_path / "run"))
    out = tmp_path / "hf"
    code = main(["export", str(tmp_path / "run" / "checkpoint-00000003"), "--format", "hf", "-o", str(out),
                 "--max-shard-size", "20kB", "--json"])
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    sizes = {n: 0 for n in files}
    state = trainer.unwrapped_model.state_dict()
    for name, file in index["weight_map"].items():
        assert name in _keys(str(out / file))
        sizes[file] += state[name].numel() * state[name].element_size()
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert all(size <= 20_000 for n, size in sizes.items() if len(_keys(str(out / n))) > 1)
    gpt2_config().save_pretrained(out)
    assert torch.equal(logits(transformers.GPT2LMHeadModel.from_pretrained(out)), logits(trainer.unwrapped_model))
    # A later single-file export into the same folder replaces the shards and the index.
    assert main(["export", str(tmp_path / "run" / "checkpoint-00000003"), "--format", "hf", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_hf_export_converts_floating_tensors_with_dtype(tmp_path):
    trainer = train_gpt2(str(tmp_path / "run"))
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run" / "checkpoint-00000003"), "--format", "hf", "-o", str(out),
                 "--dtype", "bfloat16", "--no-tie"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" in names
        wte = f.get_tensor("transformer.wte.weight")
    assert wte.dtype == torch.bfloat16
    assert torch.equal(wte, trainer.unwrapped_model.transformer.wte.weight.detach().to(torch.bfloat16))


def test_a_trainer_resumes_from_an_imported_hf_folder(tmp_path):
    source = gpt2(seed=7)
    source.save_pretrained(tmp_path / "hf")  # stores the tied weight once
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--step", "2"]) == 0
    assert main(["verify", str(tmp_path / "run" / "checkpoint-00000002")]) == 0
    resumed = gpt2(seed=1)
    trainer = train_gpt2(str(tmp_path / "run"), steps=2, model=resumed, resume_from_checkpoint="latest")
    assert trainer.state.global_step == 2  # nothing left to train: the weights are the imported ones
    assert torch.equal(logits(trainer.unwrapped_model), logits(source))
    assert trainer.unwrapped_model.lm_head.weight is trainer.unwrapped_model.transformer.wte.weight


def test_a_trainer_resumes_from_an_imported_sharded_hf_folder(tmp_path):
    source = gpt2(seed=11)
    source.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # shards and model.safetensors.index.json
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--step", "2"]) == 0
    assert main(["verify", str(tmp_path / "run" / "checkpoint-00000002")]) == 0
    trainer = train_gpt2(str(tmp_path / "run"), steps=2, model=gpt2(seed=1), resume_from_checkpoint="latest")
    assert trainer.state.global_step == 2
    assert torch.equal(logits(trainer.unwrapped_model), logits(source))
    assert trainer.unwrapped_model.lm_head.weight is trainer.unwrapped_model.transformer.wte.weight
