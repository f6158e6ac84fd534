"""Running chains of passes: one `ir.passes.PassManager` per chain, refusals unwrapped.

onnx_ir wraps whatever a pass raises (in `requires`, `call` or `ensures`) in PassError or
PreconditionError / PostconditionError. A refusal (`KvCompileError`: an unsupported model, bad
input) must reach the user as itself, one line, so it is taken out of those wrappers here.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.errors import KvCompileError

_WRAPPERS = (ir.passes.PassError, ir.passes.InvariantError)


def run_passes(model: ir.Model, *passes: ir.passes.PassBase) -> bool:
    """Run `passes` in order on `model` (in place); True if any of them changed it."""
    try:
        return ir.passes.PassManager(list(passes))(model).modified
    except _WRAPPERS as exc:
        cause = exc.__cause__
        while isinstance(cause, _WRAPPERS):
            cause = cause.__cause__
        if isinstance(cause, KvCompileError):
            raise cause from None
        raise


def shapes_inferred() -> list[ir.passes.PassBase]:
    """onnx's shape inference, then onnxruntime's symbolic inference for what onnx leaves
    unknown (query heads behind Reshapes of symbolic dims): what passes reading shapes need first."""
    from kvcompile.passes.symbolic_shapes import SymbolicShapeInferencePass

    return [ir.passes.common.ShapeInferencePass(), SymbolicShapeInferencePass()]


def cleaned_up() -> list[ir.passes.PassBase]:
    """Unused nodes removed and nodes in topological order: the end of every rewrite chain."""
    return [ir.passes.common.RemoveUnusedNodesPass(), ir.passes.common.TopologicalSortPass()]
