"""Rewrite: fold the constant computations exporters leave in a graph, before analysis.

What it matches
  - Nodes whose inputs are all constants (Constant nodes, initializers), and the tracing
    artifacts that follow from them: Concats with zero-length operands (the TorchScript exporter
    concatenates a model's past cache onto an empty tensor before appending the new entries),
    Identity chains, Constant nodes instead of initializers.
  - `Gather(Shape(x), i)` and `Slice(Shape(x), a, b)` where the dims read are fixed sizes once
    shapes are inferred symbolically (onnxruntime's symbolic shape inference,
    `passes.symbolic_shapes`): TorchScript exports compute an attention output's head_dim from
    the repeated value cache's shape, and SDPA's scale from the query's.

What it rewrites it to
  The folded values, as onnxscript's constant folder computes them (`FoldConstantsPass`, with
  its size limits, so weights are never materialised), a constant for each fixed dim read from
  a shape (onnxscript rewrite rules), then unused nodes removed.

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
from kvcompile.passes.manager import run_passes
from kvcompile.passes.symbolic_shapes import SymbolicShapeInferencePass


def _shape_dims(shape: ir.Value) -> list | None:
    """The dims a Shape node's output lists (its start/end attributes applied), or None."""
    node = shape.producer()
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
    end = node.attributes["end"].as_int() if "end" in node.attributes else x.shape.rank()
    return list(x.shape.dims)[slice(start, end)]


def _dim_of_shape(op, x, index):
    return op.Gather(op.Shape(x, _allow_other_attributes=True, _outputs=["shape"]), index, axis=0)


def _gathered(index: ir.Value, shape: ir.Value) -> np.ndarray | None:
    """The fixed sizes `Gather(Shape(x), index)` reads (shaped like `index`), or None."""
    indices, dims = constant_ints(index), _shape_dims(shape)
    if indices is None or dims is None:
        return None
    rank = len(ir.convenience.get_const_tensor(index).shape)
    if rank > 1:
        return None
    picked = [dims[i] for i in indices if -len(dims) <= i < len(dims)]
    if len(picked) != len(indices) or not all(isinstance(d, int) for d in picked):
        return None
    array = np.array(picked, np.int64)
    return array if rank == 1 else array.reshape(())


def _slice_of_shape(op, x, starts, ends):
    return op.Slice(op.Shape(x, _allow_other_attributes=True, _outputs=["shape"]), starts, ends,
                    _allow_other_inputs=True, _outputs=["sliced"])


def _sliced(shape: ir.Value, sliced: ir.Value) -> np.ndarray | None:
    """The fixed sizes `Slice(Shape(x), starts, ends[, axes, steps])` reads, or None."""
    node, dims = sliced.producer(), _shape_dims(shape)
    params = [constant_ints(v) if v is not None else None for v in node.inputs[1:5]]
    params += [None] * (4 - len(params))
    starts, ends, axes, steps = params
    if dims is None or starts is None or ends is None or len(starts) != 1 or axes not in (None, [0], [-1]):
        return None
    step = 1 if steps is None else steps[0]
    picked = dims[slice(starts[0], ends[0], step)] if step else None
    if picked is None or not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, np.int64)


STATIC_DIM_RULES = [
    RewriteRule(_dim_of_shape, lambda op, index, shape, **_: op.Constant(value=ir.tensor(_gathered(index, shape))),
                lambda context, index, shape, **_: _gathered(index, shape) is not None, name="StaticDimOfShape",
                remove_nodes=False),
    RewriteRule(_slice_of_shape, lambda op, shape, sliced, **_: op.Constant(value=ir.tensor(_sliced(shape, sliced))),
                lambda context, shape, sliced, **_: _sliced(shape, sliced) is not None, name="StaticSliceOfShape",
                remove_nodes=False),
]


def _fold() -> FoldConstantsPass:
    return FoldConstantsPass(shape_inference=False, input_size_limit=8192, output_size_limit=512 * 512)


def normalize_export(model: ir.Model) -> bool:
    """Fold the constant computations exporters leave (in place). True when nodes changed:
    filling in inferred shapes alone does not count (the model as exported then still has exactly
    the nodes the analysis names, and the compile may run the input file itself).

    A sequence of pass chains, each run by a PassManager: what runs next depends on whether the
    previous chain changed nodes."""
    modified = run_passes(model, _fold())
    run_passes(model, ir.passes.common.RemoveUnusedNodesPass(), SymbolicShapeInferencePass())
    if run_passes(model, RewritePass(STATIC_DIM_RULES)):
        run_passes(model, _fold())
        modified = True
    if modified:
        # Constants as initializers, as most exporters write them (and symbolic inference reads them).
        run_passes(model, ir.passes.common.RemoveUnusedNodesPass(),
                   ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0))
    return modified
