"""Pre- and postconditions the KV-cache passes share (their `requires` / `ensures`).

A failed condition is raised as the refusal or bug it is: a cache the analysis named but the
graph does not have is kvcompile's inconsistency (AssertionError: onnx_ir reports it as the
pass's PreconditionError / PostconditionError)."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from kvcompile.kvgraph import KVTensor
from kvcompile.passes.find_kv_cache import FLOAT_TYPES  # the cache dtypes the analysis accepts


def _inputs(model: ir.Model) -> dict[str, ir.Value]:
    return {value.name: value for value in model.graph.inputs}


def _outputs(model: ir.Model) -> dict[str, ir.Value]:
    return {value.name: value for value in model.graph.outputs}


def require_cache_inputs(model: ir.Model, tensors: Iterable[KVTensor]) -> None:
    """Every cache tensor is a float graph input, and its present output a graph output."""
    inputs, outputs = _inputs(model), _outputs(model)
    for tensor in tensors:
        past = inputs.get(tensor.past_input)
        assert past is not None, f"{tensor.label}: no graph input {tensor.past_input!r}"
        assert past.dtype in FLOAT_TYPES, f"{tensor.label}: {tensor.past_input!r} is {past.dtype}, not float"
        assert tensor.present_output in outputs, f"{tensor.label}: no graph output {tensor.present_output!r}"


def ensure_stored_as(model: ir.Model, tensors: Iterable[KVTensor], dtype: ir.DataType) -> None:
    """Every cache tensor's past input and present output now hold `dtype` (its codes)."""
    inputs, outputs = _inputs(model), _outputs(model)
    for tensor in tensors:
        for value, name in ((inputs.get(tensor.past_input), tensor.past_input),
                            (outputs.get(tensor.present_output), tensor.present_output)):
            assert value is not None and value.dtype == dtype, f"{tensor.label}: {name!r} is not stored as {dtype}"


def ensure_no_ops(model: ir.Model, op_types: Iterable[str]) -> None:
    left = sorted({node.op_type for node in model.graph.all_nodes()} & set(op_types))
    assert not left, f"still in the graph: {', '.join(left)}"
