"""Rewrite: the NPU graphs: N new tokens (1: decode, N > 1: prefill), a fixed-size cache buffer,
an attention bias.

What it matches
  A decoder with decomposed attention (as found by the analysis): per layer the Concat that
  grows each cache, the Q.K^T MatMul and the path from it to the Softmax, where the exporter adds
  its attention mask.

What it rewrites
  - every cache input gets a fixed length of `context - 1` slots (batch 1), whatever N is, so
    the decode graph (AR-1) and the prefill graph (AR-N) read the same buffer; `input_ids` and
    `position_ids` become [1, N]: N tokens per call, at their true positions (RoPE);
  - a new input `attention_bias` [1, 1, N, context - 1 + N] replaces the exporter's mask on
    every layer's score path: for each new token, 0 for the filled slots, for itself and the new
    tokens before it (causal), a large negative value elsewhere (exports with one cache per head
    have rank-3 scores [batch, query, seq]: they read it squeezed to [1, N, context - 1 + N]).
    The exporter's mask
    computation (from `attention_mask` and sequence lengths) becomes dead and is removed, and
    so is `attention_mask`;
  - with every shape fixed, the optimizer folds the shape arithmetic into constants, and any
    computation on weights alone (a transposed tied embedding) into new weights.
  The caches still grow by Concat here (past slots + the new tokens); the boundary rewrite in
  slot mode then outputs only the new tokens' entries, which the runner writes into its buffer.

Why
  NPUs compile a graph for fixed shapes ahead of time: the cache cannot grow. A fixed buffer
  with a bias marking the used slots is the form Qualcomm's and Android's LLM runtimes use (a
  prompt goes through the AR-N graph N tokens a call, generation through AR-1); the
  runner decides where each new entry goes (in order, then a sliding window).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.optimizer

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph, KVTensor
from kvcompile.passes.conditions import require_cache_inputs
from kvcompile.passes.find_kv_cache import cache_nodes
from kvcompile.passes.score_path import refuse_other_ops, score_path
from kvcompile.passes.names import NameAllocator

BIAS_INPUT = "attention_bias"
# What may sit between Q.K^T and the Softmax for the bias to replace the exporter's mask.
_BIAS_PATH_OPS = frozenset({"Mul", "Div", "Add", "Where", "Cast", "Identity", "Sub"})


def _score_path_adds(matmul: ir.Node) -> tuple[list[tuple[ir.Node, int]], ir.Node]:
    """(Add node, index of its mask operand) on the way from Q.K^T to its Softmax, and the Softmax."""
    path = score_path(matmul)
    if path is None:
        raise UnsupportedModelError("no Softmax after Q.K^T: cannot place the attention bias")
    refuse_other_ops(path, _BIAS_PATH_OPS, "the static graph's attention bias")
    adds = []
    for node, index in reversed(path.between()):
        if node.op_type == "Where":
            raise UnsupportedModelError("the mask is applied with Where; the static graph needs an additive mask")
        if node.op_type == "Add":
            adds.append((node, 1 - index))
    return adds, path.softmax


def _reader(graph: ir.Graph, tensor: KVTensor) -> ir.Node:
    reader = cache_nodes(graph, tensor).reader
    if reader is None:
        raise UnsupportedModelError(f"{tensor.label}: no Q.K^T MatMul reads the cache: cannot place the attention bias")
    return reader


class StaticDecodePass(ir.passes.InPlacePass):
    def __init__(self, kv: KVGraph, context: int, new_tokens: int = 1):
        super().__init__()
        if context < 2:
            raise UnsupportedModelError("--max-context must be at least 2")
        if not 1 <= new_tokens < context:
            raise UnsupportedModelError(f"the prefill length ({new_tokens}) must be between 1 and --max-context - 1")
        self.kv = kv
        self.context = context
        self.new_tokens = new_tokens

    def requires(self, model: ir.Model) -> None:
        if set(self.kv.attention_forms) != {DECOMPOSED}:
            raise UnsupportedModelError(
                "the static NPU graph is built from decomposed attention; this model's cache is read by "
                f"{', '.join(self.kv.attention_forms)}")
        require_cache_inputs(model, self.kv.tensors)

    def ensures(self, model: ir.Model) -> None:
        """Every graph input has a fixed shape, the attention bias among them."""
        for value in model.graph.inputs:
            assert value.shape is not None and all(isinstance(d, int) for d in value.shape.dims), value.name
        assert any(value.name == BIAS_INPUT for value in model.graph.inputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        float_dtype = next(v for v in graph.inputs if v.name == self.kv.tensors[0].past_input).dtype
        bias = ir.Value(name=BIAS_INPUT, type=ir.TensorType(float_dtype),
                        shape=ir.Shape([1, 1, self.new_tokens, self.context - 1 + self.new_tokens]))
        graph.inputs.append(bias)
        squeezed = None  # the bias for rank-3 scores (one cache per head: [batch, seq, head_dim])
        for tensor in self.kv.tensors:
            if tensor.kind != "key":
                continue
            reader = _reader(graph, tensor)
            adds, softmax = _score_path_adds(reader)
            tensor_bias = bias
            if tensor.rank == 3:
                if squeezed is None:
                    squeeze = ir.Node("", "Squeeze", [bias, ir.Value(name=names.name("kvcompile/bias_axes"))],
                                      num_outputs=1, name=names.name("kvcompile/attention_bias_rank3"))
                    axes = squeeze.inputs[1]
                    axes.const_value = ir.tensor(np.array([0], np.int64), name=axes.name)
                    graph.register_initializer(axes)
                    graph.insert_before(reader, squeeze)
                    squeezed = squeeze.outputs[0]
                tensor_bias = squeezed
            if adds:
                for add, mask_index in adds:
                    add.replace_input_with(mask_index, tensor_bias)
            else:
                added = ir.Node("", "Add", [softmax.inputs[0], tensor_bias], num_outputs=1,
                                name=names.name(f"kvcompile/{tensor.label}/attention_bias"))
                graph.insert_before(softmax, added)
                softmax.replace_input_with(0, added.outputs[0])
        self._fix_shapes(graph)
        return ir.passes.PassResult(model, modified=True)

    def _fix_shapes(self, graph: ir.Graph) -> None:
        caches = {t.past_input: t for t in self.kv.tensors}
        for value in graph.inputs:
            if value.name in caches:
                tensor = caches[value.name]
                dims = [1 if d == "batch" else self.context - 1 if d == "seq" else d for d in tensor.past_shape]
                value.shape = ir.Shape(dims)
            elif value.name != BIAS_INPUT and value.shape is not None and value.shape.rank() == 2:
                value.shape = ir.Shape([1, self.new_tokens])
        for value in graph.outputs:  # let inference recompute them from the fixed inputs
            if value.shape is not None:
                value.shape = ir.Shape([d if isinstance(d, int) else None for d in value.shape.dims])


class RemoveUnusedInputsPass(ir.passes.InPlacePass):
    """Drops graph inputs nothing reads any more (the attention mask the bias replaced), except
    `keep`: a static graph's runner feeds exactly the inputs the graph has."""

    def __init__(self, keep: tuple[str, ...] = ()):
        super().__init__()
        self.keep = keep

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        unused = [v for v in model.graph.inputs if not v.uses() and v.name not in self.keep]
        for value in unused:
            model.graph.inputs.remove(value)
        return ir.passes.PassResult(model, modified=bool(unused))


class FoldWeightPreprocessingPass(ir.passes.InPlacePass):
    """onnxscript's optimizer with no size limits, so weight preprocessing (e.g. the transposed
    tied embedding an LM head reads) becomes constants: accelerators need weights as constants,
    not as activations computed at run time. `modified` is always True: the optimizer does not
    say whether it changed anything."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        onnxscript.optimizer.optimize(model, input_size_limit=1 << 30, output_size_limit=1 << 30)
        return ir.passes.PassResult(model, modified=True)


def static_decode_passes(kv: KVGraph, context: int, new_tokens: int = 1) -> list[ir.passes.PassBase]:
    """The float static graph for `context` tokens taking `new_tokens` per call: rewritten,
    unused parts removed, shapes inferred from the fixed inputs, weights folded to constants."""
    return [StaticDecodePass(kv, context, new_tokens), ir.passes.common.RemoveUnusedNodesPass(),
            RemoveUnusedInputsPass(keep=(BIAS_INPUT,)), ir.passes.common.ShapeInferencePass(),
            FoldWeightPreprocessingPass()]
