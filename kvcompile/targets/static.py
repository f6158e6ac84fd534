"""What every static-shape (NPU) target shares: what its cache holds, the decode graph, its I/O.

- `STATIC_CAPABILITIES`: 4-bit static symmetric scales for every cache tensor (tensors the main
  plan stores otherwise are re-planned per-channel by `targets.base.legalize`; the notes say
  which), keys centered, and the plan's float sink and recent slots.
- `static_graph`: the float decode graph for a fixed context (StaticDecodePass) with the 4-bit
  cache boundary in slot mode, spelled for the target, always two 4-bit codes per byte: fixed-
  point arithmetic on exact grids with per-channel scales folded into the attention (QNN's HTP),
  or float arithmetic (NNAPI, TFLite). Key centers are taken out of the new keys before the cache (a shift in
  TransformKVPass: exact, softmax ignores the per-query constant q.c), so the cache boundary
  sees keys already centered. With float slots in the plan, `sinks + recent` of the buffer's
  positions are the runner's float16 copies of the first and newest tokens instead of codes
  (QuantizeKVBoundaryPass, `float_positions`).
- `static_target_io`: its manifest entry (inputs incl. `attention_bias`, fixed max_context).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.version_converter
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph
from kvcompile.manifest import (KVIO, ModelInputIO, RunOptions, StoredParam, TargetIO, float_model_io, float_slots_name,
                                new_float_name)
from kvcompile.model_io import load_model
from kvcompile.passes.quantize_kv_boundary import QuantizeKVBoundaryPass
from kvcompile.passes.manager import cleaned_up, run_passes
from kvcompile.passes.static_decode import BIAS_INPUT, static_decode_passes
from kvcompile.passes.transform_kv import KVTransform, transform_passes
from kvcompile.plan import QuantPlan, stored_kvio
from kvcompile.runtimes.kvcache import StaticCache
from kvcompile.targets.base import Capabilities

# What every static graph's cache holds: 4-bit codes with static symmetric scales, one buffer.
STATIC_CAPABILITIES = Capabilities(bits=(4,), float_tensors=False, dynamic_scales=False, asymmetric=False,
                                   dynamic_shapes=False, needs_calibration=True, float_slots=True,
                                   centers_every_key=True)
STATIC_SINKS = 4  # slots the runner keeps at the front when the fixed buffer slides
VERIFY_PREFILL = 8  # the static graphs take one token per call: a short prefill keeps verification quick
VERIFY_WINDOWS = 2  # held-out windows of the full context (one token per call, batch 1: slow) ...
VERIFY_MIN_TOKENS = 512  # ... and at least this many tokens where the context is short


def check_static(target: str, kv: KVGraph) -> None:
    """The static graphs are built from decomposed attention (MatMul/Softmax), where the bias
    replaces the exporter's mask: refuse an attention op before calibrating for nothing."""
    others = [form for form in kv.attention_forms if form != DECOMPOSED]
    if others:
        raise UnsupportedModelError(
            f"--target {target} builds its static graph from decomposed attention (MatMul/Softmax); this model's "
            f"cache is read by {', '.join(others)}. Export with decomposed attention (torch.onnx / optimum) for "
            f"{target}, or drop --target {target}")


def norms_in_their_input_type(model: ir.Model) -> None:
    """Matches a fused RMSNorm (SimplifiedLayerNormalization) that reads float16 and has a float32
    scale and output (Gemma3's float16 export computes its 1 + weight scale in float32); casts
    the scale to float16, makes the norm output float16 and casts that back to float32 for its
    readers. The QNN EP takes no norm whose input and scale types differ (it left Gemma3's to the
    CPU and qnn-htp refused the graph); the HTP computes in float16 in either form, and the CPU
    norm accumulates in float32 (stash_type) in both."""
    graph = model.graph
    for node in [n for n in graph if n.op_type == "SimplifiedLayerNormalization" and len(n.inputs) > 1]:
        value, scale, output = node.inputs[0], node.inputs[1], node.outputs[0]
        if not (value.dtype == ir.DataType.FLOAT16 and scale.dtype == output.dtype == ir.DataType.FLOAT) or \
                output.is_graph_output():
            continue
        uses = list(output.uses())
        scale16 = ir.Node("", "Cast", [scale], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT16)],
                          name=f"{node.name}/scale_f16", num_outputs=1)
        scale16.outputs[0].name, scale16.outputs[0].dtype = f"{node.name}/scale_f16_out", ir.DataType.FLOAT16
        scale16.outputs[0].shape = scale.shape
        back = ir.Node("", "Cast", [output], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                       name=f"{node.name}/to_f32", num_outputs=1)
        back.outputs[0].name, back.outputs[0].dtype = f"{node.name}/to_f32_out", ir.DataType.FLOAT
        back.outputs[0].shape = output.shape
        output.dtype = ir.DataType.FLOAT16
        graph.insert_before(node, scale16)
        graph.insert_after(node, back)
        node.replace_input_with(1, scale16.outputs[0])
        for use in uses:
            use.node.replace_input_with(use.idx, back.outputs[0])


def flatten_rank4_norms(model: ir.Model) -> None:
    """Matches every fused RMSNorm (SimplifiedLayerNormalization) whose input has four static
    dimensions (the per-head query and key norms of Qwen3 and Gemma3: [batch, tokens, heads,
    head_dim]) and puts a Reshape to [rows, head_dim] before it and one back after it. The HTP
    computes this norm wrongly over a rank-4 input with more than one token and head (on the
    simulator, [1, 128, 4, 16] gave NaN rows, while [1, 1, 4, 16] and [512, 16] are right to a
    cosine of 0.9999997), so a prefill call disagreed with the CPU EP (README, qnn-htp over the
    corpus families); the norm is over the last axis, so the flattened form computes the same."""
    graph = model.graph
    for node in [n for n in graph if n.op_type == "SimplifiedLayerNormalization"]:
        value, output = node.inputs[0], node.outputs[0]
        shape = value.shape
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
            continue
        dims = [int(d) for d in shape]
        rows = [int(np.prod(dims[:-1])), dims[-1]]
        flat_shape = ir.Value(name=f"{node.name}/rows_shape", const_value=ir.tensor(np.array(rows, np.int64)))
        back_shape = ir.Value(name=f"{node.name}/shape", const_value=ir.tensor(np.array(dims, np.int64)))
        graph.register_initializer(flat_shape)
        graph.register_initializer(back_shape)
        uses = list(output.uses())
        flatten = ir.Node("", "Reshape", [value, flat_shape], name=f"{node.name}/rows", num_outputs=1)
        restore = ir.Node("", "Reshape", [output, back_shape], name=f"{node.name}/restore", num_outputs=1)
        flatten.outputs[0].name, restore.outputs[0].name = f"{node.name}/rows_out", f"{node.name}/restored"
        # the norm may output another type than it reads (Gemma3's float16 export: float32 in, float16 out)
        for new, new_dims, dtype in ((flatten.outputs[0], rows, value.dtype),
                                     (restore.outputs[0], dims, output.dtype or value.dtype)):
            new.dtype, new.shape = dtype, ir.Shape(new_dims)
        output.shape = ir.Shape(rows)
        graph.insert_before(node, flatten)
        graph.insert_after(node, restore)
        node.replace_input_with(0, flatten.outputs[0])
        for use in uses:
            use.node.replace_input_with(use.idx, restore.outputs[0])


def static_graph(float_path, kv: KVGraph, plan: QuantPlan, context: int, *, style: str,
                 fold_per_channel: bool, fuse_rmsnorm: bool, opset: int, new_tokens: int = 1,
                 fuse_gelu: bool = False) -> tuple[ir.Model, QuantPlan]:
    """The float static graph taking `new_tokens` per call (1: decode, more: prefill) with the
    4-bit cache boundary; returns it and the plan it stores (centers taken out in the graph,
    per-channel scales turned into per-tensor ones when folded). `fuse_gelu`: the exact GELU
    (0.5 x (1 + erf(x / sqrt 2)), as GPT-NeoX and Falcon export it) becomes one Gelu op
    (onnxscript's fusion): the QNN EP has no Erf, and refused such models whole."""
    model = load_model(float_path)
    transforms, tensors = {}, []
    for tensor_plan_ in plan.tensors:
        shift, diagonal = tensor_plan_.center, None
        if fold_per_channel and tensor_plan_.granularity == "per-channel":
            diagonal = KVTransform.scaling(tensor_plan_.scale).diagonal
            tensor_plan_ = dataclasses.replace(tensor_plan_, granularity="per-tensor", scale=np.ones((1, 1), np.float32))
        if shift is not None or diagonal is not None:
            transforms[tensor_plan_.past_input] = KVTransform(diagonal=diagonal, shift=shift)
        tensors.append(dataclasses.replace(tensor_plan_, center=None))
    stored = dataclasses.replace(plan, tensors=tuple(tensors))
    if transforms:
        run_passes(model, *transform_passes(kv, transforms))
    run_passes(model, *static_decode_passes(kv, context, new_tokens),
               QuantizeKVBoundaryPass(kv, stored.codecs(kv), slot_outputs=True, style=style,
                                      float_positions=float_positions(plan)),
               *cleaned_up())
    onnxscript.version_converter.convert_version(model, opset)
    if fuse_rmsnorm:
        fuse_rms_normalization(model)
        norms_in_their_input_type(model)
        flatten_rank4_norms(model)
    if fuse_gelu:
        fuse_erfgelu(model)
    return model, stored


def static_float_slots(plan: QuantPlan) -> tuple[int, int] | None:
    """The plan's (sinks, recent) float slots: a static graph has the same on every cache tensor,
    or none (`targets.base.legalize`)."""
    slots = {t.float_slots for t in plan.tensors}
    if len(slots) != 1:
        raise ValueError("a static graph takes float slots on every cache tensor or on none")
    return slots.pop()


def float_positions(plan: QuantPlan) -> int:
    """Positions of each static buffer held in float: the plan's sinks + recent."""
    slots = static_float_slots(plan)
    return 0 if slots is None else sum(slots)


def static_target_io(kv: KVGraph, plan: QuantPlan, model: ir.Model, model_path: str, context: int) -> TargetIO:
    float_io = float_model_io(kv, model_path)
    inputs = {v.name: v for v in model.graph.inputs}
    roles = [dataclasses.replace(i, dtype=inputs[i.name].dtype.name.lower()) for i in float_io.inputs if i.name in inputs]
    # the bias has the cache's type (StaticDecodePass): float16 for a float16 export
    roles.append(ModelInputIO(BIAS_INPUT, "attention_bias", inputs[BIAS_INPUT].dtype.name.lower()))
    slots = static_float_slots(plan)
    codes_only = dataclasses.replace(plan, tensors=tuple(dataclasses.replace(t, float_slots=None)
                                                         for t in plan.tensors))
    kv_io = [stored_kvio(k, codes_only) for k in float_io.kv]
    if slots is not None:
        kv_io = [dataclasses.replace(k, params=[*k.params, _float_slots_param(k, sum(slots))]) for k in kv_io]
    return dataclasses.replace(float_io, inputs=roles, kv=kv_io, max_context=context,
                               options=RunOptions(attention_sinks=STATIC_SINKS,
                                                  float_slots=None if slots is None else list(slots)))


def _float_slots_param(kv_io: KVIO, positions: int) -> StoredParam:
    """A static cache tensor's float positions: the runner's float16 copies of its sink and newest
    tokens (input), and the new token's entries in float16 it writes there (output)."""
    shape = [1 if d == "batch" else d for d in kv_io.logical_shape]
    shape[kv_io.seq_axis] = positions
    return StoredParam("float_slots", float_slots_name(kv_io.input), new_float_name(kv_io.output), "float16", shape)


def static_cache_bytes(io: TargetIO) -> int:
    """Bytes of the fixed cache buffers a runner allocates for one sequence (codes as stored, float
    slots, the codes waiting in the float ring)."""
    return StaticCache(io, 1, sinks=STATIC_SINKS).nbytes()


def long_verification_windows(eval_windows: np.ndarray, context: int) -> np.ndarray:
    """Windows as long as the static buffer holds (at most the held-out windows' length), at least
    `VERIFY_WINDOWS` of them and `VERIFY_MIN_TOKENS` tokens: the gate must see the 4-bit buffer
    read at the context the model runs at, and past the float slots, which would otherwise hold
    every token of a short window."""
    width = min(eval_windows.shape[1], context)
    count = max(VERIFY_WINDOWS, -(-VERIFY_MIN_TOKENS // width))
    tokens = eval_windows.reshape(-1)
    return tokens[: min(count, tokens.size // width) * width].reshape(-1, width)


def verification_windows(eval_windows: np.ndarray, count: int, length: int, context: int) -> np.ndarray:
    """`count` x `length` held-out tokens, re-cut into windows that fit the static buffer.

    A window longer than `context` would make the static decoder slide its cache while the float
    reference keeps every token, so the gate would measure the window, not the quantization. The
    same tokens are kept, cut into windows of at most `context`.
    """
    tokens = eval_windows[:count, :length].reshape(-1)
    width = min(length, context)
    return tokens[: tokens.size // width * width].reshape(-1, width)
