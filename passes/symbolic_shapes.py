"""Analysis: fill in value shapes that onnx's shape inference leaves unknown.

What it matches
  Node outputs whose shape is missing or has unknown dims after onnx's inference, typically
  attention heads in TorchScript exports, where `view(batch, seq, -1, head_dim)` reshapes to a
  target computed from Shape ops at run time.

What it rewrites
  Nothing in the graph: it sets those values' shapes from onnxruntime's symbolic shape inference
  (`onnxruntime.tools.symbolic_shape_infer`, which propagates shape arithmetic with sympy), run on
  a copy of the graph in which every large initializer is a typed graph input: shape arithmetic
  needs the values of small constants only, and a copy of the weights would double the memory
  of a model that keeps them inline.

Why
  The fusion and transform passes read the number of query heads from the query's shape. If the
  symbolic inference cannot handle a model, shapes stay as they were and those passes refuse
  with their own message.
"""

from __future__ import annotations

import contextlib
import io
import logging

import onnx
import onnx_ir as ir
from onnx import helper

from kvcompile.runtimes.ort_tools import load_tool

SHAPE_CONSTANT_LIMIT = 1024  # initializers with more elements are weights: passed by type and shape

def _without_weights(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with its large initializers as graph inputs (type and shape only)."""
    initializers = model.graph.initializers
    kept = list(initializers.items())
    large = [value for _, value in kept if value.const_value is not None and value.const_value.size > SHAPE_CONSTANT_LIMIT]
    try:
        for value in large:
            del initializers[value.name]
        proto = ir.serde.serialize_model(model)
    finally:  # restore every initializer, in its order
        for name in list(initializers):
            del initializers[name]
        for name, value in kept:
            initializers[name] = value
    proto.graph.input.extend(helper.make_tensor_value_info(value.name, value.dtype.value, list(value.shape.dims))
                             for value in large)
    return proto


def _shape(type_proto: onnx.TypeProto) -> ir.Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in type_proto.tensor_type.shape.dim]
    return ir.Shape(dims)


def _incomplete(shape: ir.Shape | None) -> bool:
    return shape is None or any(not isinstance(d, int) for d in shape.dims)


def _known(shape: ir.Shape) -> int:
    return sum(isinstance(d, int) for d in shape.dims)


class SymbolicShapeInferencePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        SymbolicShapeInference = load_tool("symbolic_shape_infer").SymbolicShapeInference

        quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            proto = _without_weights(model)
            with contextlib.redirect_stdout(io.StringIO()):
                inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        except Exception:  # it raises many kinds of errors on graphs it cannot follow
            return ir.passes.PassResult(model, modified=False)
        finally:
            quiet.setLevel(level)
        if inferred is None:
            return ir.passes.PassResult(model, modified=False)
        shapes = {info.name: info.type for info in inferred.graph.value_info}
        modified = False
        for node in model.graph.all_nodes():
            for value in node.outputs:
                if value is None or value.name not in shapes or not _incomplete(value.shape):
                    continue
                shape = _shape(shapes[value.name])
                if shape is not None and (value.shape is None or _known(shape) > _known(value.shape)):
                    value.shape = shape
                    elem_type = shapes[value.name].tensor_type.elem_type
                    if value.type is None and elem_type:
                        value.type = ir.TensorType(ir.DataType(elem_type))
                    modified = True
        return ir.passes.PassResult(model, modified=modified)
