"""Rewrite: replace the ops Android's NNAPI lacks by equivalents it has, so one partition runs it all.

What it matches, and what it rewrites it to (onnxruntime's NNAPI EP support, as reported by
`onnxruntime.tools.check_onnx_model_mobile_usability`). The first four are local patterns,
written as onnxscript rewrite rules (`NNAPI_RULES`):
  Cos(x)          -> 1 - 2 * Sin(x * 0.5)^2       (exact identity; x * 0.5 is exact in float)
  Reciprocal(x)   -> 1 / x
  Round(x)        -> Floor(x + 0.5)               (differs from round-half-to-even only when
                                                   x is exactly k + 0.5, a measure-zero event
                                                   for calibrated activations)
  Expand(x, s)    -> Concat of copies of x along every axis where x has size 1 and s does not
                     (static shapes only: the repeat of KV heads for grouped-query attention)
The last changes the graph's interface, so it is a pass of its own (`NarrowInt64InputsPass`):
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
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter._rewrite_rule import RewriteRule

from kvcompile.passes.conditions import ensure_no_ops
from kvcompile.passes.manager import cleaned_up
from kvcompile.passes.names import NameAllocator


def _scalar(value: float, like: ir.Value) -> ir.TensorProtocol:
    return ir.tensor(np.array(value, dtype=np.float16 if like.dtype == ir.DataType.FLOAT16 else np.float32))


def _cos(op, x):
    return op.Cos(x)


def _cos_from_sin(op, x):
    half = op.Sin(op.Mul(x, op.Constant(value=_scalar(0.5, x))))
    return op.Sub(op.Constant(value=_scalar(1.0, x)), op.Mul(op.Mul(half, half), op.Constant(value=_scalar(2.0, x))))


def _reciprocal(op, x):
    return op.Reciprocal(x)


def _one_over(op, x):
    return op.Div(op.Constant(value=_scalar(1.0, x)), x)


def _round(op, x):
    return op.Round(x)


def _floor_of_half_up(op, x):
    return op.Floor(op.Add(x, op.Constant(value=_scalar(0.5, x))))


def _expand(op, x, shape):
    return op.Expand(x, shape)


def _repeats(x: ir.Value, shape: ir.Value) -> tuple[list[int], list[int]] | None:
    """(x's dims padded to the target rank, the target dims) when Expand only repeats along
    axes where x has size 1, with every size known; else None."""
    if x.shape is None or not all(isinstance(d, int) for d in x.shape.dims) or shape.const_value is None:
        return None
    source, target = list(x.shape.dims), [int(d) for d in shape.const_value.numpy().reshape(-1)]
    target = [1] * (len(source) - len(target)) + target if len(target) < len(source) else target
    source = [1] * (len(target) - len(source)) + source
    if any(have != want and want != 1 and have != 1 for have, want in zip(source, target)):
        return None
    return source, target


def _expand_by_concat(op, x, shape):
    source, target = _repeats(x, shape)
    value = x
    if len(source) != x.shape.rank():
        value = op.Reshape(value, op.Constant(value=ir.tensor(np.array(source, np.int64))))
    for axis, (have, want) in enumerate(zip(source, target)):
        if have == 1 and want > 1:
            value = op.Concat(*([value] * want), axis=axis)
    return value


NNAPI_RULES = [
    RewriteRule(_cos, _cos_from_sin, name="CosFromSin"),
    RewriteRule(_reciprocal, _one_over, name="ReciprocalAsDiv"),
    RewriteRule(_round, _floor_of_half_up, name="RoundAsFloor"),
    RewriteRule(_expand, _expand_by_concat, lambda context, x, shape, **_: _repeats(x, shape) is not None,
                name="ExpandByConcat"),
]


class NarrowInt64InputsPass(ir.passes.InPlacePass):
    """int64 graph inputs become int32 (same names): Gather indices and Casts read the int32
    input, anything else a Cast back to int64."""

    def ensures(self, model: ir.Model) -> None:
        assert all(v.dtype != ir.DataType.INT64 for v in model.graph.inputs), "an int64 graph input is left"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
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
        return ir.passes.PassResult(model, modified=modified)


class CheckLegalForNNAPIPass(ir.passes.InPlacePass):
    """Changes nothing; its postcondition is that the rewrites above left none of the ops they
    replace (an Expand that is not a plain repeat may stay: NNAPI then runs it on the CPU)."""

    def ensures(self, model: ir.Model) -> None:
        ensure_no_ops(model, ("Cos", "Reciprocal", "Round"))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)


def legalize_nnapi_passes() -> list[ir.passes.PassBase]:
    """Shapes inferred (Expand needs its input's), int64 inputs narrowed, the ops NNAPI lacks
    rewritten, their constants lifted to initializers, cleaned up."""
    return [ir.passes.common.ShapeInferencePass(), NarrowInt64InputsPass(), RewritePass(NNAPI_RULES),
            CheckLegalForNNAPIPass(),
            # the rules' constants as initializers, like every other weight of the static graph
            ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            *cleaned_up()]
