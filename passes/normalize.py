"""Rewrite: fold the constant computations exporters leave in a graph, before analysis.

What it matches
  - Nodes whose inputs are all constants (Constant nodes, initializers), and the tracing
    artifacts that follow from them: Concats with zero-length operands (the TorchScript exporter
    concatenates a model's past cache onto an empty tensor before appending the new entries),
    Identity chains, Constant nodes instead of initializers.
  - `Gather(Shape(x), i)` where dim i of x is a fixed size once shapes are inferred
    symbolically (onnxruntime's symbolic shape inference, `passes.symbolic_shapes`): TorchScript
    exports compute an attention output's head_dim from the repeated value cache's shape.

What it rewrites it to
  The folded values, as onnxscript's constant folder computes them (`FoldConstantsPass`, with
  its size limits, so weights are never materialised), a constant for each fixed dim read from
  a shape (an onnxscript rewrite rule), then unused nodes removed.

Why
  The analysis follows the cache through the graph's dataflow, and the fused attention keeps
  the cache in its own form: both need the cache's readers to be the attention itself. These
  artifacts put readers on the cache that do nothing (a Concat that appends nothing looks like
  the cache's own Concat with no present output behind it; a shape read of a fixed dim keeps
  the float cache alive beside the fused kernel). Folding them away lets one analysis and one
  fusion handle every exporter.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.optimizer._constant_folding import FoldConstantsPass  # the pass behind fold_constants
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter._rewrite_rule import RewriteRule

from kvcompile.passes.constants import constant_ints
from kvcompile.passes.symbolic_shapes import SymbolicShapeInferencePass


def _dim_of_shape(op, x, index):
    return op.Gather(op.Shape(x, _allow_other_attributes=True, _outputs=["shape"]), index, axis=0)


def _fixed_dims(x: ir.Value, index: ir.Value, shape: ir.Value) -> list[int] | None:
    """The fixed sizes `Gather(Shape(x), index)` reads, or None if any is not fixed."""
    indices = constant_ints(index)
    if indices is None or x.shape is None or index.shape is None or index.shape.rank() > 1:
        return None
    node = shape.producer()
    rank = x.shape.rank()
    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
    end = node.attributes["end"].as_int() if "end" in node.attributes else rank
    dims = list(x.shape.dims)[slice(start, end)]
    picked = [dims[i] for i in indices if -len(dims) <= i < len(dims)]
    if len(picked) != len(indices) or not all(isinstance(d, int) for d in picked):
        return None
    return picked


def _is_fixed(context, x, index, shape, **_) -> bool:
    return _fixed_dims(x, index, shape) is not None


def _as_constant(op, x, index, shape, **_):
    dims = np.array(_fixed_dims(x, index, shape), np.int64)
    return op.Constant(value=ir.tensor(dims if index.shape.rank() == 1 else dims.reshape(())))


STATIC_DIM_RULE = RewriteRule(_dim_of_shape, _as_constant, _is_fixed, name="StaticDimOfShape")


def _fold() -> FoldConstantsPass:
    return FoldConstantsPass(shape_inference=False, input_size_limit=8192, output_size_limit=512 * 512)


class NormalizeExportPass(ir.passes.InPlacePass):
    """`modified` is True when nodes changed (filling in inferred shapes alone does not count: the
    model as exported then still has exactly the nodes the analysis names)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cleanup = ir.passes.common.RemoveUnusedNodesPass()
        modified = _fold()(model).modified
        cleanup(model)
        SymbolicShapeInferencePass()(model)
        if RewritePass([STATIC_DIM_RULE])(model).modified:
            _fold()(model)
            modified = True
        if modified:
            cleanup(model)
            # Constants as initializers, as most exporters write them (and symbolic inference reads them).
            ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        return ir.passes.PassResult(model, modified=modified)
