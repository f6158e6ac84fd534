"""Rewrite: replace the ops Android's NNAPI lacks by equivalents it has, so one partition runs it all.

What it matches, and what it rewrites it to (onnxruntime's NNAPI EP support, as reported by
`onnxruntime.tools.check_onnx_model_mobile_usability`):
  Cos(x)          -> 1 - 2 * Sin(x / 2)^2         (exact identity; x / 2 is exact in float)
  Reciprocal(x)   -> 1 / x
  Round(x)        -> Floor(x + 0.5)               (differs from round-half-to-even only when
                                                   x is exactly k + 0.5, a measure-zero event
                                                   for calibrated activations)
  Expand(x, s)    -> Concat of copies of x along every axis where x has size 1 and s does not
                     (static shapes only: the repeat of KV heads for grouped-query attention)
  int64 inputs    -> int32 inputs (NNAPI has no 64-bit integers; the token ids index the
                     embedding with int32 as well)

Why
  Every node NNAPI cannot run splits the graph into another partition and a round trip to the
  CPU; the static decode graph then runs as one NNAPI partition.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.passes.kv_codec import FragmentBuilder
from kvcompile.passes.names import NameAllocator


def _replace(graph: ir.Graph, node: ir.Node, builder: FragmentBuilder, result: ir.Value) -> None:
    graph.insert_before(node, builder.nodes)
    node.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _static_shape(value: ir.Value) -> list[int] | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape.dims):
        return None
    return list(value.shape.dims)


class LegalizeForNNAPIPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ir.passes.common.ShapeInferencePass()(model)
        names = NameAllocator(graph)
        modified = self._int32_inputs(graph, names)
        for node in list(graph):
            builder = FragmentBuilder(graph, names, f"kvcompile/nnapi/{node.op_type}")
            dtype = node.outputs[0].dtype
            if node.op_type == "Cos":
                half = builder.op("Sin", [builder.op("Mul", [node.inputs[0], builder.const(_scalar(0.5, dtype), "half")])])
                squared = builder.op("Mul", [half, half])
                result = builder.op("Sub", [builder.const(_scalar(1.0, dtype), "one"),
                                            builder.op("Mul", [squared, builder.const(_scalar(2.0, dtype), "two")])])
            elif node.op_type == "Reciprocal":
                result = builder.op("Div", [builder.const(_scalar(1.0, dtype), "one"), node.inputs[0]])
            elif node.op_type == "Round":
                result = builder.op("Floor", [builder.op("Add", [node.inputs[0], builder.const(_scalar(0.5, dtype), "half")])])
            elif node.op_type == "Expand":
                result = self._expand_by_concat(builder, node)
                if result is None:
                    continue
            else:
                continue
            _replace(graph, node, builder, result)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _expand_by_concat(builder: FragmentBuilder, node: ir.Node) -> ir.Value | None:
        source, target = _static_shape(node.inputs[0]), node.inputs[1].const_value
        if source is None or target is None:
            return None
        target = list(target.numpy().reshape(-1))
        target = [1] * (len(source) - len(target)) + target if len(target) < len(source) else target
        source = [1] * (len(target) - len(source)) + source
        value = node.inputs[0]
        if len(source) != len(node.inputs[0].shape.dims):
            value = builder.op("Reshape", [value, builder.ints(*source)])
        for axis, (have, want) in enumerate(zip(source, target)):
            if have == 1 and want > 1:
                value = builder.op("Concat", [value] * int(want), axis=axis)
            elif have != want and want != 1:
                return None
        return value

    @staticmethod
    def _int32_inputs(graph: ir.Graph, names: NameAllocator) -> bool:
        modified = False
        for value in list(graph.inputs):
            if value.dtype != ir.DataType.INT64:
                continue
            narrow = ir.Value(name=names.name(f"{value.name}__int32"), type=ir.TensorType(ir.DataType.INT32), shape=value.shape)
            for use in list(value.uses()):
                if use.node.op_type in ("Gather", "Cast") and not (use.node.op_type == "Gather" and use.idx == 0):
                    use.node.replace_input_with(use.idx, narrow)
                else:  # keep int64 for anything else, widened from the int32 input
                    widen = ir.Node("", "Cast", [narrow], attributes=[ir.AttrInt64("to", ir.DataType.INT64)],
                                    num_outputs=1, name=names.name(f"kvcompile/nnapi/widen_{value.name}"))
                    graph.insert_before(use.node, [widen])
                    use.node.replace_input_with(use.idx, widen.outputs[0])
            graph.inputs[graph.inputs.index(value)] = narrow
            name = value.name
            names.rename(value, f"{name}__int64")
            narrow.name = name
            modified = True
        return modified


def _scalar(value: float, dtype: ir.DataType | None) -> np.ndarray:
    return np.array(value, dtype=np.float16 if dtype == ir.DataType.FLOAT16 else np.float32)
