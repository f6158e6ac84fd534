"""What every static-shape (NPU) target shares: the plan they can hold, the decode graph, its I/O.

- `static_plan`: 4-bit static symmetric scales for every cache tensor (tensors the main plan
  stores with per-token scales are re-planned per-channel; the notes say which).
- `static_graph`: the float decode graph for a fixed context (StaticDecodePass) with the 4-bit
  cache boundary in slot mode, spelled for the target: Q/DQ ops with one code per byte and
  per-channel scales folded into the attention (QNN), or float arithmetic with two codes per
  byte (NNAPI, TFLite).
- `static_target_io`: its manifest entry (inputs incl. `attention_bias`, fixed max_context).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.version_converter
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import ModelInputIO, TargetIO, float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.quantize_kv_boundary import QuantizeKVBoundaryPass
from kvcompile.passes.static_decode import BIAS_INPUT, StaticDecodePass
from kvcompile.passes.transform_kv import KVTransform, TransformKVPass
from kvcompile.plan import QuantPlan, stored_kvio, tensor_plan
from kvcompile.runtimes.calibrate import KVStats


def static_plan(kv: KVGraph, stats: KVStats, plan: QuantPlan) -> tuple[QuantPlan, list[str]]:
    """The plan static-shape targets hold: 4-bit static symmetric scales."""
    notes, tensors = [], []
    for tensor in kv.tensors:
        chosen = plan.for_input(tensor.past_input)
        if chosen.bits != 4 or chosen.dynamic or not chosen.symmetric:
            notes.append(f"{tensor.label}: {chosen.name} -> 4-bit per-channel (static-shape targets take static scales)")
            chosen = tensor_plan(tensor, stats, 4, "per-channel", plan.clip)
        tensors.append(chosen)
    return dataclasses.replace(plan, tensors=tuple(tensors)), notes


def static_graph(float_path, kv: KVGraph, plan: QuantPlan, context: int, *, style: str, packed: bool,
                 fold_per_channel: bool, fuse_rmsnorm: bool, opset: int) -> tuple[ir.Model, QuantPlan]:
    """The float static decode graph with the 4-bit cache boundary; returns it and the plan it
    stores (per-channel scales turned into per-tensor ones when folded)."""
    model = load_model(float_path)
    if fold_per_channel:
        transforms, tensors = {}, []
        for tensor_plan_ in plan.tensors:
            if tensor_plan_.granularity == "per-channel":
                transforms[tensor_plan_.past_input] = KVTransform.scaling(tensor_plan_.scale)
                tensor_plan_ = dataclasses.replace(tensor_plan_, granularity="per-tensor",
                                                   scale=np.ones((1, 1), np.float32))
            tensors.append(tensor_plan_)
        plan = dataclasses.replace(plan, tensors=tuple(tensors))
        TransformKVPass(kv, transforms)(model)
    StaticDecodePass(kv, context)(model)
    QuantizeKVBoundaryPass(kv, plan.codecs(kv, packed=packed), slot_outputs=True, style=style)(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    onnxscript.version_converter.convert_version(model, opset)
    if fuse_rmsnorm:
        fuse_rms_normalization(model)
    return model, plan


def static_target_io(kv: KVGraph, plan: QuantPlan, model: ir.Model, model_path: str, context: int,
                     packed: bool) -> TargetIO:
    float_io = float_model_io(kv, model_path)
    inputs = {v.name: v for v in model.graph.inputs}
    roles = [dataclasses.replace(i, dtype=inputs[i.name].dtype.name.lower()) for i in float_io.inputs if i.name in inputs]
    roles.append(ModelInputIO(BIAS_INPUT, "attention_bias", "float32"))
    return dataclasses.replace(float_io, inputs=roles, kv=[stored_kvio(k, plan, packed=packed) for k in float_io.kv],
                               max_context=context, options={"attention_sinks": 4})


def verification_windows(eval_windows: np.ndarray, count: int, length: int, context: int) -> np.ndarray:
    """`count` x `length` held-out tokens, re-cut into windows that fit the static buffer.

    A window longer than `context` would make the static decoder slide its cache while the float
    reference keeps every token, so the gate would measure the window, not the quantization. The
    same tokens are kept, cut into windows of at most `context`.
    """
    tokens = eval_windows[:count, :length].reshape(-1)
    width = min(length, context)
    return tokens[: tokens.size // width * width].reshape(-1, width)
