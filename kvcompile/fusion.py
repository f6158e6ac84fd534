"""`--fuse-attention auto|on|off`: whether decomposed attention becomes GroupQueryAttention.

A model whose attention is decomposed (MatMul/Softmax) can keep it and get the Q/DQ boundary,
or be fused into onnxruntime's GroupQueryAttention, whose CPU kernel keeps the cache in 4 bits
and dequantizes inside attention (passes.fuse_gqa, passes.quantize_gqa). Under `auto` it is
fused whenever that is possible: the pattern matches (one K and V cache per layer, [batch, heads,
seq, head_dim]), the scheme has static scales (the kernel takes no per-token scales), and the
fused float model reproduces the original's logits on real tokens at every position up to
`CHECK_CONTEXT` tokens (or the model's limit), and past its attention window if it has one: the
fused kernel's causal mask replaces the model's, so a sliding window or any other mask the
model applies shows up as a difference there.

Why not "when measured faster" at every compile: the decision would then depend on the machine's
speed at that moment, and the same input and flags must give the same artifact. The fused form
reads 4-bit codes where the Q/DQ form first expands the whole cache to float at every step, so it
is the faster one by construction; `make bench` measures both at 256-4096 tokens, and every
compile still times one decode step of both at `REFERENCE_CONTEXT` tokens (round-robin,
medians) and reports it next to its timings, with a warning should the fused form ever lose.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.errors import BadInputError, UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph
from kvcompile.limits import ModelLimits
from kvcompile.manifest import float_model_io
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.fuse_gqa import fuse_attention_passes
from kvcompile.passes.manager import run_passes
from kvcompile.plan import PlanOptions, QuantPlan, TensorPlan
from kvcompile.quant import symmetric_zero_point
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.latency import compare_decode_latency
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.weights import WeightPool

MODES = ("auto", "on", "off")
REFERENCE_CONTEXT = 1024  # the decode step timed for the report
CHECK_CONTEXT = 1024  # positions the fused float model is compared at (more if the model has a longer window)
CHECK_CHUNK = 64  # tokens fed per step of the check (the cache grows chunk by chunk, then single tokens);
# a chunk's logits are 12.6 MB for SmolLM2 (256 tokens: 50 MB, held about four times in the check)
CHECK_DECODE_STEPS = 8
# Max |logit difference| relative to the largest logit, by cache dtype: float16 models differ by
# ~1e-3 of the largest logit over 30 layers from rounding alone (SmolLM2), a mask the kernel
# drops by far more (a 64-token sliding window: 0.61).
FLOAT_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}
DYNAMIC_SCHEMES = ("per-token", "per-group", "kivi")


@dataclass
class FusionDecision:
    fused: bool
    reason: str
    model: ir.Model | None = None  # the fused float model
    kv: KVGraph | None = None
    path: Path | None = None
    latency_ms: dict[str, float] | None = None  # measured: varies from run to run
    latency_context: int = REFERENCE_CONTEXT

    def report(self) -> dict:
        return {"fused": self.fused, "reason": self.reason}

    def timings(self) -> dict:
        if self.latency_ms is None:
            return {}
        timings = {f"decode_step_ms_at_{self.latency_context}_tokens": self.latency_ms}
        if self.latency_ms["fused"] >= self.latency_ms["q/dq"]:
            timings["warning"] = "the fused form measured slower than Q/DQ on this run"
        return {"fusion": timings}


def check_context(limits: ModelLimits, available: int) -> int:
    """Tokens the fused float model is compared over: CHECK_CONTEXT, longer than the model's
    attention window, within its context limit and the calibration tokens at hand."""
    wanted = CHECK_CONTEXT if limits.window is None else max(CHECK_CONTEXT, limits.window + CHECK_CHUNK)
    return min(limits.clamp(wanted), available)


def _float_difference(original: Decoder, fused: Decoder, tokens: np.ndarray) -> float:
    """Max |logit difference| relative to the largest logit, over every position of `tokens`
    [1, L]: chunks that grow the cache, then single decode steps. The original runs first and its
    logits wait in an unnamed temporary file, so one model's cache is held at a time (SmolLM2: a
    chunk's logits are 50 MB, its cache at 1,024 tokens 47 MB, held twice while a step runs)."""
    split = max(1, tokens.shape[1] - CHECK_DECODE_STEPS)
    chunks = [tokens[:, t : min(t + CHECK_CHUNK, split)] for t in range(0, split, CHECK_CHUNK)]
    chunks += [tokens[:, t : t + 1] for t in range(split, tokens.shape[1])]
    worst, scale = 0.0, 1.0
    with tempfile.TemporaryFile(prefix="kvcompile-fusion-check-") as stored:
        cache = original.new_cache(1)
        for chunk in chunks:
            logits, _ = original.step(cache, chunk)
            scale = max(scale, float(logits.max()), -float(logits.min()))
            stored.write(np.ascontiguousarray(logits, dtype=np.float32).tobytes())
        del cache, logits
        stored.seek(0)
        cache = fused.new_cache(1)
        for chunk in chunks:
            logits, _ = fused.step(cache, chunk)
            expected = np.frombuffer(stored.read(logits.size * 4), dtype=np.float32).reshape(logits.shape)
            difference = np.subtract(logits, expected, out=logits)
            worst = max(worst, float(np.abs(difference, out=difference).max()))
    return worst / scale


def _refuse_other_cache_readers(model: ir.Model) -> None:
    """The fused kernel keeps its cache in its own (4-bit) form: nothing else may read it."""
    for node in model.graph:
        if node.op_type != "GroupQueryAttention":
            continue
        for present in node.outputs[1:3]:
            readers = sorted({use.node.op_type for use in present.uses()})
            if readers:
                raise UnsupportedModelError(
                    f"the cache {present.name!r} is also read outside attention (by {', '.join(readers)}); "
                    "the fused kernel keeps it in its own 4-bit form")


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


def decide(options: PlanOptions, original: Decoder, float_path: Path, kv: KVGraph, input_ids: str,
           tokens: np.ndarray, limits: ModelLimits, work: Path, weights: WeightPool, variant_for) -> FusionDecision:
    """Try fusing the float model at `float_path` as `options.fuse_attention` asks; `original` runs
    the model as given, `tokens` (1-D) are real text for the float check, `variant_for(path, kv,
    plan)` builds 4-bit variants for the latency probe."""
    mode = options.fuse_attention
    if mode not in MODES:
        raise BadInputError(f"--fuse-attention {mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or DECOMPOSED not in kv.attention_forms:
        return FusionDecision(False, "--fuse-attention off" if mode == "off" else
                              "the attention is already an attention op (no decomposed attention to fuse)")
    try:
        reason = _unfusable_options(options.scheme, options.kv_bits, options.fold_scales)
        if reason is not None:
            raise UnsupportedModelError(reason)
        model = load_model(float_path)
        run_passes(model, *fuse_attention_passes(kv, input_ids))
        _refuse_other_cache_readers(model)
        path = work / "fused.onnx"
        ir.save(model, path)
        fused_kv = find_kv_cache(model)
        fused = Decoder(cpu_session(path, weights=weights), float_model_io(fused_kv, str(path)))
        context = check_context(limits, tokens.size)
        if limits.window is not None and context <= limits.window:
            raise UnsupportedModelError(
                f"the model's attention window is {limits.window} tokens and only {context} can be checked "
                "(model limit or calibration text): the fused attention cannot be shown to keep it")
        difference = _float_difference(original, fused, tokens[None, :context])
        del fused  # its session's memory (e.g. a folded copy of a tied lm_head) before the latency probe's
        tolerance = max(FLOAT_TOLERANCE[t.dtype] for t in kv.tensors)
        if difference > tolerance:
            raise UnsupportedModelError(
                f"the fused attention does not reproduce the model over {context} tokens (max logit difference "
                f"{difference:.2g} of the largest logit): its attention is not plain causal attention "
                "(a sliding window, soft-capping or another mask)")
    except UnsupportedModelError as exc:
        if mode == "on":
            raise UnsupportedModelError(f"--fuse-attention on: cannot fuse: {exc}") from None
        return FusionDecision(False, f"kept decomposed attention: {exc}")
    latency_context = limits.clamp(REFERENCE_CONTEXT)
    latency = compare_decode_latency({
        "q/dq": variant_for(float_path, kv, _probe_plan(kv)),
        "fused": variant_for(path, fused_kv, _probe_plan(fused_kv)),
    }, latency_context)
    latency_ms = {k: round(v * 1000, 3) for k, v in latency.items()}
    reason = (f"fused into GroupQueryAttention ({'--fuse-attention on' if mode == 'on' else 'auto'}): its "
              f"4-bit cache is read inside attention; the fused float model matched the original's "
              f"logits at every position up to {context} tokens (max difference {difference:.1g} of the "
              f"largest logit, tolerance {tolerance:g})")
    return FusionDecision(True, reason, model, fused_kv, path, latency_ms, latency_context)
