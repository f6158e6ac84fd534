"""`--fuse-attention auto|on|off`: whether decomposed attention becomes GroupQueryAttention.

A model whose attention is decomposed (MatMul/Softmax) can keep it and get the Q/DQ boundary,
or be fused into onnxruntime's GroupQueryAttention, whose CPU kernel keeps the cache in 4 bits
and dequantizes inside attention (passes.fuse_gqa, passes.quantize_gqa). Under `auto` it is
fused whenever that is possible: the pattern matches (one K and V cache per layer, [batch, heads,
seq, head_dim]), the scheme has static scales (the kernel takes no per-token scales), and the
fused float model reproduces the original's logits on real tokens.

Why not "when measured faster" at every compile: the decision would then depend on the machine's
speed at that moment, and the same input and flags must give the same artifact. The fused form
reads 4-bit codes where the Q/DQ form first expands the whole cache to float at every step, so it
is the faster one by construction; `make bench` measures both at 256-4096 tokens, and every
compile still times one decode step of both at `REFERENCE_CONTEXT` tokens (round-robin,
medians) and reports it next to its timings, with a warning should the fused form ever lose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.errors import BadInputError, UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.fuse_gqa import FuseGroupQueryAttentionPass
from kvcompile.plan import QuantPlan, TensorPlan
from kvcompile.quant import symmetric_zero_point
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.latency import compare_decode_latency
from kvcompile.runtimes.session import cpu_session

MODES = ("auto", "on", "off")
REFERENCE_CONTEXT = 1024
FLOAT_TOLERANCE = 1e-3  # max |logit difference| between the fused and the original float model
DYNAMIC_SCHEMES = ("per-token", "per-group", "kivi")


@dataclass
class FusionDecision:
    fused: bool
    reason: str
    model: ir.Model | None = None  # the fused float model
    kv: KVGraph | None = None
    path: Path | None = None
    latency_ms: dict[str, float] | None = None  # measured: varies from run to run

    def report(self) -> dict:
        return {"fused": self.fused, "reason": self.reason}

    def timings(self) -> dict:
        if self.latency_ms is None:
            return {}
        timings = {f"decode_step_ms_at_{REFERENCE_CONTEXT}_tokens": self.latency_ms}
        if self.latency_ms["fused"] >= self.latency_ms["q/dq"]:
            timings["warning"] = "the fused form measured slower than Q/DQ on this run"
        return {"fusion": timings}


def _float_matches(original: Decoder, fused: Decoder, tokens: np.ndarray) -> float:
    """Max |logit difference| over a prefill and a few decode steps."""
    caches = original.new_cache(tokens.shape[0]), fused.new_cache(tokens.shape[0])
    worst = 0.0
    for chunk in [tokens[:, :16]] + [tokens[:, t : t + 1] for t in range(16, tokens.shape[1])]:
        a, _ = original.step(caches[0], chunk)
        b, _ = fused.step(caches[1], chunk)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def _probe_plan(kv: KVGraph) -> QuantPlan:
    """4-bit per-channel with placeholder scales: enough to time a form (values do not matter)."""
    tensors = tuple(
        TensorPlan(t.past_input, t.label, 4, "per-channel", True, np.full((t.num_heads, t.head_dim), 0.1, np.float32),
                   np.full((1, 1), symmetric_zero_point(4), np.uint8), "latency probe")
        for t in kv.tensors)
    return QuantPlan(tensors, scheme="probe", bits=4.0)


def _unfusable_options(scheme: str, bits: float, fold_scales: bool) -> str | None:
    if scheme in DYNAMIC_SCHEMES:
        return f"--scheme {scheme} needs per-token scales, which GroupQueryAttention does not take"
    if scheme != "auto" and bits != 4:
        return f"GroupQueryAttention stores 4-bit caches here, not {bits:g}-bit"
    if fold_scales:
        return "--fold-scales is for the Q/DQ form (GroupQueryAttention takes per-channel scales itself)"
    return None


def decide(mode: str, scheme: str, bits: float, fold_scales: bool, model_path: Path, float_path: Path,
           kv: KVGraph, input_ids: str, tokens: np.ndarray, work: Path, variant_for) -> FusionDecision:
    """Try fusing the float model at `float_path`; `variant_for(path, kv, plan)` builds 4-bit variants."""
    if mode not in MODES:
        raise BadInputError(f"--fuse-attention {mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or DECOMPOSED not in kv.attention_forms:
        return FusionDecision(False, "--fuse-attention off" if mode == "off" else
                              "the attention is already an attention op (no decomposed attention to fuse)")
    try:
        reason = _unfusable_options(scheme, bits, fold_scales)
        if reason is not None:
            raise UnsupportedModelError(reason)
        model = load_model(float_path)
        FuseGroupQueryAttentionPass(kv, input_ids)(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        path = work / "fused.onnx"
        ir.save(model, path)
        fused_kv = find_kv_cache(model)
        original = Decoder(cpu_session(model_path), float_model_io(kv, str(model_path)))
        fused = Decoder(cpu_session(path), float_model_io(fused_kv, str(path)))
        difference = _float_matches(original, fused, tokens)
        if difference > FLOAT_TOLERANCE:
            raise UnsupportedModelError(
                f"the fused attention does not reproduce the model (max logit difference {difference:.2g}): "
                "its attention is not plain causal attention")
    except UnsupportedModelError as exc:
        if mode == "on":
            raise UnsupportedModelError(f"--fuse-attention on: cannot fuse: {exc}") from None
        return FusionDecision(False, f"kept decomposed attention: {exc}")
    latency = compare_decode_latency({
        "q/dq": variant_for(float_path, kv, _probe_plan(kv)),
        "fused": variant_for(path, fused_kv, _probe_plan(fused_kv)),
    }, REFERENCE_CONTEXT)
    latency_ms = {k: round(v * 1000, 3) for k, v in latency.items()}
    reason = (f"fused into GroupQueryAttention ({'--fuse-attention on' if mode == 'on' else 'auto'}): its "
              f"4-bit cache is read inside attention; the fused float model matched the original's "
              f"logits within {FLOAT_TOLERANCE}")
    return FusionDecision(True, reason, model, fused_kv, path, latency_ms)
