"""Fuzzing: mutate the fixture model and require kvcompile to compile it into a model onnxruntime
loads, or to refuse it cleanly (a KvCompileError: the CLI's one-line exit 2 or 3). Anything else,
an uncaught exception or an artifact onnxruntime cannot load, is a finding.

Mutations act on the protobuf the way a broken exporter or a hostile file would: shapes and
dtypes of graph inputs/outputs and initializers, graph edges rewired, nodes deleted, attributes
and opsets changed, names swapped, raw bytes flipped or cut. Each case compiles in-process with
small texts (a few seconds); half without calibration, half with it.

CI runs KVCOMPILE_FUZZ_EXAMPLES (default 24) derandomized cases; `make fuzz` runs 400 random ones
and writes the outcome counts to KVCOMPILE_FUZZ_REPORT.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import DYNAMO, TOKENIZER
from kvcompile.errors import KvCompileError
from kvcompile.pipeline import CompileOptions, compile_model
from kvcompile.runtimes.session import cpu_session

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("KVCOMPILE_FUZZ_EXAMPLES", "24"))
RANDOM = os.environ.get("KVCOMPILE_FUZZ_RANDOM") == "1"
FIXTURE = onnx.load(DYNAMO)
DTYPES = [onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT32, onnx.TensorProto.BOOL,
          onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT64, 0]
OUTCOMES: collections.Counter = collections.Counter()
FINDINGS: list[str] = []


def _value_infos(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [*proto.graph.input, *proto.graph.output]


def change_dim(proto, draw) -> str:
    value = draw(st.sampled_from(_value_infos(proto)))
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return "no dims"
    dim = dims[draw(st.integers(0, len(dims) - 1))]
    choice = draw(st.sampled_from(["int", "param", "drop"]))
    if choice == "int":
        dim.dim_value = draw(st.sampled_from([0, 1, 3, 63, 65, 2**31]))
    elif choice == "param":
        dim.dim_param = draw(st.sampled_from(["n", "batch", "past_sequence_length", ""]))
    else:
        del dims[-1]
    return f"dim of {value.name}: {choice}"


def change_dtype(proto, draw) -> str:
    if draw(st.booleans()):
        value = draw(st.sampled_from(_value_infos(proto)))
        value.type.tensor_type.elem_type = draw(st.sampled_from(DTYPES))
        return f"dtype of {value.name}"
    tensor = draw(st.sampled_from(list(proto.graph.initializer)))
    tensor.data_type = draw(st.sampled_from(DTYPES))
    return f"dtype of initializer {tensor.name}"


def rewire(proto, draw) -> str:
    nodes = [n for n in proto.graph.node if n.input]
    node = draw(st.sampled_from(nodes))
    names = sorted({o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
                   | {"", "does_not_exist"})
    slot = draw(st.integers(0, len(node.input) - 1))
    node.input[slot] = draw(st.sampled_from(names))
    return f"rewired {node.op_type} input {slot}"


def delete_node(proto, draw) -> str:
    index = draw(st.integers(0, len(proto.graph.node) - 1))
    op = proto.graph.node[index].op_type
    del proto.graph.node[index]
    return f"deleted a {op}"


def change_attribute(proto, draw) -> str:
    nodes = [n for n in proto.graph.node if n.attribute]
    node = draw(st.sampled_from(nodes))
    attribute = draw(st.sampled_from(list(node.attribute)))
    if attribute.type == onnx.AttributeProto.INT:
        attribute.i = draw(st.sampled_from([-5, -1, 0, 1, 2, 3, 7, 2**40]))
    elif attribute.type == onnx.AttributeProto.INTS:
        attribute.ints[:] = draw(st.lists(st.integers(-4, 5), max_size=5))
    elif attribute.type == onnx.AttributeProto.FLOAT:
        attribute.f = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
    else:
        node.attribute.remove(attribute)
    return f"attribute {attribute.name} of {node.op_type}"


def change_opset(proto, draw) -> str:
    proto.opset_import[0].version = draw(st.sampled_from([1, 7, 13, 17, 19, 21, 23, 26, 1000]))
    return f"opset {proto.opset_import[0].version}"


def swap_names(proto, draw) -> str:
    outputs = list(proto.graph.output)
    first, second = draw(st.sampled_from(outputs)), draw(st.sampled_from(outputs))
    first.name, second.name = second.name, first.name
    return f"swapped output names {first.name} / {second.name}"


def corrupt_weights(proto, draw) -> str:
    tensor = draw(st.sampled_from([t for t in proto.graph.initializer if t.raw_data]))
    data = bytearray(tensor.raw_data)
    choice = draw(st.sampled_from(["cut", "nan", "flip"]))
    if choice == "cut":
        del data[len(data) // 2:]
    elif choice == "nan" and tensor.data_type == onnx.TensorProto.FLOAT:
        data[: 4 * 8] = np.full(8, np.nan, np.float32).tobytes()[: len(data)]
    else:
        position = draw(st.integers(0, len(data) - 1))
        data[position] ^= 0xFF
    tensor.raw_data = bytes(data)
    return f"weights of {tensor.name}: {choice}"


STRUCTURED = [change_dim, change_dtype, rewire, delete_node, change_attribute, change_opset, swap_names,
              corrupt_weights]


def mutate(draw) -> tuple[bytes, str]:
    proto = onnx.ModelProto()
    proto.CopyFrom(FIXTURE)
    done = [draw(st.sampled_from(STRUCTURED))(proto, draw) for _ in range(draw(st.integers(1, 3)))]
    data = proto.SerializeToString()
    if draw(st.integers(0, 9)) == 0:  # raw protobuf damage
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
        done.append(f"flipped byte {position}")
    return data, "; ".join(done)


def compile_case(folder: Path, data: bytes, calibrate: bool) -> str:
    """The outcome of compiling one mutated model; raises only on a finding."""
    model = folder / "model.onnx"
    model.write_bytes(data)
    (folder / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    options = CompileOptions(model=model, out_dir=folder / "out", no_calibration=not calibrate,
                             scheme="per-token", fuse_attention="off", calib_tokens=256, eval_tokens=256)
    try:
        result = compile_model(options)
    except KvCompileError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"multi-line refusal: {exc}") from None
        return f"refused: {type(exc).__name__}"
    except Exception as exc:
        raise AssertionError(f"uncaught {type(exc).__name__}: {str(exc)[:300]}") from None
    try:
        cpu_session(result.out_dir / "ort-cpu" / "model.onnx")
    except Exception as exc:
        raise AssertionError(f"kvcompile wrote a model onnxruntime cannot load: {str(exc)[:300]}") from None
    return "compiled: " + result.report.status


# Findings are collected, not raised, so one run counts all of them (and shrinking, which is slow
# on whole models, is off: each finding is reported with the mutations that produced it).
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
@given(data=st.data(), calibrate=st.booleans())
def test_mutated_models_compile_or_are_refused(tmp_path_factory, data, calibrate):
    model, mutation = mutate(data.draw)
    try:
        OUTCOMES[compile_case(tmp_path_factory.mktemp("fuzz"), model, calibrate)] += 1
    except AssertionError as finding:
        OUTCOMES["finding"] += 1
        FINDINGS.append(f"{mutation} (calibrate={calibrate}): {finding}")


def test_fuzzing_found_nothing():
    assert OUTCOMES, "the fuzz test above ran first"
    assert FINDINGS == []


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary():
    yield
    report = os.environ.get("KVCOMPILE_FUZZ_REPORT")
    summary = {"cases": sum(OUTCOMES.values()), "outcomes": dict(sorted(OUTCOMES.items())),
               "findings": FINDINGS}
    if report:
        Path(report).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nfuzz: {json.dumps(summary)}")
