"""Analysis: the context limits a decoder's graph itself imposes (it rewrites nothing).

What it matches
  - A learned position table: a Gather from a constant 2-D table whose indices come from the
    `position_ids` or `attention_mask` input (GPT-2, OPT), with any constant offset added to the
    indices on the way (OPT adds 2): the model has `rows - offset` positions.
  - Rotary tables: GroupQueryAttention's `cos_cache` input (onnxruntime-genai exports), or a Gather
    from a constant cos/sin table indexed by positions (the same rule as above): `rows` positions.
  - Sliding-window caches the analysis found (the present output keeps the last N entries):
    attention spans N + 1 tokens in that layer.

What it returns
  `GraphLimit` values, each a figure and where it was read, for `kvcompile.limits` to combine
  with the model's config files.

Why
  A probe, calibration or verification run past a learned table's end fails inside onnxruntime
  (`Gather ... idx=1023 must be within the inclusive range [-512,511]`) or reads positions the
  model never learnt; a check of a sliding-window rewrite is only a check at a context longer
  than the window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph
from kvcompile.passes.constants import constant_ints

COS_CACHE_INPUT = 7  # GroupQueryAttention's cos_cache slot
# Ops the position indices pass through on their way to the table (the offset is read from Add/Sub).
INDEX_OPS = frozenset({"Add", "Sub", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Flatten", "Identity",
                       "CumSum", "Mul", "Slice", "Gather", "Concat", "Where", "Max", "Min", "Clip", "Range"})


@dataclass(frozen=True)
class GraphLimit:
    kind: str  # "positions" (the most tokens the model can take) or "window" (tokens one layer attends over)
    value: int
    source: str  # where it was read, for the report


def _table(value: ir.Value) -> ir.TensorProtocol | None:
    tensor = value.const_value
    if tensor is None or len(tensor.shape) != 2:
        return None
    return tensor


def _position_offset(indices: ir.Value) -> int:
    """Constants added to the indices just before the Gather (OPT's `positions + 2`)."""
    offset, value = 0, indices
    for _ in range(8):
        node = value.producer()
        if node is None or node.op_type not in ("Add", "Sub", "Cast") or len(node.inputs) < 1:
            break
        if node.op_type == "Cast":
            value = node.inputs[0]
            continue
        constants = [constant_ints(v) for v in node.inputs[:2]]
        index = next((i for i, c in enumerate(constants) if c is not None and len(c) == 1), None)
        if index is None:
            break
        sign = -1 if node.op_type == "Sub" and index == 1 else 1
        if node.op_type == "Sub" and index == 0:
            break
        offset += sign * constants[index][0]
        value = node.inputs[1 - index]
    return offset


def _reaches_from(value: ir.Value, sources: set[str], limit: int = 64) -> bool:
    """True if `value` is computed from one of the graph inputs named in `sources`."""
    queue, seen = deque([value]), set()
    while queue and len(seen) < limit:
        current = queue.popleft()
        if current.is_graph_input():
            if current.name in sources:
                return True
            continue
        node = current.producer()
        if node is None or id(node) in seen or node.op_type not in INDEX_OPS | {"Shape"}:
            continue
        seen.add(id(node))
        queue.extend(v for v in node.inputs if v is not None and v.const_value is None)
    return False


def graph_limits(model: ir.Model, kv: KVGraph) -> list[GraphLimit]:
    """Every position-table size and sliding window the graph shows."""
    limits: list[GraphLimit] = []
    positional = {i.name for i in kv.inputs if i.role in ("position_ids", "attention_mask")}
    for node in model.graph.all_nodes():
        if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[0] is not None:
            table = _table(node.inputs[0])
            if table is not None and positional and _reaches_from(node.inputs[1], positional):
                rows = table.shape[0] - _position_offset(node.inputs[1])
                limits.append(GraphLimit("positions", rows, f"position table {node.inputs[0].name!r} "
                                         f"({table.shape[0]} rows)"))
        if (node.domain, node.op_type) == ("com.microsoft", "GroupQueryAttention") \
                and len(node.inputs) > COS_CACHE_INPUT and node.inputs[COS_CACHE_INPUT] is not None:
            cos = node.inputs[COS_CACHE_INPUT]
            dims = cos.shape.dims if cos.shape is not None else ()
            if dims and isinstance(dims[0], int):
                limits.append(GraphLimit("positions", dims[0], f"{GROUP_QUERY_ATTENTION} rotary table "
                                         f"{cos.name!r} ({dims[0]} rows)"))
    windows: dict[int, list[int]] = {}
    for tensor in kv.tensors:
        if tensor.kept_entries is not None and tensor.kind == "key":
            windows.setdefault(tensor.kept_entries + 1, []).append(tensor.layer)
    for window, layers in sorted(windows.items()):
        limits.append(GraphLimit("window", window, f"the caches of layer(s) {', '.join(map(str, layers))} keep "
                                 f"their last {window - 1} entries"))
    return list(dict.fromkeys(limits))  # one entry per table, not one per layer reading it
