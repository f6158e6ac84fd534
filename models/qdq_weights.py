"""The QDQ-weight form of a float ONNX decoder, as Qualcomm AI Hub-style exports store weights.

Every MatMul whose second input is a 2-D float initializer W gets DequantizeLinear(W_q, scale)
instead: W_q int8 or int4, symmetric, one scale per output channel (axis 1), rounded to nearest.
The activations stay float. Written with its weights in `model.onnx.data`, the tokenizer files
copied next to it.

    python -m models.qdq_weights MODEL OUT_DIR --bits 4
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    value.type, value.shape = ir.TensorType(dtype), ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def quantize_matmul_weights(model: ir.Model, bits: int) -> int:
    """Rewrite every float MatMul weight as DequantizeLinear of int8 / int4 codes; returns how many."""
    dtype = {8: ir.DataType.INT8, 4: ir.DataType.INT4}[bits]
    largest = 2 ** (bits - 1) - 1
    graph = model.graph
    count = 0
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
        if weight is None or weight.const_value is None or weight.shape is None or len(weight.shape) != 2:
            continue
        values = weight.const_value.numpy().astype(np.float32)
        scale = np.maximum(np.abs(values).max(axis=0), np.float32(1e-12)) / largest
        codes = np.clip(np.round(values / scale), -largest - 1, largest).astype(np.int8)
        dequantize = ir.Node("", "DequantizeLinear", [
            _initializer(graph, f"{weight.name}_codes", codes, dtype),
            _initializer(graph, f"{weight.name}_scale", scale.astype(np.float32), ir.DataType.FLOAT),
        ], attributes=[ir.AttrInt64("axis", 1)], name=f"{weight.name}_dequantize")
        dequantize.outputs[0].name = f"{weight.name}_dequantized"
        dequantize.outputs[0].type, dequantize.outputs[0].shape = weight.type, weight.shape
        graph.insert_before(node, dequantize)
        node.replace_input_with(1, dequantize.outputs[0])
        count += 1
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    inputs = {v.name for v in graph.inputs}
    for name in [n for n, v in graph.initializers.items() if not v.uses() and n not in inputs]:
        del graph.initializers[name]
    model.opset_imports[""] = max(model.opset_imports.get("", 0), 21)  # int4 DequantizeLinear
    return count


def write_qdq_weights(model_path: Path, out_dir: Path, bits: int) -> Path:
    model = ir.load(model_path)
    if not quantize_matmul_weights(model, bits):
        raise ValueError(f"{model_path}: no MatMul with a 2-D float initializer weight")
    out_dir.mkdir(parents=True, exist_ok=True)
    ir.save(model, out_dir / "model.onnx", external_data="model.onnx.data")
    for name in TOKENIZER_FILES:
        if (model_path.parent / name).is_file():
            shutil.copyfile(model_path.parent / name, out_dir / name)
    return out_dir / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    args = parser.parse_args()
    print(write_qdq_weights(args.model, args.out_dir, args.bits))


if __name__ == "__main__":
    main()
