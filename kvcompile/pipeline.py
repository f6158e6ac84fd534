"""The compile pipeline: load -> analyze -> calibrate -> plan -> rewrite -> emit -> verify.

This is the one place that strings the stages together; it reads top to bottom like the data
flow in DESIGN.md. Stages talk only through the values they return.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.version_converter

from kvcompile import __version__
from kvcompile.errors import BadInputError, KvCompileError, QualityGateError, UnsupportedModelError
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph
from kvcompile.limits import ModelLimits, read_limits
from kvcompile.manifest import Manifest, TargetIO, float_model_io
from kvcompile.model_io import (
    ORT_OPS_IN_ONNX_DOMAIN,
    check_output_dir,
    input_hash,
    load_model,
    model_files,
    staged_output_dir,
)
from kvcompile.passes.find_kv_cache import find_kv_cache, load_kv_map
from kvcompile.passes.normalize import NormalizeExportPass
from kvcompile.passes.quantize_gqa import QuantizeGQACachePass
from kvcompile.passes.transform_kv import KVTransform, TransformKVPass
from kvcompile.passes.quantize_kv_boundary import (
    QuantizeKVBoundaryPass,
)
from kvcompile.advice import gate_advice
from kvcompile.autoplan import auto_plan
from kvcompile.fusion import decide as decide_fusion
from kvcompile.plan import QuantPlan, check_options, make_plan, stored_kvio
from kvcompile.targets import nnapi, ort_cpu, qnn_htp, tflite
from kvcompile.targets.qnn_htp import QnnOptions, check_socs
from kvcompile.memory_wall import (
    DEFAULT_BUDGET,
    DEFAULT_DEVICE,
    SOC_DEVICES,
    Device,
    load_device,
    memory_wall,
    model_weights,
    parse_size,
)
from kvcompile.report import memory_figures, tensor_rows, write_report
from kvcompile.runtimes.calibrate import KVStats, collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import DecodeScore, decode_path_scores
from kvcompile.runtimes.session import ORT_ERRORS, cpu_session
from kvcompile.tokens import MIN_TEXT_WINDOWS, bundled_text, find_tokenizer, load_token_ids, make_windows

AVAILABLE_TARGETS = ("ort-cpu", "qnn-htp", "nnapi", "tflite")
MIN_OPSET = 18  # BitwiseAnd/BitwiseOr used by the packing fragments

# progress(stage description, total units) -> advance(units)
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class CompileOptions:
    model: Path
    out_dir: Path | None = None
    kv_bits: float = 4
    scheme: str = "auto"
    clip: str = "wmse"
    group_size: int = 32
    asymmetric: bool = False
    uniform: bool = False
    rotate: str | None = None  # "hadamard"
    fold_scales: bool = False
    fuse_attention: str = "auto"  # auto | on | off
    socs: tuple[str, ...] = ("SM8650",)  # qnn-htp
    max_context: int | None = None  # static-shape targets: tokens the buffer holds (None: 1024 or the model's limit)
    targets: tuple[str, ...] = ("ort-cpu",)
    calib: Path | None = None
    calib_tokens: int = 8192
    eval_text: Path | None = None
    eval_tokens: int = 12288
    tokenizer: Path | None = None
    kv_map: Path | None = None
    quality_gate_pct: float = 2.0
    no_calibration: bool = False  # dynamic scales only, no float runs: the compile is unverified
    device: str | None = None  # memory-wall report: a devices.toml key or a .toml profile
    budget: str = DEFAULT_BUDGET  # memory-wall report: RAM for the KV cache
    window: int = 256
    prefill: int = 32


@dataclass
class CompileResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        """False only when the quality gate failed (an unverified compile has not failed it)."""
        return self.report["quality"]["passed"] is not False


def default_out_dir(model: Path) -> Path:
    return Path(model).parent / f"{Path(model).stem}.kvcompiled"


def resolve_targets(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The targets to build. ort-cpu is always among them: every compile verifies it and the
    other targets are checked against the same plan."""
    targets: list[str] = ["ort-cpu"]
    for name in requested or ("ort-cpu",):
        names = AVAILABLE_TARGETS if name == "all" else (name,)
        for target in names:
            if target not in AVAILABLE_TARGETS:
                raise BadInputError(
                    f"unknown target {target!r}; choose from {', '.join(AVAILABLE_TARGETS)} or all"
                )
            if target not in targets:
                targets.append(target)
    return tuple(targets)


def normalize_export(model: ir.Model) -> bool:
    """Fold the constant computations exporters leave (in place); True if the graph changed."""
    return NormalizeExportPass()(model).modified


def analyze(model: ir.Model, kv_map: Path | None) -> KVGraph:
    return load_kv_map(model, kv_map) if kv_map is not None else find_kv_cache(model)


def refuse_unsupported_attention(model: ir.Model, kv: KVGraph) -> None:
    """A cache grown by a Concat gets the Q/DQ boundary (whatever attention reads it);
    GroupQueryAttention's cache its own quantized form; an attention op that keeps the cache
    itself (its past/present slots) is refused, and so is a GroupQueryAttention cache kept as a
    fixed ring buffer (`sliding_window_cache=1`), which the runner must own and rotate."""
    for node in model.graph:
        ring = node.attributes.get("sliding_window_cache")
        if node.op_type == "GroupQueryAttention" and ring is not None and ring.as_int() == 1:
            raise UnsupportedModelError(
                f"{node.name} keeps its cache as a fixed sliding-window ring buffer (GroupQueryAttention "
                "sliding_window_cache=1); kvcompile compiles caches that grow (or are sliced) in the graph. "
                "Export with a growing cache (torch.onnx / optimum)")
    kept = sorted({t.attention for t in kv.tensors if t.concat_node is None and t.attention != GROUP_QUERY_ATTENTION})
    if kept:
        raise UnsupportedModelError(
            f"the KV cache is kept inside {', '.join(kept)} (its past/present slots); kvcompile {__version__} "
            "rewrites caches appended by a Concat (decomposed attention, or ONNX Attention fed by a Concat) and "
            "com.microsoft.GroupQueryAttention's. Export with the cache concatenated outside the attention op "
            "(torch.onnx / optimum) or with the onnxruntime-genai builder"
        )


DEFAULT_STATIC_CONTEXT = 1024
MIN_WINDOW = 16  # the shortest evaluation window that still leaves decode steps after a prefill


def within_limits(options: CompileOptions, limits: ModelLimits, targets: tuple[str, ...]) -> CompileOptions:
    """The options with every context kept within the model's limits: calibration and evaluation
    windows, and the static targets' buffer (1024 by default, else what --max-context asks).
    An explicit --max-context beyond a limit is refused, naming the limit and where it was read."""
    window = limits.clamp(options.window)
    if window < MIN_WINDOW:
        raise UnsupportedModelError(
            f"the model takes at most {limits.max_context} tokens ({'; '.join(limits.facts)}); kvcompile calibrates "
            f"and verifies through windows of at least {MIN_WINDOW} tokens")
    static = [t for t in targets if t != "ort-cpu"]
    max_context = options.max_context
    if static:
        caps = [(limits.max_context, "the model's context limit"), (limits.window, "its attention window")]
        caps = [(value, what) for value, what in caps if value is not None]
        if max_context is None:
            max_context = min([DEFAULT_STATIC_CONTEXT] + [value for value, _ in caps])
        for value, what in caps:
            if max_context > value:
                raise BadInputError(
                    f"--max-context {max_context} is longer than {what}, {value} tokens "
                    f"({'; '.join(limits.facts)}); the static graph attends over its whole buffer: pass "
                    f"--max-context {value} or less")
    return dataclasses.replace(options, window=window, prefill=min(options.prefill, window // 4),
                               max_context=max_context)


def _input_ids_name(kv: KVGraph) -> str:
    return next(i.name for i in kv.inputs if i.role == "input_ids")


def _no_progress(_: str, __: int) -> Callable[[int], None]:
    return lambda _units: None


def _upgrade_opset(model: ir.Model) -> None:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if version >= MIN_OPSET:
        return
    # The converter logs its failures (with tracebacks) instead of raising some of them: keep
    # them off the user's terminal and judge by the opset the model has afterwards.
    converter_log = logging.getLogger("onnxscript.version_converter")
    level, converter_log.level = converter_log.level, logging.CRITICAL
    problem = "the converter left it unchanged"
    try:
        onnxscript.version_converter.convert_version(model, MIN_OPSET, fallback=True)
    except Exception as exc:  # the converters raise many kinds of errors
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        converter_log.setLevel(level)
    if model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) < MIN_OPSET:
        raise UnsupportedModelError(
            f"the model uses opset {version}; kvcompile needs opset {MIN_OPSET} and could not "
            f"convert it ({problem}); re-export with opset >= {MIN_OPSET}"
        )


# Operator domains onnxruntime's CPU build implements itself. Anything else needs a custom-op
# library, which kvcompile never loads: a model must not be able to make it run code.
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")


def check_operators(model: ir.Model) -> None:
    """Refuse, before any work, what onnxruntime could not run or kvcompile could not convert:
    ops from custom domains, unknown standard ops, and opsets outside what the installed onnx
    knows or can convert from (the upgrade itself is tried here, on the in-memory model)."""
    newest = onnx.defs.onnx_opset_version()
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if version > newest:
        raise UnsupportedModelError(f"the model declares opset {version}; the onnx {onnx.__version__} kvcompile "
                                    f"runs with knows opsets up to {newest}; re-export with opset 18 to {newest}")
    for node in model.graph.all_nodes():
        if node.domain not in KNOWN_DOMAINS:
            raise UnsupportedModelError(
                f"node {node.name or node.op_type!r} is {node.op_type} from domain {node.domain!r}, a custom op "
                "that needs its own library; kvcompile never loads code from a model. Export without custom ops")
        if (node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)
                and node.op_type not in ORT_OPS_IN_ONNX_DOMAIN):
            raise UnsupportedModelError(f"node {node.name or node.op_type!r} uses {node.op_type!r}, which is not "
                                        "an ONNX operator; re-export the model with standard ops")
    _upgrade_opset(model)


def quantize_graph(model: ir.Model, kv: KVGraph, plan: QuantPlan) -> ir.Model:
    """Apply the rewrite passes for the plan (in place) and clean up: the Q/DQ boundary for
    decomposed attention, the fused kernel's own quantized cache for GroupQueryAttention."""
    _upgrade_opset(model)
    codecs = plan.codecs(kv)
    appended = {t.past_input for t in kv.tensors if t.concat_node is not None}
    boundary = {name: c for name, c in codecs.items() if name in appended}
    fused = {name: c for name, c in codecs.items() if name not in appended}
    passes = ir.passes.PassManager([
        QuantizeKVBoundaryPass(kv, boundary),
        QuantizeGQACachePass(kv, fused),
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
    ])
    run_passes(passes, model)
    return model


def run_passes(passes: ir.passes.PassManager, model: ir.Model) -> None:
    """Run passes; a refusal inside one surfaces as the KvCompileError it is, not a PassError."""
    try:
        passes(model)
    except ir.passes.PassError as exc:
        cause = exc.__cause__
        while isinstance(cause, ir.passes.PassError):
            cause = cause.__cause__
        if isinstance(cause, KvCompileError):
            raise cause from None
        raise


def fold_scales(model: ir.Model, kv: KVGraph, plan: QuantPlan) -> QuantPlan:
    """--fold-scales: move per-channel scales into the graph (TransformKVPass) so the cache
    needs one per-tensor scale of 1.0; returns the plan as the target now stores it."""
    transforms, tensors = {}, []
    for tensor_plan in plan.tensors:
        if tensor_plan.granularity == "per-channel" and tensor_plan.bits is not None:
            transforms[tensor_plan.past_input] = KVTransform.scaling(tensor_plan.scale)
            tensor_plan = dataclasses.replace(
                tensor_plan, granularity="per-tensor", scale=np.ones((1, 1), np.float32),
                reason=tensor_plan.reason + "; per-channel scales folded into the attention "
                "(cache holds k/s, one per-tensor scale 1.0)")
        tensors.append(tensor_plan)
    TransformKVPass(kv, transforms)(model)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def _score_summary(float_score: DecodeScore, score: DecodeScore, gate: float, text: str) -> dict[str, Any]:
    delta = 100.0 * (score.ppl / float_score.ppl - 1.0)
    return {
        "float_ppl": round(float_score.ppl, 4),
        "quantized_ppl": round(score.ppl, 4),
        "ppl_delta_pct": round(delta, 4),
        "top1_agreement": round(score.top1_agreement, 5),
        "mean_kl": round(score.mean_kl, 6),
        "eval_tokens": score.tokens,
        "eval_text": text,
        "quality_gate_pct": gate,
        "passed": delta <= gate,
    }


def rotate_kv(model: ir.Model, kv: KVGraph, rotate: str) -> None:
    """--rotate hadamard: rotate every cache tensor along head_dim (in place, see TransformKVPass)."""
    if rotate != "hadamard":
        raise BadInputError(f"--rotate {rotate!r} is not supported; use hadamard")
    TransformKVPass(kv, {t.past_input: KVTransform.rotation(t) for t in kv.tensors})(model)


def stage_float_model(model: ir.Model, kv: KVGraph, rotate: str | None, work: Path, model_path: Path,
                      normalized: bool) -> Path:
    """The float model to calibrate and to build auto's variants from.

    --rotate is applied here (in place: the compiled model is built from the rotated graph).
    The input itself is used when it is self-contained, unrotated and was not changed by
    `normalize_export` (the KVGraph names its nodes); otherwise one copy is written to `work`
    with its weights in `work/float.onnx.data`, which every variant then references (onnxruntime
    refuses external data outside a model's folder, so links will not do), so that loading a
    variant reads its graph and not its weights.
    """
    if rotate is not None:
        rotate_kv(model, kv, rotate)
    if rotate is None and len(model_files(model_path)) == 1 and not normalized:
        return model_path
    path = work / "float.onnx"
    ir.save(model, path, external_data="float.onnx.data", size_threshold_bytes=1024)
    return path


def build_variant(float_path: Path, kv: KVGraph, plan: QuantPlan, work: Path, optimize: bool = False,
                  name: str = "variant.onnx") -> Decoder:
    """Compile the float model at `float_path` with `plan` into `work` and load it."""
    model = load_model(float_path, check=False)  # checked when the compile loaded its input
    quantize_graph(model, kv, plan)
    path = work / name
    ir.save(model, path)
    float_io = float_model_io(kv, str(float_path))
    io = dataclasses.replace(float_io, kv=[stored_kvio(k, plan) for k in float_io.kv])
    return Decoder(cpu_session(path, optimize=optimize), io)


class VariantBuilder:
    """Builds and loads the model compiled with a given plan, for auto's measurements.

    Variants are written to the compile's private temporary folder (next to any weights copy
    there) and loaded without graph optimizations, which only slow session creation and do not
    change results."""

    def __init__(self, model_path: Path, kv: KVGraph, work: Path):
        self.model_path = model_path
        self.kv = kv
        self.work = work

    def __call__(self, plan: QuantPlan) -> Decoder:
        return build_variant(self.model_path, self.kv, plan, self.work)


def load_input_model(model_path: Path, kv: KVGraph, tokens: np.ndarray) -> Decoder:
    """The user's model in onnxruntime, checked to load and to run a prefill and a decode step.

    Whatever onnxruntime refuses here is the input's problem (exit 2, one line), and so is a later
    failure of this decoder (it runs the model as given, e.g. at a longer context); onnxruntime
    failures on graphs kvcompile wrote are kvcompile's bugs (exit 1)."""
    try:
        decoder = Decoder(cpu_session(model_path), float_model_io(kv, str(model_path)), input_model=model_path.name)
        cache = decoder.new_cache(1)
        decoder.step(cache, tokens[None, :-1])
        logits, _ = decoder.step(cache, tokens[None, -1:])
    except ORT_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"onnxruntime cannot run {model_path.name}: {first[:400]}; check the export "
                            "(does it load and run in onnxruntime?)") from None
    if not np.isfinite(logits).all():
        raise BadInputError(f"{model_path.name} produces non-finite logits on the first calibration tokens; "
                            "check the export (float16 overflow?)")
    return decoder


def _plan(kv: KVGraph, stats: KVStats, float_decoder: Decoder, texts: _Texts, options: CompileOptions,
          float_path: Path, work: Path, progress: Progress) -> QuantPlan:
    if options.scheme == "auto":
        variant = VariantBuilder(float_path, kv, work)
        return auto_plan(kv, stats, float_decoder, variant, texts.calib_windows, options.kv_bits,
                         options.clip, options.uniform, progress)
    return make_plan(kv, stats, options.kv_bits, options.scheme, options.clip, options.group_size,
                     options.asymmetric)


def _kv_storage(plan: QuantPlan) -> str:
    """What the artifact stores, e.g. "uint8 codes packed along head_dim: 4-bit x8 (2 per byte)"."""
    counts: dict[str, int] = {}
    for t in plan.tensors:
        if t.bits is None:
            key = "float"
        else:
            per_byte = 8 // t.bits
            key = f"{t.bits}-bit" + (f" ({per_byte} per byte)" if per_byte > 1 else "")
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
    dynamic = sum(t.dynamic for t in plan.tensors)
    extra = f"; float16 per-token scales next to {dynamic} tensor(s)" if dynamic else ""
    return f"uint8 codes packed along head_dim: {parts}{extra}"


@dataclass(frozen=True)
class _Texts:
    calib_windows: np.ndarray
    eval_windows: np.ndarray
    calib_name: str
    eval_name: str


def vocab_size(model: ir.Model, kv: KVGraph) -> int | None:
    """The logits output's last dimension, when the export fixed it."""
    logits = next(v for v in model.graph.outputs if v.name == kv.logits_output)
    last = logits.shape.dims[-1] if logits.shape is not None and len(logits.shape) else None
    return last if isinstance(last, int) else None


def _load_texts(options: CompileOptions, tokenizer: Path | None, vocab: int | None) -> _Texts:
    calib = Path(options.calib) if options.calib else bundled_text("calib.txt")
    evaluation = Path(options.eval_text) if options.eval_text else bundled_text("heldout.txt")
    return _Texts(
        calib_windows=make_windows(load_token_ids(calib, tokenizer, vocab), options.window,
                                   max(1, options.calib_tokens // options.window), "calibration", MIN_TEXT_WINDOWS),
        eval_windows=make_windows(load_token_ids(evaluation, tokenizer, vocab), options.window,
                                  max(1, options.eval_tokens // options.window), "evaluation", MIN_TEXT_WINDOWS),
        calib_name=calib.name if options.calib else "bundled calib.txt",
        eval_name=evaluation.name if options.eval_text else "bundled heldout.txt",
    )


def _emit(model: ir.Model, kv: KVGraph, plan: QuantPlan, stage: Path, model_path: Path,
          tokenizer: Path | None) -> tuple[Manifest, dict[str, dict]]:
    target_ios, notes = {}, {}
    target_ios["ort-cpu"], notes["ort-cpu"] = ort_cpu.emit(model, kv, plan, stage, model_path.parent)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, stage / "tokenizer.json")
    manifest = Manifest(
        kvcompile_version=__version__,
        source={"path": model_path.name, "sha256": input_hash(model_path)},
        targets=target_ios,
        tokenizer="tokenizer.json" if tokenizer is not None else None,
    )
    manifest.write(stage)
    return manifest, notes


def _emit_static_targets(targets: tuple[str, ...], decomposed: tuple[KVGraph, Path], float_decoder: Decoder,
                         plan: QuantPlan, stats: KVStats, stage: Path, texts: _Texts, options: CompileOptions,
                         notes: dict[str, dict]) -> dict[str, TargetIO]:
    """The static-shape (NPU) targets, all built from the decomposed float model."""
    kv, float_path = decomposed
    ios: dict[str, TargetIO] = {}
    if "qnn-htp" in targets:
        ios["qnn-htp"], notes["qnn-htp"] = qnn_htp.emit(
            float_path, float_decoder, kv, plan, stats, stage, texts.calib_windows.reshape(-1), texts.eval_windows,
            QnnOptions(socs=options.socs, max_context=options.max_context, quality_gate_pct=options.quality_gate_pct))
    if "nnapi" in targets:
        ios["nnapi"], notes["nnapi"], _ = nnapi.emit(float_path, float_decoder, kv, plan, stats, stage,
                                                    texts.eval_windows, options.max_context,
                                                    options.quality_gate_pct)
    if "tflite" in targets:
        ios["tflite"], notes["tflite"] = tflite.emit(float_path, float_decoder, kv, plan, stats, stage,
                                                     texts.eval_windows, options.max_context, options.quality_gate_pct)
    return ios


def _verify(float_decoder: Decoder, manifest: Manifest, stage: Path, texts: _Texts,
            options: CompileOptions, progress: Progress) -> dict[str, Any]:
    """Decode-path quality of the ort-cpu artifact against the float model."""
    io = manifest.targets["ort-cpu"]
    compiled = Decoder(cpu_session(stage / io.model), io)
    steps = texts.eval_windows.shape[0] * (options.window - options.prefill - 1)
    float_score, compiled_score = decode_path_scores(
        [float_decoder, compiled], texts.eval_windows, options.prefill,
        progress=progress(f"verifying through the decode path ({texts.eval_windows.shape[0]} windows of "
                          f"{texts.eval_windows.shape[1]} tokens)", steps))
    return _score_summary(float_score, compiled_score, options.quality_gate_pct, texts.eval_name)


def report_device(options: CompileOptions, targets: tuple[str, ...]) -> Device:
    """--device, else the profile of the first --soc when compiling for qnn-htp, else the default."""
    if options.device is not None:
        return load_device(options.device)
    if "qnn-htp" in targets:
        return load_device(SOC_DEVICES.get(options.socs[0], DEFAULT_DEVICE))
    return load_device(DEFAULT_DEVICE)


def _report(kv: KVGraph, plan: QuantPlan, stats: KVStats | None, manifest: Manifest, quality: dict[str, Any],
            texts: _Texts | None, options: CompileOptions, targets: tuple[str, ...], device: Device, stage: Path,
            timings: dict[str, float]) -> dict[str, Any]:
    memory = memory_figures(kv, plan)
    weights = model_weights(stage / manifest.targets["ort-cpu"].model)
    return {
        "kvcompile_version": __version__,
        "source": manifest.source,
        "status": {True: "passed", False: "failed-quality-gate", None: "unverified"}[quality["passed"]],
        "kv": {
            "layers": kv.num_layers,
            "discovery": kv.source,
            "attention_forms": list(kv.attention_forms),
            "tensors": tensor_rows(kv, plan, stats),
        },
        "plan": {"bits": plan.bits, "scheme": plan.scheme, "clip": plan.clip, "storage": plan.storage,
                 "budget_curve": [{"bits": bits, "summed_kl": kl} for bits, kl in plan.budget_curve],
                 "rotate": options.rotate, "fold_scales": options.fold_scales,
                 "bit_widths": list(plan.bit_widths),
                 "choices": {t.label: t.name for t in plan.tensors}},
        "calibration": None if texts is None else {"tokens": int(texts.calib_windows.size),
                                                   "text": texts.calib_name, "window": options.window},
        "memory": memory,
        "memory_wall": memory_wall(memory, weights, device, parse_size(options.budget)),
        "quality": quality,
        "targets": {
            name: {"artifact": io.model, "ran": True, "kv_storage": _kv_storage(plan)}
            for name, io in manifest.targets.items() if name in targets
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def compile_model(options: CompileOptions, progress: Progress | None = None) -> CompileResult:
    """Compile `options.model`; raises QualityGateError (after writing) if quality is lost."""
    check_options(options.kv_bits, options.scheme, options.clip, options.group_size)
    targets = resolve_targets(options.targets)
    model_path = Path(options.model)
    out_dir = Path(options.out_dir) if options.out_dir is not None else default_out_dir(model_path)
    check_output_dir(out_dir, model_path)
    device = report_device(options, targets)
    parse_size(options.budget)
    try:
        if options.no_calibration:
            return compile_uncalibrated(options, targets, model_path, out_dir, device)
        return compile_calibrated(options, targets, model_path, out_dir, device, progress or _no_progress)
    except (BadInputError, UnsupportedModelError, QualityGateError):
        raise
    except Exception as exc:
        blame_invalid_input(model_path, exc)
        raise


def blame_invalid_input(model_path: Path, exc: Exception) -> None:
    """After an unexpected failure: if the input fails onnx's full check (strict shape and type
    inference), or holds text that is not UTF-8 (names, doc strings, metadata: onnx_ir fails to
    write them back), that is the likely cause, and the user gets it as a bad-input error (exit 2)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            raise BadInputError(f"{model_path.name} holds text that is not UTF-8 (a name, doc string or metadata "
                                "entry); the file is damaged: re-export it") from None
        cause = cause.__cause__ or cause.__context__
    fault = input_fault(model_path)
    if fault is not None:
        raise BadInputError(f"could not compile {model_path.name} ({type(exc).__name__}), and the model fails "
                            f"onnx's full check: {fault}; fix the export (if the model is valid, rerun with "
                            "KVCOMPILE_DEBUG=1 and report it)") from None


def input_fault(model_path: Path) -> str | None:
    """The first line of what onnx's full check rejects in the input, or None if it passes."""
    proto = onnx.load(model_path, load_external_data=False)
    for node in proto.graph.node:
        if node.domain == "" and node.op_type in ORT_OPS_IN_ONNX_DOMAIN:
            node.domain = "com.microsoft"
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as fault:
        return (str(fault).strip().splitlines() or ["invalid"])[0][:300]
    return None


def compile_calibrated(options: CompileOptions, targets: tuple[str, ...], model_path: Path, out_dir: Path,
                       device: Device, progress: Progress) -> CompileResult:
    """load -> analyze -> calibrate -> plan -> rewrite -> emit -> verify (DESIGN.md's data flow)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    model = load_model(model_path)  # not announced: a refused input gets its one line and nothing else
    check_operators(model)
    normalized = normalize_export(model)
    kv = analyze(model, options.kv_map)
    refuse_unsupported_attention(model, kv)
    limits = read_limits(model, kv, model_path)
    options = within_limits(options, limits, targets)
    tokenizer = find_tokenizer(model_path, options.tokenizer)
    texts = _load_texts(options, tokenizer, vocab_size(model, kv))
    float_decoder = load_input_model(model_path, kv, texts.calib_windows[0, :8])
    lap("load_analyze_s")

    if "qnn-htp" in targets:
        check_socs(options.socs)
    with tempfile.TemporaryDirectory(prefix="kvcompile-") as work_dir:
        work = Path(work_dir)
        float_path = stage_float_model(model, kv, options.rotate, work, model_path, normalized)
        decomposed = (kv, float_path)  # static-shape targets are built from decomposed attention
        progress(f"checking attention fusion (--fuse-attention {options.fuse_attention})", 0)
        fusion = decide_fusion(options.fuse_attention, options.scheme, options.kv_bits, options.fold_scales,
                               float_decoder, float_path, kv, _input_ids_name(kv), texts.calib_windows.reshape(-1),
                               limits, work,
                               lambda path, graph, plan: build_variant(path, graph, plan, work, optimize=True,
                                                                       name="latency.onnx"))
        if fusion.fused:
            model, kv, float_path = fusion.model, fusion.kv, fusion.path
        lap("fuse_s")
        calib_decoder = float_decoder if float_path == model_path else Decoder(
            cpu_session(float_path), float_model_io(kv, str(float_path)))
        stats = collect_kv_stats(calib_decoder, texts.calib_windows,
                                 progress=progress(f"calibrating ({texts.calib_windows.size:,} tokens)",
                                                   int(texts.calib_windows.size)))
        plan = _plan(kv, stats, calib_decoder, texts, options, float_path, work, progress)
        lap("calibrate_plan_s")

        progress("rewriting the graph", 0)
        if options.fold_scales:
            plan = fold_scales(model, kv, plan)
        quantize_graph(model, kv, plan)
        lap("rewrite_s")

        with staged_output_dir(out_dir) as stage:
            progress(f"writing artifacts ({', '.join(targets)})", 0)
            manifest, target_notes = _emit(model, kv, plan, stage, model_path, tokenizer)
            static_ios = _emit_static_targets(targets, decomposed, float_decoder, plan, stats, stage, texts,
                                              options, target_notes)
            if static_ios:
                manifest = dataclasses.replace(manifest, targets={**manifest.targets, **static_ios})
                manifest.write(stage)
            lap("emit_s")
            quality = _verify(float_decoder, manifest, stage, texts, options, progress)
            lap("verify_s")
            report = _report(kv, plan, stats, manifest, quality, texts, options, targets, device, stage, timings)
            for name, note in target_notes.items():
                report["targets"].setdefault(name, {}).update(note)
            failed = [name for name, note in target_notes.items() if not note.get("quality", {}).get("passed", True)]
            if failed:
                report["status"] = "failed-quality-gate"
                report["quality"]["passed"] = False
                report["quality"]["failed_targets"] = failed
            report["fusion"] = fusion.report()
            report["limits"] = {**limits.summary(), "eval_window": options.window, "prefill": options.prefill}
            report["timings"].update(fusion.timings())
            if quality["passed"] is False and not failed:
                quality["advice"] = gate_advice(plan, quality["ppl_delta_pct"], options.quality_gate_pct,
                                                fusion.fused or GROUP_QUERY_ATTENTION in kv.attention_forms,
                                                options.fuse_attention)
            write_report(report, stage)

    result = CompileResult(out_dir=out_dir, report=report)
    if not result.passed:
        failed = quality.get("failed_targets")
        if failed:
            raise QualityGateError(
                f"target(s) {', '.join(failed)} lost more than the {options.quality_gate_pct}% gate; "
                f"artifacts written to {out_dir} and marked failed (see report.md)", result=result)
        advice = "; ".join(quality["advice"]) or "see report.md"
        raise QualityGateError(
            f"perplexity rose {quality['ppl_delta_pct']:+.2f}% (gate {options.quality_gate_pct}%): "
            f"{quality['float_ppl']:.3f} -> {quality['quantized_ppl']:.3f}; artifacts written to "
            f"{out_dir} and marked failed. Try: {advice}",
            result=result,
        )
    return result


UNVERIFIED = {
    "passed": None,
    "verified": False,
    "reason": "compiled with --no-calibration: no float model was run, nothing was measured; "
              "run `kvcompile eval OUTDIR --text FILE` or compile without --no-calibration before shipping",
}
DYNAMIC_SCHEMES = ("per-token", "per-group")


def check_uncalibrated(options: CompileOptions, targets: tuple[str, ...]) -> str:
    """The scheme a --no-calibration compile uses, or a refusal naming what needs calibration."""
    scheme = "per-token" if options.scheme == "auto" else options.scheme
    if scheme not in DYNAMIC_SCHEMES:
        raise BadInputError(f"--scheme {options.scheme} needs calibrated scales; with --no-calibration use "
                            f"--scheme {' or '.join(DYNAMIC_SCHEMES)} (scales computed in the graph)")
    if options.kv_bits not in (2, 4, 8):
        raise BadInputError(f"--kv-bits {options.kv_bits:g} is a per-layer budget, which needs calibration; "
                            "with --no-calibration use 2, 4 or 8")
    if options.fold_scales:
        raise BadInputError("--fold-scales folds calibrated per-channel scales; drop it or --no-calibration")
    if options.fuse_attention == "on":
        raise BadInputError("--fuse-attention on needs calibrated scales and a float check; drop it or "
                            "--no-calibration")
    static = [t for t in targets if t != "ort-cpu"]
    if static:
        raise BadInputError(f"--target {', '.join(static)} needs calibration (static scales, full-model "
                            "QDQ); drop --no-calibration")
    return scheme


def compile_uncalibrated(options: CompileOptions, targets: tuple[str, ...], model_path: Path, out_dir: Path,
                         device: Device) -> CompileResult:
    """--no-calibration: load -> analyze -> dynamic plan -> rewrite -> emit, with no float run.

    For models too large to calibrate here, or to check structure and footprint quickly: every
    cache tensor gets an in-graph per-token (or per-group) scale, so nothing depends on data.
    The weights stay on disk until the artifact is written (onnx_ir reads external data
    lazily) and are never loaded into an onnxruntime session. The report says "unverified"."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    scheme = check_uncalibrated(options, targets)
    model = load_model(model_path)
    check_operators(model)
    normalize_export(model)
    kv = analyze(model, options.kv_map)
    refuse_unsupported_attention(model, kv)
    limits = read_limits(model, kv, model_path)
    if GROUP_QUERY_ATTENTION in kv.attention_forms:
        raise BadInputError("GroupQueryAttention's quantized cache uses calibrated scales; "
                            "drop --no-calibration for this model")
    tokenizer = find_tokenizer(model_path, options.tokenizer)
    if options.rotate is not None:
        rotate_kv(model, kv, options.rotate)
    plan = make_plan(kv, None, options.kv_bits, scheme, options.clip, options.group_size, options.asymmetric)
    quantize_graph(model, kv, plan)
    timings["load_analyze_rewrite_s"] = time.perf_counter() - started
    with staged_output_dir(out_dir) as stage:
        manifest, target_notes = _emit(model, kv, plan, stage, model_path, tokenizer)
        timings["emit_s"] = time.perf_counter() - started - timings["load_analyze_rewrite_s"]
        report = _report(kv, plan, None, manifest, dict(UNVERIFIED), None, options, targets, device, stage, timings)
        for name, note in target_notes.items():
            report["targets"][name].update(note, ran=False)
        report["fusion"] = {"fused": False, "reason": "--no-calibration keeps the attention as exported"}
        report["limits"] = limits.summary()
        write_report(report, stage)
    return CompileResult(out_dir=out_dir, report=report)
