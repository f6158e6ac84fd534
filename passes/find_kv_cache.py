"""Analysis: find every layer's KV cache by following the dataflow (names are only hints).

What it matches
  A float graph input (the past cache) that reaches, through layout ops (Cast, Identity,
  Reshape, ...), either
  - a Concat whose result is a graph output (the present cache): decomposed attention; the
    Concat axis is the sequence axis and the Concat's other input holds the new entries; or
  - the past-key/past-value slot of an attention op (GroupQueryAttention, MultiHeadAttention,
    ONNX Attention) whose matching present output is a graph output.
  Key or value is decided by what the cache feeds: the tensor feeding Q.K^T (a MatMul whose
  result reaches a Softmax, or an attention op's key slot) is a key, the one feeding P.V (a
  MatMul whose other operand comes from a Softmax, or the value slot) is a value. Keys and values
  feeding the same Softmax/attention op form one layer.

What it returns
  A `KVGraph`: per cache tensor the past input, present output, axes (batch, heads, seq,
  head_dim; keys may be stored transposed), head count, head_dim, dtype, attention form and the
  producer chain back to the K/V projection (through RoPE). It rewrites nothing.

Why
  Exporters name caches differently (optimum, torch.onnx, onnxruntime-genai, Qualcomm-style
  exports) and some keep one tensor per head or keys transposed; only the dataflow is reliable.
  Layers are ordered by the first number in the cache names, then by graph order.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from kvcompile.errors import BadInputError, UnsupportedModelError
from kvcompile.kvgraph import (
    DECOMPOSED,
    GROUP_QUERY_ATTENTION,
    MULTI_HEAD_ATTENTION,
    ONNX_ATTENTION,
    KVAxes,
    KVGraph,
    KVTensor,
    ModelInput,
)
from kvcompile.passes.constants import constant_ints
from kvcompile.passes.score_path import LAYOUT_OPS, SCORE_PATH_OPS

# Ops RoPE and the head split are built from, between the K/V projection and the cache.
PRODUCER_OPS = LAYOUT_OPS | {"Add", "Sub", "Mul", "Neg", "Concat", "RotaryEmbedding"}
ROPE_MARKERS = frozenset({"Cos", "Sin", "RotaryEmbedding"})
PROJECTION_OPS = frozenset({"MatMul", "Gemm", "MatMulNBits"})

# Attention ops: which input slots are key/value (new and past) and which outputs are present.
ATTENTION_OPS = {
    ("com.microsoft", "GroupQueryAttention"): {
        "form": GROUP_QUERY_ATTENTION, "key_in": (1, 3), "value_in": (2, 4), "past": {3: 1, 4: 2},
    },
    ("com.microsoft", "MultiHeadAttention"): {
        "form": MULTI_HEAD_ATTENTION, "key_in": (1, 6), "value_in": (2, 7), "past": {6: 1, 7: 2},
    },
    ("", "Attention"): {
        "form": ONNX_ATTENTION, "key_in": (1, 4), "value_in": (2, 5), "past": {4: 1, 5: 2},
    },
}
FLOAT_TYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16"}
# Float caches are discovered in every precision, so that one kvcompile cannot store is refused by
# name ("is DOUBLE; ...") instead of looking like a model without a cache.
DISCOVERED_TYPES = {*FLOAT_TYPES, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass
class _Found:
    past: ir.Value
    present: ir.Value
    kind: str
    form: str
    block: ir.Node  # the Softmax or attention op the cache feeds: one per layer (or head)
    seq_axis: int | None
    concat: ir.Node | None = None
    new_entries: ir.Value | None = None
    attention_op: ir.Node | None = None
    reader: ir.Node | None = None  # decomposed: the MatMul that reads the cache (Q.K^T or P.V)
    reader_operand: int | None = None
    kept_entries: int | None = None  # the present keeps only the last N entries (sliding window)


def _op_key(node: ir.Node) -> tuple[str, str]:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return domain, node.op_type


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _keeps_identity(node: ir.Node, index: int) -> bool:
    """Layout ops (through their data input), and scaling by a constant (SDPA's sqrt(scale) on K)."""
    if _op_key(node)[0] != "":
        return False
    if node.op_type in LAYOUT_OPS:
        return index == 0
    if node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
        return _is_constant(node.inputs[1 - index])
    return False


def _through_layout(value: ir.Value, max_nodes: int = 64) -> list[tuple[ir.Node, int]]:
    """Uses of `value` and of values derived from it through layout ops (node, input index)."""
    uses, queue, seen = [], deque([value]), set()
    while queue and len(seen) < max_nodes:
        current = queue.popleft()
        for use in current.uses():
            node, index = use.node, use.idx
            if (id(node), index) in seen:
                continue
            seen.add((id(node), index))
            uses.append((node, index))
            if _keeps_identity(node, index):
                queue.extend(o for o in node.outputs if o is not None)
    return uses


# Ops allowed between the Concat that appends to the cache and the present output: copies, and
# Slices along the sequence (a sliding-window cache keeps its last `window - 1` entries).
PRESENT_CHAIN_OPS = frozenset({"Cast", "Identity", "Slice"})


def _graph_output_of(value: ir.Value) -> ir.Value | None:
    """`value` itself or what it becomes through Cast/Identity/Slice, if that is a graph output."""
    queue, seen = deque([value]), set()
    while queue:
        current = queue.popleft()
        if current.is_graph_output():
            return current
        for use in current.uses():
            if use.node.op_type in PRESENT_CHAIN_OPS and use.idx == 0 and id(use.node) not in seen:
                seen.add(id(use.node))
                queue.extend(use.node.outputs)
    return None


def _kept_entries(concat_output: ir.Value, present: ir.Value, seq_axis: int, rank: int) -> int | None:
    """N when the present output keeps only the last N entries of the concatenated cache (a
    sliding window of N + 1 tokens): a Slice on the sequence axis from a constant -N to the end."""
    value, kept = present, None
    while value is not concat_output:
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Slice":
            params = [constant_ints(node.inputs[i]) if len(node.inputs) > i else None for i in range(1, 5)]
            starts, ends, axes, steps = params
            axes = axes if axes is not None else (list(range(len(starts))) if starts is not None else None)
            if starts is not None and ends is not None and axes is not None and [a % rank for a in axes] == [seq_axis]:
                if starts[0] < 0 and ends[0] >= 2**31 and (steps is None or steps == [1]):
                    kept = -starts[0] if kept is None else min(kept, -starts[0])
        value = node.inputs[0]
    return kept



def _reaches_op(value: ir.Value, targets: frozenset[str], through: frozenset[str], limit: int = 48) -> ir.Node | None:
    """First node of type in `targets` downstream of `value`, walking only through `through` ops."""
    queue, seen = deque([value]), set()
    while queue and len(seen) < limit:
        for use in queue.popleft().uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in targets:
                return node
            if node.op_type in through:
                queue.extend(o for o in node.outputs if o is not None)
    return None


def _comes_from_op(value: ir.Value | None, targets: frozenset[str], through: frozenset[str], limit: int = 48) -> ir.Node | None:
    """First node of type in `targets` upstream of `value`, walking only through `through` ops."""
    queue, seen = deque([value]), set()
    while queue and len(seen) < limit:
        current = queue.popleft()
        node = current.producer() if current is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in targets:
            return node
        if node.op_type in through:
            queue.extend(i for i in node.inputs if i is not None and i.const_value is None)
    return None


def _classify_matmul(matmul: ir.Node, cache_index: int) -> tuple[str, ir.Node] | None:
    """Key if the MatMul's result reaches a Softmax; value if its other operand comes from one."""
    softmax = _reaches_op(matmul.outputs[0], frozenset({"Softmax"}), SCORE_PATH_OPS)
    if softmax is not None:
        return "key", softmax
    other = matmul.inputs[1 - cache_index] if len(matmul.inputs) == 2 else None
    softmax = _comes_from_op(other, frozenset({"Softmax"}), SCORE_PATH_OPS)
    if softmax is not None:
        return "value", softmax
    return None


def _classify_cache(value: ir.Value) -> tuple[str, ir.Node, str, ir.Node | None, int | None] | None:
    """(kind, block node, attention form, reading MatMul, its cache operand) for a full cache
    tensor, from what it feeds."""
    for node, index in _through_layout(value):
        if node.op_type == "MatMul" and index in (0, 1):
            found = _classify_matmul(node, index)
            if found is not None:
                return found[0], found[1], DECOMPOSED, node, index
        spec = ATTENTION_OPS.get(_op_key(node))
        if spec is not None:
            if index in spec["key_in"]:
                return "key", node, spec["form"], None, None
            if index in spec["value_in"]:
                return "value", node, spec["form"], None, None
    return None


def _find_entries(graph: ir.Graph) -> tuple[list[_Found], list[str]]:
    found: list[_Found] = []
    orphans: list[str] = []
    for past in graph.inputs:
        if past.type is None or past.dtype not in DISCOVERED_TYPES:
            continue
        if past.shape is None or len(past.shape) not in (3, 4):
            continue
        entry = None
        dead_end = False
        for node, index in _through_layout(past, max_nodes=16):
            if node.op_type == "Concat":
                present = _graph_output_of(node.outputs[0])
                if present is None:
                    dead_end = True
                    continue
                classified = _classify_cache(node.outputs[0])
                if classified is None:
                    continue
                kind, block, form, reader, operand = classified
                axis = node.attributes["axis"].as_int()
                rank = len(past.shape)
                # The Concat's other operand holds the new entries (`index` is the cache's).
                others = [v for i, v in enumerate(node.inputs) if v is not None and i != index]
                entry = _Found(past, present, kind, form, block, axis % rank, concat=node,
                               new_entries=others[0] if len(others) == 1 else None,
                               attention_op=block if form != DECOMPOSED else None,
                               reader=reader, reader_operand=operand,
                               kept_entries=_kept_entries(node.outputs[0], present, axis % rank, rank))
                break
            spec = ATTENTION_OPS.get(_op_key(node))
            if spec is not None and index in spec["past"]:
                out = node.outputs[spec["past"][index]] if len(node.outputs) > spec["past"][index] else None
                present = _graph_output_of(out) if out is not None else None
                if present is None:
                    dead_end = True
                    continue
                kind = "key" if index in spec["key_in"] else "value"
                entry = _Found(past, present, kind, spec["form"], node, None, attention_op=node)
                break
        if entry is not None:
            found.append(entry)
        elif dead_end:
            orphans.append(past.name)
    return found, orphans


@dataclass(frozen=True)
class CacheNodes:
    """A cache tensor's nodes in a graph (decomposed attention), found from its past input by the
    analysis's own walk: passes that rewrite around them match the graph's structure, so they
    also work on graphs re-loaded or rewritten after the analysis named the nodes."""

    concat: ir.Node | None  # the Concat that appends the new entries
    reader: ir.Node | None  # the MatMul that reads the whole cache (Q.K^T or P.V)
    reader_operand: int | None  # which of its inputs carries the cache
    cache_operand: int | None = None  # which of the Concat's inputs carries the past (the others: new entries)


def cache_nodes(graph: ir.Graph, tensor: KVTensor) -> CacheNodes:
    """The first Concat the past input reaches (through layout ops) whose result becomes a graph
    output, and the MatMul reading that result; None for what is not there."""
    past = next((v for v in graph.inputs if v.name == tensor.past_input), None)
    if past is None:
        return CacheNodes(None, None, None)
    for node, index in _through_layout(past, max_nodes=16):
        if node.op_type == "Concat" and _graph_output_of(node.outputs[0]) is not None:
            classified = _classify_cache(node.outputs[0])
            if classified is None or classified[3] is None:
                return CacheNodes(node, None, None, index)
            return CacheNodes(node, classified[3], classified[4], index)
    return CacheNodes(None, None, None)


def _first_number(name: str) -> int:
    match = re.search(r"\d+", name)
    return int(match.group()) if match else -1


def _dims(value: ir.Value) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in value.shape.dims]


def _axes_for(rank: int, seq_axis: int) -> KVAxes:
    """Batch first; of the axes left after batch and seq, heads is the first and head_dim the last."""
    rest = [a for a in range(1, rank) if a != seq_axis]
    if rank == 4:
        return KVAxes(batch=0, heads=rest[0], seq=seq_axis, head_dim=rest[1])
    return KVAxes(batch=0, heads=None, seq=seq_axis, head_dim=rest[0])


def _normalized_shape(value: ir.Value, axes: KVAxes, num_heads: int, head_dim: int) -> tuple[int | str, ...]:
    """The past input's shape with batch/seq named "batch"/"seq" and the head sizes filled in."""
    dims: list[int | str] = list(value.shape.dims)
    dims[axes.batch], dims[axes.seq], dims[axes.head_dim] = "batch", "seq", head_dim
    if axes.heads is not None:
        dims[axes.heads] = num_heads
    return tuple(dims)


def _static_dim(value: ir.Value, axis: int, what: str) -> int:
    dim = value.shape.dims[axis]
    if isinstance(dim, int):
        return dim
    raise UnsupportedModelError(
        f"cache input {value.name!r} has a symbolic {what} dimension ({dim}); kvcompile needs "
        "the number of KV heads and head_dim as fixed sizes: re-export with static head sizes "
        "or describe the cache with --kv-map"
    )


GQA_KEY_INPUT = 1  # GroupQueryAttention's new keys (empty when Q, K and V come packed in input 0)


def key_centering_error(node: ir.Node) -> str | None:
    """Why subtracting a center from the new keys this GroupQueryAttention appends would not come
    out exactly through its softmax (None if it would)."""
    if len(node.inputs) <= GQA_KEY_INPUT or node.inputs[GQA_KEY_INPUT] is None:
        return "the node takes Q, K and V packed in one input"
    rotary = node.attributes.get("do_rotary")
    if rotary is not None and rotary.as_int() != 0:
        return "the node rotates the keys itself (do_rotary=1), after the center would be subtracted"
    return None


def _producer_chain(new_entries: ir.Value | None) -> tuple[tuple[str, ...], str | None, bool]:
    """Walk up from the appended K/V to the projection: (chain of node names, projection, rope)."""
    if new_entries is None:
        return (), None, False
    chain: list[str] = []
    projection = None
    rope = False
    queue, seen = deque([new_entries]), set()
    while queue and len(seen) < 64:
        node = queue.popleft().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ROPE_MARKERS:
            rope = True
            if node.op_type != "RotaryEmbedding":
                continue
        if node.op_type in PROJECTION_OPS:
            projection = projection or node.name
            chain.append(node.name)
            continue
        if node.op_type not in PRODUCER_OPS:
            continue
        chain.append(node.name)
        # Layout ops carry data in input 0 only (the rest are shapes, axes, indices).
        operands = node.inputs[:1] if node.op_type in LAYOUT_OPS else node.inputs
        queue.extend(i for i in operands if i is not None and i.const_value is None and not i.is_graph_input())
    return tuple(chain), projection, rope


def _layers(found: list[_Found], graph: ir.Graph) -> list[list[list[_Found]]]:
    """Layers as lists of blocks (one attention op or Softmax each) of cache entries.

    Blocks are ordered by the first number in their cache names, then by graph order. Blocks
    whose caches hold one head each (rank 3) and share that number form one layer.
    """
    order = {id(node): i for i, node in enumerate(graph)}
    blocks: dict[int, list[_Found]] = {}
    for entry in found:
        blocks.setdefault(id(entry.block), []).append(entry)

    def number(block: list[_Found]) -> int:
        return min(_first_number(e.past.name) for e in block)

    def per_head(block: list[_Found]) -> bool:
        return all(len(e.past.shape) == 3 for e in block)

    layers: list[list[list[_Found]]] = []
    for block in sorted(blocks.values(), key=lambda b: (number(b), order.get(id(b[0].block), 0))):
        previous = layers[-1][-1] if layers else None
        if previous is not None and per_head(block) and per_head(previous) and number(block) == number(previous) >= 0:
            layers[-1].append(block)
        else:
            layers.append([block])
    return layers


def _head_dim_from_op(node: ir.Node | None) -> int | None:
    """head_dim of an attention op: its output's hidden size over the number of query heads."""
    if node is None or "num_heads" not in node.attributes or node.outputs[0].shape is None:
        return None
    hidden = node.outputs[0].shape.dims[-1]
    if not isinstance(hidden, int):
        return None
    return hidden // node.attributes["num_heads"].as_int()


def _kv_heads_from_op(node: ir.Node | None) -> int | None:
    if node is None:
        return None
    for attr in ("kv_num_heads", "num_heads", "kv_num_heads_"):
        if attr in node.attributes:
            return node.attributes[attr].as_int()
    return None


def _tensor(entry: _Found, layer: int, head: int | None) -> KVTensor:
    past = entry.past
    rank = len(past.shape)
    seq_axis = entry.seq_axis if entry.seq_axis is not None else rank - 2
    axes = _axes_for(rank, seq_axis)
    dim = past.shape.dims[axes.head_dim]
    head_dim = dim if isinstance(dim, int) else _head_dim_from_op(entry.attention_op)
    if head_dim is None:
        head_dim = _static_dim(past, axes.head_dim, "head_dim")
    if axes.heads is None:
        num_heads = 1
    else:
        dim = past.shape.dims[axes.heads]
        num_heads = dim if isinstance(dim, int) else _kv_heads_from_op(entry.attention_op)
        if num_heads is None:
            num_heads = _static_dim(past, axes.heads, "heads")
    if past.dtype not in FLOAT_TYPES:
        raise UnsupportedModelError(
            f"cache input {past.name!r} is {past.dtype.name}; kvcompile handles float32 and "
            "float16 caches (convert the model with a float16 or float32 export)"
        )
    chain, projection, rope = _producer_chain(entry.new_entries)
    if entry.form == GROUP_QUERY_ATTENTION and entry.attention_op is not None:
        rope = rope or ("do_rotary" in entry.attention_op.attributes and
                        entry.attention_op.attributes["do_rotary"].as_int() == 1)
    return KVTensor(
        layer=layer,
        kind=entry.kind,
        past_input=past.name,
        present_output=entry.present.name,
        axes=axes,
        num_heads=num_heads,
        head_dim=head_dim,
        dtype=FLOAT_TYPES[past.dtype],
        attention=entry.form,
        past_shape=_normalized_shape(past, axes, num_heads, head_dim),
        head=head,
        concat_node=entry.concat.name if entry.concat is not None else None,
        new_entries=entry.new_entries.name if entry.new_entries is not None else None,
        producer_chain=chain,
        projection=projection,
        rope=rope,
        reader=entry.reader.name if entry.reader is not None else None,
        reader_operand=entry.reader_operand,
        kept_entries=entry.kept_entries,
        centerable=(entry.form == GROUP_QUERY_ATTENTION and entry.kind == "key" and entry.attention_op is not None
                    and key_centering_error(entry.attention_op) is None),
    )


def _feeds_embedding(value: ir.Value) -> bool:
    """True for token ids: integers that index (Gather input 1) a weight table."""
    return any(node.op_type == "Gather" and index == 1 and _is_constant(node.inputs[0])
               for node, index in _through_layout(value, max_nodes=8))


def _model_inputs(graph: ir.Graph, kv_inputs: set[str]) -> tuple[ModelInput, ...]:
    """Roles of the non-cache inputs: token ids by structure, mask and positions by name."""
    inputs = []
    for value in graph.inputs:
        if value.name in kv_inputs:
            continue
        name = value.name.lower()
        dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
        if value.dtype in FLOAT_TYPES and "embed" in name:
            raise UnsupportedModelError(
                f"input {value.name!r} feeds embeddings directly; kvcompile drives decoders by "
                "token ids: export the model with an input_ids input"
            )
        if "position" in name:
            role = "position_ids"
        elif "mask" in name:
            role = "attention_mask"
        elif _feeds_embedding(value) or name in ("input_ids", "ids", "tokens"):
            role = "input_ids"
        else:
            raise UnsupportedModelError(
                f"model input {value.name!r} is neither a KV cache nor one of input_ids / "
                "attention_mask / position_ids, so kvcompile cannot drive the decode loop; "
                "describe the cache with --kv-map if it is one"
            )
        inputs.append(ModelInput(value.name, role, dtype))
    if sum(i.role == "input_ids" for i in inputs) != 1:
        raise UnsupportedModelError(
            "expected exactly one input_ids input (integers indexing the token embedding); "
            f"inputs are {[i.name for i in graph.inputs if i.name not in kv_inputs]}"
        )
    return tuple(inputs)


def _logits_output(graph: ir.Graph, kv_outputs: set[str]) -> str:
    others = [v for v in graph.outputs if v.name not in kv_outputs]
    named = [v for v in others if "logits" in v.name.lower()]
    if named:
        return named[0].name
    if len(others) == 1:
        return others[0].name
    raise UnsupportedModelError(
        f"cannot tell which output holds the logits among {[v.name for v in others]}; "
        "name it 'logits'"
    )


def _describe_inputs(graph: ir.Graph) -> str:
    parts = []
    for value in graph.inputs[:12]:
        dtype = value.dtype.name if value.dtype is not None else "?"
        shape = _dims(value) if value.shape is not None else "?"
        parts.append(f"{value.name} {dtype}{shape}")
    more = "" if len(graph.inputs) <= 12 else f" (+{len(graph.inputs) - 12} more)"
    return ", ".join(parts) + more


def find_kv_cache(model: ir.Model) -> KVGraph:
    """Structural discovery of the KV cache. Raises UnsupportedModelError if there is none."""
    graph = model.graph
    found, orphans = _find_entries(graph)
    if orphans:
        raise UnsupportedModelError(
            f"input {orphans[0]!r} is appended to like a KV cache but no graph output carries "
            "the updated cache; expected a 'present' output for every past input (re-export "
            "with use_cache=True / present outputs)"
        )
    if not found:
        raise UnsupportedModelError(
            "no KV cache found: expected float past-cache inputs (e.g. past_key_values.0.key) "
            "that a Concat or an attention op turns into present-cache graph outputs; "
            f"this model's inputs are: {_describe_inputs(graph)}"
        )
    tensors: list[KVTensor] = []
    for layer, blocks in enumerate(_layers(found, graph)):
        per_head = len(blocks) > 1 or all(len(e.past.shape) == 3 for e in blocks[0])
        for head, block in enumerate(blocks):
            for entry in block:
                tensors.append(_tensor(entry, layer, head if per_head else None))
    tensors.sort(key=lambda t: (t.layer, t.kind != "key", t.head or 0))
    _check_layers_complete(tensors)
    kv_in = {t.past_input for t in tensors}
    kv_out = {t.present_output for t in tensors}
    return KVGraph(tuple(tensors), _model_inputs(graph, kv_in), _logits_output(graph, kv_out))


def _check_layers_complete(tensors: list[KVTensor]) -> None:
    for layer in sorted({t.layer for t in tensors}):
        kinds = {t.kind for t in tensors if t.layer == layer}
        if kinds != {"key", "value"}:
            names = [t.past_input for t in tensors if t.layer == layer]
            missing = ({"key", "value"} - kinds).pop()
            raise UnsupportedModelError(
                f"layer {layer} ({', '.join(names)}) has no {missing} cache: kvcompile found "
                "only one side of its attention; describe the cache with --kv-map"
            )


# --- the --kv-map override -------------------------------------------------------------------

_LAYOUT_LETTERS = {"b": "batch", "h": "heads", "s": "seq", "d": "head_dim"}


def _axes_from_layout(layout: str, where: str) -> KVAxes:
    letters = layout.lower()
    if sorted(letters) not in (sorted("bhsd"), sorted("bsd")):
        raise BadInputError(f"{where}: layout {layout!r} must be a permutation of 'bhsd' or 'bsd'")
    pos = {letter: i for i, letter in enumerate(letters)}
    return KVAxes(batch=pos["b"], heads=pos.get("h"), seq=pos["s"], head_dim=pos["d"])


def load_kv_map(model: ir.Model, path: Path) -> KVGraph:
    """Build the KVGraph from a user's JSON map instead of discovery.

    Format: {"layers": [{"key": {"past": NAME, "present": NAME, "layout": "bhsd"},
                         "value": {...}}, ...]}; layout defaults to "bhsd".
    """
    try:
        spec = json.loads(Path(path).read_text())
        layers = spec["layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"--kv-map {str(path)!r} is not a valid map ({exc}); see README 'kv-map'") from None
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    tensors = []
    for layer, entry in enumerate(layers):
        for kind in ("key", "value"):
            where = f"--kv-map layer {layer} {kind}"
            item = entry.get(kind) if isinstance(entry, dict) else None
            if not isinstance(item, dict) or "past" not in item or "present" not in item:
                raise BadInputError(f"{where}: needs 'past' and 'present' names")
            past, present = inputs.get(item["past"]), outputs.get(item["present"])
            if past is None:
                raise BadInputError(f"{where}: the model has no input {item['past']!r}")
            if present is None:
                raise BadInputError(f"{where}: the model has no output {item['present']!r}")
            axes = _axes_from_layout(item.get("layout", "bhsd"), where)
            if len(past.shape) != (4 if axes.heads is not None else 3):
                raise BadInputError(f"{where}: layout {item.get('layout', 'bhsd')!r} does not match "
                                    f"the rank of {past.name!r} ({len(past.shape)})")
            if past.dtype not in FLOAT_TYPES:
                raise UnsupportedModelError(f"{where}: {past.name!r} is {past.dtype.name}, not float32/float16")
            num_heads = 1 if axes.heads is None else _static_dim(past, axes.heads, "heads")
            head_dim = _static_dim(past, axes.head_dim, "head_dim")
            concat = next((u.node for u in past.uses() if u.node.op_type == "Concat"), None)
            new_entries = None
            if concat is not None:
                others = [v for v in concat.inputs if v is not None and v is not past]
                new_entries = others[0] if len(others) == 1 else None
            chain, projection, rope = _producer_chain(new_entries)
            tensors.append(KVTensor(
                layer=layer, kind=kind, past_input=past.name, present_output=present.name,
                axes=axes,
                num_heads=num_heads,
                head_dim=head_dim,
                dtype=FLOAT_TYPES[past.dtype],
                attention=DECOMPOSED if concat is not None else "unknown",
                past_shape=_normalized_shape(past, axes, num_heads, head_dim),
                concat_node=concat.name if concat is not None else None,
                new_entries=new_entries.name if new_entries is not None else None,
                producer_chain=chain, projection=projection, rope=rope,
            ))
    if not tensors:
        raise BadInputError(f"--kv-map {str(path)!r} lists no layers")
    kv_in = {t.past_input for t in tensors}
    kv_out = {t.present_output for t in tensors}
    return KVGraph(tuple(tensors), _model_inputs(graph, kv_in), _logits_output(graph, kv_out), source="kv-map")
