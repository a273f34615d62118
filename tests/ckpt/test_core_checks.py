"""One process: settings ranks must agree on, dtypes beyond safetensors', errors that keep their fields,
verify_on_load=False, the environment a single process inherits, and the manifest example in docs/format.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt import (
    CheckpointCoordinator,
    CheckpointError,
    CorruptCheckpointError,
    SerializationError,
    SharingPattern,
    StateComponent,
    ValidationLevel,
)
from ckpt.format.manifest_read import parse_manifest
from ckpt.format.serialization import flatten_state, unflatten_state
from ckpt.save.planning import ComponentDecl, build_plan
from ckpt.topology import RankTopology
from tests.support.files import REPO, flip_last_byte
from tests.support.workers import Box

DOCS = Path(REPO) / "docs"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaNs, signed zeros and dtypes without comparison kernels compare exactly."""
    return t.detach().cpu().resolve_conj().contiguous().reshape(-1, 1).view(torch.uint8)


# ---- settings every declaring rank must share --------------------------------------------------------

def _decl(validation: str = "tensor", required: bool = True) -> ComponentDecl:
    return ComponentDecl("model", "replicated", None, required, validation, (("w", 16, 4),), "d")


@pytest.mark.parametrize("other,field,shown", [
    (_decl(validation="none"), "validation_level", "rank 0 declares validation_level=tensor but rank 1 declares "
                                                   "validation_level=none"),
    (_decl(required=False), "required", "rank 0 declares required=True but rank 1 declares required=False"),
])
def test_plan_refuses_ranks_that_disagree_on_a_setting(other, field, shown):
    topo = RankTopology(0, 2, 2, {})
    with pytest.raises(CheckpointError, match=re.escape(f"component 'model': {shown}")):
        build_plan([{"model": _decl()}, {"model": other}], topo)
    assert build_plan([{"model": _decl()}, {"model": _decl()}], topo)["model"].required is True


# ---- dtypes safetensors has no code for --------------------------------------------------------------

def _exotic_state() -> dict:
    g = torch.Generator().manual_seed(0)
    c64 = torch.randn(3, 4, dtype=torch.complex64, generator=g)
    return {
        "c128": torch.randn(3, 4, dtype=torch.complex128, generator=g),
        "c128_t": torch.randn(4, 2, dtype=torch.complex128, generator=g).T,  # a non-contiguous view
        "c128_conj": torch.randn(3, dtype=torch.complex128, generator=g).conj(),  # a lazily conjugated view
        "c128_scalar": torch.tensor(1.5 - 2j, dtype=torch.complex128),
        "c128_empty": torch.zeros(0, 2, dtype=torch.complex128),
        "c32": c64.to(torch.complex32),
        "e8m0": torch.rand(6, generator=g).mul(100).to(torch.float8_e8m0fnu),
        "native": torch.arange(4.0),
    }


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("level", [ValidationLevel.TENSOR, ValidationLevel.FULL])
@pytest.mark.parametrize("in_place", [False, True])
def test_dtypes_without_a_safetensors_code_round_trip_exactly(tmp_path, level, in_place):
    state = _exotic_state()
    with CheckpointCoordinator(tmp_path) as coord:
        path = coord.save(1, [StateComponent("m", Box(state), SharingPattern.REPLICATED, validation_level=level)])
        live = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
        target = Box(dict(live))
        coord.load([StateComponent("m", target, SharingPattern.REPLICATED)], in_place=in_place)
    for key, saved in state.items():
        got = target.state[key]
        assert got.dtype == saved.dtype and got.shape == saved.shape, key
        assert torch.equal(_bits(got), _bits(saved)), key
        if in_place and got.numel():
            assert got.data_ptr() == live[key].data_ptr(), f"{key}: an in-place load reads into the live tensor"
    manifest = json.loads((Path(path) / "checkpoint_manifest.json").read_text())
    listed = {t["name"]: t for f in manifest["components"]["m"]["files"] for t in f["tensors"]}
    assert listed["c128"]["dtype"] == "U8" and listed["c128"]["shape"] == [3, 4, 16]
    assert listed["native"]["dtype"] == "F32"


def test_a_meta_tensor_is_refused_naming_component_and_key(tmp_path):
    with CheckpointCoordinator(tmp_path) as coord:
        model = torch.nn.Linear(2, 2, device="meta")
        with pytest.raises(SerializationError, match=r"component 'model', key 'weight' is on the meta device") as err:
            coord.save(1, [StateComponent("model", model, SharingPattern.GLOBAL)])
        assert "during 'prepare'" in str(err.value)
        assert (err.value.component, err.value.key_path) == ("model", "weight")
        assert coord.checkpoints() == []


def test_numpy_zero_dim_arrays_keep_their_shape_and_subclasses_are_refused():
    state = {"zero_dim": np.array(2.5), "big_endian_t": np.arange(6, dtype=">i4").reshape(2, 3).T}
    back = unflatten_state(flatten_state(state, "c").skeleton, {}, "c")
    for key, value in state.items():
        assert (back[key].shape, back[key].dtype, back[key].tobytes()) == (value.shape, value.dtype, value.tobytes())
    with pytest.raises(SerializationError, match="NumPy array subclass") as err:
        flatten_state({"m": [np.ma.masked_array([1, 2], mask=[0, 1])]}, "c")  # its mask would be lost
    assert err.value.key_path == "m/0"


# ---- structured fields survive the exchange of outcomes (also in one process) --------------------------

def test_serialization_error_keeps_component_and_key_path(tmp_path):
    with CheckpointCoordinator(tmp_path) as coord, pytest.raises(SerializationError) as err:
        coord.save(1, [StateComponent("bad", Box({"inner": {"when": object()}}), SharingPattern.GLOBAL)])
    assert (err.value.component, err.value.key_path, err.value.failures.keys()) == ("bad", "inner/when", {0})


def test_verify_on_load_false_skips_digests_but_not_size_checks(tmp_path):
    state = {"w": torch.arange(8, dtype=torch.float32)}
    comps = [StateComponent("model", Box(state), SharingPattern.GLOBAL)]
    with CheckpointCoordinator(tmp_path) as coord:
        saved = Path(coord.save(1, comps))
    data = saved / "model" / "global.safetensors"
    flip_last_byte(data, mask=0x40)  # the last byte of the last tensor's data: the header stays valid

    with CheckpointCoordinator(tmp_path, verify_on_load=False) as coord:
        target = Box({})
        coord.load([StateComponent("model", target, SharingPattern.GLOBAL)])
    differs = (_bits(target.state["w"]) != _bits(state["w"])).flatten().nonzero().flatten().tolist()
    assert differs == [31], "the flipped byte loads unchecked, and nothing else changes"

    with CheckpointCoordinator(tmp_path) as coord, pytest.raises(CorruptCheckpointError, match="digest") as err:
        coord.load([StateComponent("model", Box({}), SharingPattern.GLOBAL)])
    assert err.value.component == "model" and err.value.path == str(data)

    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4)
    with CheckpointCoordinator(tmp_path, verify_on_load=False) as coord:
        untouched = Box({"untouched": True})
        with pytest.raises(CorruptCheckpointError, match="truncated") as err:
            coord.load([StateComponent("model", untouched, SharingPattern.GLOBAL)])
    assert err.value.component == "model" and err.value.path == str(data)
    assert untouched.state == {"untouched": True}


# ---- what a single process inherits ---------------------------------------------------------------------

def test_single_process_ignores_an_inherited_local_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # e.g. a helper process started from inside a torchrun job
    with CheckpointCoordinator(tmp_path) as coord:
        assert (coord.topology.local_world_size, coord.topology.num_nodes) == (1, 1)
        path = coord.save(1, [StateComponent("cache", Box({"x": torch.ones(2)}), SharingPattern.PER_NODE)])
    topology = json.loads((Path(path) / "checkpoint_manifest.json").read_text())["topology"]
    assert (topology["local_world_size"], topology["num_nodes"]) == (1, 1)
    with pytest.raises(CheckpointError, match="does not divide the world size 1"):
        CheckpointCoordinator(tmp_path / "explicit", local_world_size=2)  # asked for explicitly: still wrong


def test_replica_patterns_default_to_tensor_validation_in_the_manifest_at_one_rank(tmp_path):
    comps = [StateComponent("model", Box({"w": torch.ones(2)}), SharingPattern.REPLICATED),
             StateComponent("stage", Box({"w": torch.ones(2)}), SharingPattern.PER_GROUP, process_group_name="dp"),
             StateComponent("cache", Box({"w": torch.ones(2)}), SharingPattern.PER_NODE),
             StateComponent("rng", Box({"s": 1}), SharingPattern.PER_RANK)]
    with CheckpointCoordinator(tmp_path) as coord:
        path = coord.save(1, comps)
    levels = {k: c["validation_level"]
              for k, c in json.loads((Path(path) / "checkpoint_manifest.json").read_text())["components"].items()}
    assert levels == {"model": "tensor", "stage": "tensor", "cache": "none", "rng": "none"}


# ---- docs/format.md -------------------------------------------------------------------------------------

def test_the_manifest_example_in_the_format_doc_parses():
    text = (DOCS / "format.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/format.md should hold one JSON example"
    manifest = parse_manifest(json.loads(blocks[0]), "docs/format.md")  # checks the digest field too
    assert manifest.topology.world_size == 4 and set(manifest.components) == {"model"}
    files = manifest.components["model"].files
    assert [f.path for f in files] == ["model/replicated.msgpack", "model/replicated.part-0-of-2.safetensors",
                                       "model/replicated.part-1-of-2.safetensors"]


# ---- CUDA (skipped without a device) --------------------------------------------------------------------

def _cuda_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    for _ in range(2):
        model(torch.randn(4, 16, device="cuda", generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _cpu(state: object) -> object:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu(v) for v in state)
    return state


def _same_cpu(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_cpu(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_cpu(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("level", [ValidationLevel.TENSOR, ValidationLevel.FULL])
def test_cuda_model_and_adamw_round_trip(tmp_path, level):
    model, opt = _cuda_model(seed=0)
    saved = {"model": _cpu(model.state_dict()), "optimizer": _cpu(opt.state_dict())}
    with CheckpointCoordinator(tmp_path) as coord:
        coord.save(1, [StateComponent("model", model, SharingPattern.REPLICATED, validation_level=level),
                       StateComponent("optimizer", opt, SharingPattern.REPLICATED, validation_level=level)])
        fresh_model, fresh_opt = _cuda_model(seed=7)
        coord.load([StateComponent("model", fresh_model, SharingPattern.REPLICATED),
                    StateComponent("optimizer", fresh_opt, SharingPattern.REPLICATED)])
    assert all(p.is_cuda for p in fresh_model.parameters())
    assert all(t.is_cuda for s in fresh_opt.state.values() for n, t in s.items() if n != "step")
    assert _same_cpu(saved["model"], _cpu(fresh_model.state_dict()))
    assert _same_cpu(saved["optimizer"], _cpu(fresh_opt.state_dict()))
    batch = torch.randn(4, 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    for m, o in ((model, opt), (fresh_model, fresh_opt)):  # the restored pair trains on exactly as the original
        m(batch).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True))

