"""What every static-shape (NPU) target shares: what its cache holds, the decode graph, its I/O.

- `STATIC_CAPABILITIES`: 4-bit static symmetric scales for every cache tensor (tensors the main
  plan stores otherwise are re-planned per-channel by `targets.base.legalize`; the notes say which).
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

from kvcompile.errors import UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph
from kvcompile.manifest import ModelInputIO, RunOptions, TargetIO, float_model_io
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
                                   dynamic_shapes=False, needs_calibration=True)
STATIC_SINKS = 4  # slots the runner keeps at the front when the fixed buffer slides
VERIFY_PREFILL = 8  # the static graphs take one token per call: a short prefill keeps verification quick


def check_static(target: str, kv: KVGraph) -> None:
    """The static graphs are built from decomposed attention (MatMul/Softmax), where the bias
    replaces the exporter's mask: refuse an attention op before calibrating for nothing."""
    others = [form for form in kv.attention_forms if form != DECOMPOSED]
    if others:
        raise UnsupportedModelError(
            f"--target {target} builds its static graph from decomposed attention (MatMul/Softmax); this model's "
            f"cache is read by {', '.join(others)}. Export with decomposed attention (torch.onnx / optimum) for "
            f"{target}, or drop --target {target}")


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
        run_passes(model, *transform_passes(kv, transforms))
    run_passes(model, *static_decode_passes(kv, context),
               QuantizeKVBoundaryPass(kv, plan.codecs(kv, packed=packed), slot_outputs=True, style=style),
               *cleaned_up())
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
                               max_context=context, options=RunOptions(attention_sinks=STATIC_SINKS))


def static_cache_bytes(io: TargetIO) -> int:
    """Bytes of the fixed cache buffers a runner allocates for one sequence (codes as stored)."""
    return sum(t.nbytes for t in StaticCache(io, 1, sinks=STATIC_SINKS).tensors.values())


def verification_windows(eval_windows: np.ndarray, count: int, length: int, context: int) -> np.ndarray:
    """`count` x `length` held-out tokens, re-cut into windows that fit the static buffer.

    A window longer than `context` would make the static decoder slide its cache while the float
    reference keeps every token, so the gate would measure the window, not the quantization. The
    same tokens are kept, cut into windows of at most `context`.
    """
    tokens = eval_windows[:count, :length].reshape(-1)
    width = min(length, context)
    return tokens[: tokens.size // width * width].reshape(-1, width)
