"""Hostile and damaged manifests, symlinks, lying headers and pickle payloads: each is refused with an
error naming the field or file, before any component's live state is changed, and nothing is executed."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import struct
from collections.abc import Callable

import msgpack
import pytest
import torch

from ckpt import (
    CheckpointError,
    CorruptCheckpointError,
    ManifestError,
)
from ckpt.cli.inspection import open_checkpoint, verify
from ckpt.format.layout import MANIFEST_NAME
from ckpt.format.tensor_io import read_safetensors
from ckpt.io.storage import LocalStorage
from tests.support.files import REPO
from tests.support.hostile import (
    file_entry,
    load,
    load_latest,
    make_checkpoint,
    replace_file,
    rewrite_manifest,
    targets,
    untouched,
)


def _set(**kv) -> Callable[[dict], None]:
    return lambda d: d.update(kv)


# (what, mutation, redigest, exception, message pattern)
MANIFEST_CASES = [
    ("newer format_version", _set(format_version=4), True, ManifestError, "format_version 4 is not supported"),
    ("format_version as a string", _set(format_version="1"), True, ManifestError, "format_version should be int"),
    ("missing step", lambda d: d.pop("step"), True, ManifestError, r"manifest\.step is missing"),
    ("extra top-level field", _set(compression="zstd"), True, ManifestError, r"unknown fields \['compression'\]"),
    ("missing component field", lambda d: d["components"]["model"].pop("required"), True, ManifestError,
     r"components\.model\.required is missing"),
    ("extra component field", lambda d: d["components"]["model"].update(codec="x"), True, ManifestError,
     r"components\.model has unknown fields \['codec'\]"),
    ("extra file field", lambda d: file_entry(d).update(mode=511), True, ManifestError,
     r"files\[\d\] has unknown fields \['mode'\]"),
    ("extra tensor field", lambda d: file_entry(d)["tensors"][0].update(stride=[1]), True, ManifestError,
     r"tensors\[0\] has unknown fields \['stride'\]"),
    ("nbytes as a string", lambda d: file_entry(d).update(nbytes="64"), True, ManifestError, r"nbytes should be int, is str"),
    ("required as a string", lambda d: d["components"]["model"].update(required="yes"), True, ManifestError,
     r"required should be bool"),
    ("topology not an object", _set(topology=[2]), True, ManifestError, "topology should be dict"),
    ("absolute path", lambda d: file_entry(d).update(path="/etc/passwd"), True, ManifestError,
     "'/etc/passwd' is not a plain relative path"),
    ("'..' in a path", lambda d: file_entry(d).update(path="model/../../../etc/passwd"), True, ManifestError,
     "is not a plain relative path"),
    ("path into another component", lambda d: file_entry(d).update(path="extra/global.safetensors"), True, ManifestError,
     "is not inside the component's folder 'model/'"),
    ("the same file twice", lambda d: d["components"]["model"]["files"].append(dict(file_entry(d))), True, ManifestError,
     "twice"),
    ("writer outside the world", lambda d: file_entry(d).update(writer_rank=5), True, ManifestError,
     r"writer_rank is 5, not a rank of the saved world \(0\.\.0\)"),
    ("unknown dtype", lambda d: file_entry(d)["tensors"][0].update(dtype="F128"), True, ManifestError,
     "dtype is unknown: 'F128'"),
    ("negative dimension", lambda d: file_entry(d)["tensors"][0].update(shape=[-3, 4]), True, ManifestError,
     "shape is not a list of non-negative integers"),
    ("malformed digest", lambda d: file_entry(d).update(xxh3_128="abc"), True, ManifestError,
     "xxh3_128 is 'abc', not 32 lowercase hex digits"),
    ("unknown pattern", lambda d: d["components"]["model"].update(pattern="striped"), True, ManifestError,
     "pattern has unknown value 'striped'"),
    ("inconsistent topology", lambda d: d["topology"].update(world_size=3), True, ManifestError,
     "topology is inconsistent"),
    ("metric that is an object", lambda d: d["metrics"].update(loss={"x": 1}), True, ManifestError,
     r"metrics\.loss should be a number"),
    ("edited without its digest", _set(step=8), False, ManifestError, "does not match its own digest"),
    # Consistent-looking manifests that disagree with the files themselves.
    ("size disagrees with the file", lambda d: file_entry(d).update(nbytes=file_entry(d)["nbytes"] + 1), True,
     CorruptCheckpointError, r"model/replicated\.part-0-of-1\.safetensors .* has \d+ bytes, the manifest says"),
    ("shape disagrees with the file", lambda d: file_entry(d)["tensors"][0].update(shape=[4, 3]), True,
     CorruptCheckpointError, r"tensor 'w' is torch\.float32 \[3, 4\], the manifest says torch\.float32 \[4, 3\]"),
    ("dtype disagrees with the file", lambda d: file_entry(d)["tensors"][1].update(dtype="F64"), True,
     CorruptCheckpointError, "the manifest says torch.float64"),
    ("tensor names disagree with the file", lambda d: file_entry(d)["tensors"][0].update(name="v"), True,
     CorruptCheckpointError, "holds tensors"),
    ("digest of another file", lambda d: file_entry(d).update(xxh3_128=file_entry(d, "extra", "state")["xxh3_128"]), True,
     CorruptCheckpointError, r"replicated\.part-0-of-1\.safetensors .* does not match its digest"),
]


@pytest.mark.parametrize("what,mutate,redigest,exc,match", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifests_are_refused_before_any_state_changes(tmp_path, what, mutate, redigest, exc, match):
    ckpt_dir = make_checkpoint(tmp_path)
    rewrite_manifest(ckpt_dir, mutate, redigest)
    comps = targets()
    with pytest.raises(exc, match=match) as err:
        load(ckpt_dir, comps)
    assert untouched(comps), f"{what}: a refused load changed live state"
    assert ckpt_dir in str(err.value), "the error names the checkpoint's file"


def test_non_json_constants_are_refused(tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    path = os.path.join(ckpt_dir, MANIFEST_NAME)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(re.sub(r'"step": 7', '"step": NaN', text))
    with pytest.raises(ManifestError, match=r"not valid JSON .*NaN"):
        load(ckpt_dir, targets())


@pytest.mark.parametrize("what", ["file", "folder", "manifest"])
def test_symlinks_out_of_the_checkpoint_are_refused(tmp_path, what):
    ckpt_dir = make_checkpoint(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = {"folder": os.path.join(ckpt_dir, "model"), "manifest": os.path.join(ckpt_dir, MANIFEST_NAME),
              "file": os.path.join(ckpt_dir, "model", "replicated.part-0-of-1.safetensors")}[what]
    moved = outside / os.path.basename(victim)
    os.rename(victim, moved)  # the very same bytes, so every size and digest still matches
    os.symlink(moved, victim)
    comps = targets()
    if what == "manifest":  # a manifest from elsewhere would vouch for files it does not belong with
        for read in (lambda: load(ckpt_dir, comps), lambda: open_checkpoint(ckpt_dir),
                     lambda: load_latest(tmp_path / "run", comps)):  # by path, as `ckpt` opens it, as "latest"
            with pytest.raises(ManifestError, match="leads outside the checkpoint") as err:
                read()
            assert victim in str(err.value)
        assert untouched(comps)
        return
    with pytest.raises(CorruptCheckpointError, match="leads outside the checkpoint") as err:
        load(ckpt_dir, comps)
    assert untouched(comps) and "model/" in str(err.value)
    report = verify(open_checkpoint(ckpt_dir))
    moved_files = [f for f in report["files"] if os.path.join(ckpt_dir, f["path"]).startswith(victim)]
    assert not report["ok"] and moved_files and {f["status"] for f in moved_files} == {"unsafe path"}


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_a_header_claiming_more_bytes_than_the_file_has_is_refused(tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    relpath = "model/replicated.part-0-of-1.safetensors"
    lying = _safetensors({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                          "b": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}, b"\x00" * 16)
    replace_file(ckpt_dir, relpath, lying)  # size and digest in the manifest agree with the lying file
    comps = targets()
    with pytest.raises(CorruptCheckpointError, match=r"tensor '[wb]' claims bytes \d+\.\.\d+ but the file's data "
                                                     r"section has 16") as err:
        load(ckpt_dir, comps)
    assert untouched(comps) and relpath in str(err.value)


@pytest.mark.parametrize("header,data,match", [
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, b"\x00" * 8, "claims bytes 0..12"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8, "has 8 bytes for shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\x00" * 8, "claims bytes 4..0"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\x00" * 8, "overlap"),
    ({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, b"\x00" * 8, "bad shape"),
    ({"w": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8, "unknown dtype"),
    ([1, 2], b"", "not a JSON object"),
])
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, match):
    path = tmp_path / "f.safetensors"
    path.write_bytes(_safetensors(header, data))
    with pytest.raises(CorruptCheckpointError, match=match):
        read_safetensors(LocalStorage(), str(path), None, None, "c")


def test_a_header_length_past_the_end_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length 1000000000000 runs past the end"):
        read_safetensors(LocalStorage(), str(path), None, None, "c")


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["extra/global.msgpack", "model/replicated.part-0-of-1.safetensors"])
def test_a_pickle_payload_is_refused_not_run(tmp_path, where):
    ckpt_dir = make_checkpoint(tmp_path / "run")
    Payload.marker = str(tmp_path / "code-ran")
    payload = pickle.dumps({"state": Payload()})
    assert pickle.loads(payload) and os.path.exists(Payload.marker), "the payload works when unpickled"
    os.remove(Payload.marker)
    blob = payload
    if where.endswith(".safetensors"):  # torch.save's format: a zip holding a pickle
        import io

        buf = io.BytesIO()
        torch.save({"w": Payload()}, buf)
        blob = buf.getvalue()
    replace_file(ckpt_dir, where, blob)  # size and digest agree: only the format can refuse it
    comps = targets()
    with pytest.raises(CorruptCheckpointError) as err:
        load(ckpt_dir, comps)
    assert where in str(err.value)
    assert untouched(comps) and not os.path.exists(Payload.marker), "nothing was executed"
    # The bytes agree with the manifest, but verify runs the load's own checks too: it says what a load says.
    report = verify(open_checkpoint(ckpt_dir))
    assert not report["ok"] and not os.path.exists(Payload.marker)
    assert [(f["path"], f["status"]) for f in report["files"] if f["status"] != "ok"] == [(where, "does not load")]


def test_object_dtype_numpy_in_a_skeleton_is_refused(tmp_path):
    ckpt_dir = make_checkpoint(tmp_path)
    hostile = msgpack.packb({"arr": msgpack.ExtType(3, msgpack.packb(["|O", [1], b"\x00" * 8]))})
    replace_file(ckpt_dir, "extra/global.msgpack", hostile)
    comps = targets()
    with pytest.raises(CorruptCheckpointError, match=re.escape("refusing NumPy dtype '|O'")) as err:
        load(ckpt_dir, comps)
    assert untouched(comps) and "extra/global.msgpack" in str(err.value)


def test_library_code_has_no_code_executing_deserializers():
    banned = re.compile(r"^\s*(import pickle|from pickle|import marshal|import dill|import cloudpickle)|"
                        r"\b(torch\.load|pickle\.loads?|marshal\.loads?|eval|exec)\(|allow_pickle\s*=\s*True",
                        re.MULTILINE)
    hits = []
    importer = os.path.join(REPO, "ckpt", "cli", "importing.py")
    for root, _, names in os.walk(os.path.join(REPO, "ckpt")):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".py") and path != importer:
                with open(path) as f:
                    hits += [f"{name}: {m.group(0).strip()}" for m in banned.finditer(f.read())]
    assert hits == []
    # `ckpt import` reads foreign torch.save/DCP files, which are pickles: only with torch's weights_only
    # loader and an unpickler whose find_class admits a fixed list, never a plain pickle.load.
    with open(importer) as f:
        text = f.read()
    loads = re.findall(r"torch\.load\(([^)]*)\)", text)
    assert loads and all("weights_only=True" in call for call in loads)
    assert "def find_class" in text and not re.search(r"\bpickle\.loads?\(", text)


def test_a_refused_load_raises_a_checkpoint_error_on_the_cli_too(tmp_path, capsys):
    from ckpt.cli import main

    ckpt_dir = make_checkpoint(tmp_path)
    rewrite_manifest(ckpt_dir, lambda d: file_entry(d).update(path="/etc/passwd"))
    assert main(["verify", ckpt_dir]) == 2
    assert "is not a plain relative path" in capsys.readouterr().err
    assert issubclass(ManifestError, CheckpointError)
