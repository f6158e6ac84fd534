"""Bad input of every kind: a one-line error naming the problem and a fix, exit 2, no traceback,
nothing written (no output folder, no partial folder, no lock file, the input untouched).

Each case builds its bad input in a temporary folder, runs the real CLI on it, and checks all of
the above. Untrusted-model cases (external data escaping the model's folder) are refused before
any byte of external data is read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import DYNAMO, GENAI, TOKENIZER
from synthetic import build_decoder, build_encoder


def kvcompile(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True, text=True, cwd=cwd)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(result: subprocess.CompletedProcess, message: str, workdir: Path, before: dict[str, str]) -> None:
    """Exit 2, one error line that contains `message` (after the plain progress lines of any
    stage that started, as a CI log shows them), no traceback, and `workdir` exactly as before."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    progress = [line for line in lines if line.startswith("kvcompile: [")]
    assert len(lines) == len(progress) + 1, result.stderr
    assert lines[-1].startswith("kvcompile: error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    assert tree_digest(workdir) == before, "nothing written, nothing modified"


def copy_fixture(folder: Path) -> Path:
    shutil.copytree(DYNAMO.parent, folder)
    return folder / "model.onnx"


def save(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path


def with_external_data(folder: Path) -> Path:
    """The fixture re-saved with its weights in model.onnx.data."""
    folder.mkdir(parents=True)
    proto = onnx.load(DYNAMO)
    onnx.save(proto, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    shutil.copyfile(TOKENIZER, folder / "tokenizer.json")
    return folder / "model.onnx"


def point_external_data(model: Path, location: str) -> None:
    proto = onnx.load(model, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, model)


# --- each maker returns the model path to compile, building whatever it needs under `root` ---

def not_onnx(root: Path) -> Path:
    return save_text(root / "model.onnx", "this is a README, not a model\n")


def save_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncated(root: Path) -> Path:
    data = DYNAMO.read_bytes()
    path = root / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: len(data) // 3])
    return path


def encoder(root: Path) -> Path:
    return save(build_encoder(), root / "encoder.onnx")


def past_without_present(root: Path) -> Path:
    return save(build_decoder("llama", present_outputs=False), root / "model.onnx")


def float64_cache(root: Path) -> Path:
    """A decoder whose cache (and everything else) is float64: no target stores that."""
    proto = build_decoder("llama")
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT:
            proto.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    return save(proto, root / "model.onnx")


def missing_external_data(root: Path) -> Path:
    model = with_external_data(root / "m")
    (root / "m" / "model.onnx.data").unlink()
    return model


def truncated_external_data(root: Path) -> Path:
    model = with_external_data(root / "m")
    data = root / "m" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    return model


def external_data_dotdot(root: Path) -> Path:
    model = with_external_data(root / "m")
    (root / "m" / "model.onnx.data").rename(root / "model.onnx.data")
    point_external_data(model, "../model.onnx.data")
    return model


def external_data_absolute(root: Path) -> Path:
    model = with_external_data(root / "m")
    target = root / "elsewhere.data"
    (root / "m" / "model.onnx.data").rename(target)
    point_external_data(model, str(target))
    return model


def external_data_symlink_out(root: Path) -> Path:
    model = with_external_data(root / "m")
    target = root / "elsewhere.data"
    (root / "m" / "model.onnx.data").rename(target)
    (root / "m" / "model.onnx.data").symlink_to(target)
    return model


def opset_mismatch(root: Path) -> Path:
    proto = build_decoder("llama")
    proto.opset_import[0].version = 6  # the opset of 2017: its Unsqueeze, Slice... take other inputs
    return save(proto, root / "model.onnx")


def opset_from_the_future(root: Path) -> Path:
    proto = build_decoder("llama")
    proto.opset_import[0].version = 99
    return save(proto, root / "model.onnx")


def custom_op(root: Path) -> Path:
    """A decoder with a node from a custom-op domain: running it would need the model's own library."""
    proto = build_decoder("llama")
    logits = proto.graph.output[0].name
    producer = next(n for n in proto.graph.node if logits in n.output)
    producer.output[0] = "before_custom"
    proto.graph.node.append(helper.make_node("Mystery", ["before_custom"], [logits], domain="com.example.ops"))
    proto.opset_import.append(helper.make_opsetid("com.example.ops", 1))
    return save(proto, root / "model.onnx")


CASES = {
    "not-onnx": (not_onnx, [], "is not a readable ONNX model"),
    "truncated": (truncated, [], "is not a readable ONNX model"),
    "no-kv-cache (encoder)": (encoder, [], "no KV cache found"),
    "past-without-present": (past_without_present, [], "no graph output carries the updated cache"),
    "unsupported-dtype": (float64_cache, [], "is DOUBLE; kvcompile handles float32 and float16 caches"),
    "missing-external-data": (missing_external_data, [], "is missing next to the model"),
    "truncated-external-data": (truncated_external_data, [], "is truncated"),
    "external-data-dotdot": (external_data_dotdot, [], "outside the model's folder"),
    "external-data-absolute": (external_data_absolute, [], "outside the model's folder"),
    "external-data-symlink": (external_data_symlink_out, [], "a link that leaves the model's folder"),
    "opset-mismatch": (opset_mismatch, [], "is not a valid ONNX model (Node(n_Unsqueeze_8) with schema(::Unsqueeze:1)"),
    "opset-unknown": (opset_from_the_future, [], "opset 99"),
    "custom-op": (custom_op, [], "com.example.ops"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_model_is_refused_cleanly(case, tmp_path):
    make, flags, message = CASES[case]
    model = make(tmp_path / "in")
    before = tree_digest(tmp_path)
    result = kvcompile("compile", str(model), "--kv-bits", "4", *flags)
    assert_refused(result, message, tmp_path, before)


@pytest.mark.parametrize("case", ["external-data-dotdot", "external-data-absolute", "external-data-symlink"])
def test_escaping_external_data_is_refused_by_inspect_too(case, tmp_path):
    make, _, message = CASES[case]
    model = make(tmp_path / "in")
    before = tree_digest(tmp_path)
    assert_refused(kvcompile("inspect", str(model)), message, tmp_path, before)


@pytest.mark.parametrize("flags, message", [
    (["--calib", "short.txt"], "calibration"),
    (["--eval", "short.txt"], "evaluation"),
    (["--calib", "ids.npy"], "calibration"),
    (["--calib", "nothing.txt"], "does not exist"),
    (["--kv-bits", "3"], "--kv-bits"),
    (["--scheme", "magic"], "--scheme"),
    (["--target", "gpu"], "unknown target 'gpu'"),
    (["--soc", "SM0000", "--target", "qnn-htp"], "SM0000"),
    (["--device", "pixel-99"], "unknown device 'pixel-99'"),
    (["--budget", "lots"], "--budget 'lots' is not a size"),
    (["--kv-map", "short.txt"], "kv-map"),
    (["--tokenizer", "short.txt"], "tokenizer"),
])
def test_bad_options_are_refused_cleanly(flags, message, tmp_path):
    model = copy_fixture(tmp_path / "in")
    (tmp_path / "short.txt").write_text("Too short to calibrate on.\n")
    np.save(tmp_path / "ids.npy", np.array([1, 2, 3], np.int64))
    before = tree_digest(tmp_path)
    result = kvcompile("compile", str(model), "--kv-bits", "4", *flags, cwd=tmp_path)
    assert_refused(result, message, tmp_path, before)


def test_token_ids_out_of_the_vocabulary_are_refused(tmp_path):
    model = copy_fixture(tmp_path / "in")
    np.save(tmp_path / "ids.npy", np.full(20000, 999_999, np.int64))
    before = tree_digest(tmp_path)
    result = kvcompile("compile", str(model), "--calib", "ids.npy", cwd=tmp_path)
    assert_refused(result, "vocabulary", tmp_path, before)


def test_output_is_a_file(tmp_path):
    model = copy_fixture(tmp_path / "in")
    (tmp_path / "out").write_text("keep me")
    before = tree_digest(tmp_path)
    assert_refused(kvcompile(str(model), "-o", str(tmp_path / "out")), "is a file", tmp_path, before)


def test_output_is_not_writable(tmp_path):
    """/proc refuses new folders even to root, which ignores permission bits."""
    model = copy_fixture(tmp_path / "in")
    before = tree_digest(tmp_path)
    assert_refused(kvcompile(str(model), "-o", "/proc/kvcompile-out"), "not a writable folder", tmp_path, before)


def test_output_would_overwrite_the_input_or_a_stranger(tmp_path):
    model = copy_fixture(tmp_path / "in")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = tree_digest(tmp_path)
    assert_refused(kvcompile(str(model), "-o", str(tmp_path / "in")), "holds the input model", tmp_path, before)
    assert_refused(kvcompile(str(model), "-o", str(tmp_path / "notes")), "not a kvcompile output", tmp_path, before)


def test_genai_model_with_no_calibration_is_refused(tmp_path):
    before = tree_digest(tmp_path)
    result = kvcompile(str(GENAI), "--no-calibration", "-o", str(tmp_path / "out"))
    assert_refused(result, "GroupQueryAttention", tmp_path, before)


def test_non_finite_calibration_values_are_refused(tmp_path):
    """A model that produces inf/NaN in its cache on the calibration text cannot be given ranges."""
    proto = onnx.load(DYNAMO)
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name.endswith("layers.1.input_layernorm.weight"):
            array = numpy_helper.to_array(tensor).copy()
            array[:] = np.inf
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
            break
    else:
        pytest.fail("fixture layout changed")
    model = save(proto, tmp_path / "in" / "model.onnx")
    shutil.copyfile(TOKENIZER, tmp_path / "in" / "tokenizer.json")
    before = tree_digest(tmp_path)
    result = kvcompile(str(model), "--calib-tokens", "512", "--eval-tokens", "512")
    assert_refused(result, "non-finite", tmp_path, before)


def test_model_over_2gb_loads_with_external_data(tmp_path):
    """The protobuf limit (2 GiB) does not apply: weights stay in the data file, read lazily.
    The 2.2 GB tensor is a sparse file, so the test costs no disk; `inspect` reads no weights."""
    folder = tmp_path / "big"
    model = with_external_data(folder)
    proto = onnx.load(model, load_external_data=False)
    padding = onnx.TensorProto(name="padding", data_type=onnx.TensorProto.FLOAT, dims=[550_000_000],
                               data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "padding.data"), ("offset", "0"), ("length", str(2_200_000_000))):
        padding.external_data.add(key=key, value=value)
    proto.graph.initializer.append(padding)
    onnx.save(proto, model)
    with open(folder / "padding.data", "wb") as sparse:
        sparse.truncate(2_200_000_000)
    result = kvcompile("inspect", str(model), "--json")
    assert result.returncode == 0, result.stderr
    assert '"layers": 4' in result.stdout
    assert os.stat(folder / "padding.data").st_blocks == 0, "not a byte of the 2.2 GB was written"


@pytest.mark.parametrize("target", ["qnn-htp", "nnapi", "tflite"])
def test_static_target_of_an_attention_op_model_is_refused_before_calibration(target, tmp_path):
    """The static graphs need decomposed attention: a GroupQueryAttention export is refused by
    the target's own check, right after the analysis (no progress line: nothing ran)."""
    shutil.copytree(GENAI.parent, tmp_path / "in")
    before = tree_digest(tmp_path)
    result = kvcompile("compile", str(tmp_path / "in" / "model.onnx"), "--target", target, cwd=tmp_path)
    assert_refused(result, f"--target {target} builds its static graph from decomposed attention", tmp_path, before)
    assert "GroupQueryAttention" in result.stderr and "kvcompile: [" not in result.stderr
