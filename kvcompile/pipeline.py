"""The compile pipeline: load -> analyze -> calibrate -> plan -> rewrite -> lower -> verify -> report.

This is the one place that strings the stages together; it reads top to bottom like the data
flow in DESIGN.md. Stages talk only through the values they return: the options are split per
stage at the top (`CompileOptions.stages`), every target is reached through the registry
(`kvcompile.targets.TARGETS`), and the typed `Report` is assembled here and only here.
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
import onnxscript.version_converter

from kvcompile import __version__
from kvcompile.errors import BadInputError, QualityGateError, UnsupportedModelError
from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph
from kvcompile.limits import ModelLimits, read_limits
from kvcompile.manifest import Manifest, float_model_io
from kvcompile.finish import CompileResult, Progress, StagedCompile, finish_compile
from kvcompile.model_io import ORT_OPS_IN_ONNX_DOMAIN, input_hash, load_model, model_files
from kvcompile.output_dir import StagedOutput, choose_output_dir
from kvcompile.passes.find_kv_cache import find_kv_cache, load_kv_map
from kvcompile.passes.manager import cleaned_up, run_passes
from kvcompile.passes.normalize import normalize_export
from kvcompile.passes.gqa_float_slots import GQAFloatSlotsPass, float_slot_layers
from kvcompile.passes.quantize_gqa import QuantizeGQACachePass
from kvcompile.passes.transform_kv import KVTransform, transform_passes
from kvcompile.passes.unfuse_gqa_rotary import UnfuseGQARotaryPass
from kvcompile.passes.quantize_kv_boundary import (
    QuantizeKVBoundaryPass,
)
from kvcompile.advice import gate_advice
from kvcompile.autoplan import auto_plan
from kvcompile.fusion import decide as decide_fusion
from kvcompile.plan import PlanOptions, QuantPlan, check_options, make_plan, stored_kvio, with_float_slots
from kvcompile.quality import TargetQuality
from kvcompile.report_types import (
    BudgetPoint,
    CalibrationSection,
    FusionSection,
    KVSection,
    LimitsSection,
    MemoryFigures,
    PlanSection,
    Report,
    TargetReport,
    Verdict,
)
from kvcompile.targets import TARGETS
from kvcompile.targets.base import Artifact, LoweringInput, TargetOptions, VerifyInput, legalize
from kvcompile.targets.ort_cpu import planned_ort_format
from kvcompile.targets.qnn_htp import is_float16_export
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
from kvcompile.report import memory_figures, tensor_rows
from kvcompile.kvstats import KVStats
from kvcompile.runtimes.calibrate import collect_kv_stats
from kvcompile.runtimes.kvcache import windows_together
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import ORT_ERRORS, cpu_session, return_freed_memory
from kvcompile.peak_rss import children_peak_rss_mib, peak_rss_mib
from kvcompile.runtimes.weights import WeightPool
from kvcompile.tokens import (MIN_TEXT_WINDOWS, bundled_text, decode_prefill, find_tokenizer, load_token_ids,
                              make_windows)

AVAILABLE_TARGETS = tuple(TARGETS)
MIN_OPSET = 18  # BitwiseAnd/BitwiseOr used by the packing fragments



@dataclass(frozen=True)
class CompileOptions:
    """Everything the user asked for, flat as the CLI and the --config file spell it;
    `stages()` splits it into the values each stage reads."""

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
    float_slots: tuple[int, int] = (4, 128)  # fused GroupQueryAttention: (sinks, recent) kept in float
    socs: tuple[str, ...] = ("SM8650",)  # qnn-htp
    max_context: int | None = None  # the context it will run at: calibration/verification windows and the
    # static targets' buffer (None: 1024, or the model's limit if shorter)
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
    prefill: int = 32
    prefill_len: int | None = None  # qnn-htp's prefill graph: tokens per call (None: `prefill_len`; 0: none)
    htp_precision: str = "auto"  # qnn-htp: auto (quantized, float16 if that fails the gate) | quantized | fp16

    def stages(self) -> StageOptions:
        return StageOptions(
            analysis=AnalysisOptions(kv_map=self.kv_map, tokenizer=self.tokenizer),
            texts=TextOptions(calib=self.calib, calib_tokens=self.calib_tokens, eval_text=self.eval_text,
                              eval_tokens=self.eval_tokens, window=DEFAULT_CONTEXT, prefill=self.prefill),
            plan=PlanOptions(kv_bits=self.kv_bits, scheme=self.scheme, clip=self.clip, group_size=self.group_size,
                             asymmetric=self.asymmetric, uniform=self.uniform, rotate=self.rotate,
                             fold_scales=self.fold_scales, fuse_attention=self.fuse_attention,
                             calibrated=not self.no_calibration, float_slots=tuple(self.float_slots)),
            targets=resolve_targets(self.targets),
            target=TargetOptions(max_context=self.max_context, socs=tuple(self.socs), prefill_len=self.prefill_len,
                                 htp_precision=self.htp_precision),
            quality_gate_pct=self.quality_gate_pct,
            report=ReportOptions(device=self.device, budget=self.budget),
        )


@dataclass(frozen=True)
class AnalysisOptions:
    kv_map: Path | None  # a --kv-map file instead of graph analysis
    tokenizer: Path | None


@dataclass(frozen=True)
class TextOptions:
    """The calibration and held-out texts, and the windows both are cut into."""

    calib: Path | None
    calib_tokens: int
    eval_text: Path | None
    eval_tokens: int
    window: int  # the context calibrated and verified at: resolved by `within_limits`
    prefill: int


@dataclass(frozen=True)
class ReportOptions:
    device: str | None  # memory-wall report: a devices.toml key or a .toml profile
    budget: str  # memory-wall report: RAM for the KV cache


@dataclass(frozen=True)
class StageOptions:
    analysis: AnalysisOptions
    texts: TextOptions
    plan: PlanOptions
    targets: tuple[str, ...]  # resolved: ort-cpu first
    target: TargetOptions
    quality_gate_pct: float
    report: ReportOptions


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


DEFAULT_CONTEXT = 1024  # the context calibrated and verified at (and the static buffer) unless --max-context says
MOST_CALIBRATED_TOGETHER = 8  # windows calibrated together (fewer for a large cache: kvcache.windows_together)
MIN_WINDOW = 16  # the shortest evaluation window that still leaves decode steps after a prefill


def within_limits(stages: StageOptions, limits: ModelLimits) -> StageOptions:
    """The options with the context the model will run at resolved within the model's limits.

    That context (--max-context; 1024 by default, or the model's limit if shorter) is the length of
    the calibration and verification windows, so what the gate passes holds as far as the artifact
    is meant to run: keys are cached after RoPE, and static key ranges calibrated on short windows
    do not cover the rotations of later positions (SmolLM2, asymmetric keys: +5.6% at 256-token
    windows, +15.6% at 1024). The static targets' buffer holds the same context, or the model's
    attention window if that is shorter. An explicit --max-context beyond a limit is refused,
    naming the limit and where it was read."""
    explicit = stages.target.max_context
    facts = "; ".join(limits.facts)
    if explicit is not None and limits.max_context is not None and explicit > limits.max_context:
        raise BadInputError(
            f"--max-context {explicit} is longer than the model's context limit, {limits.max_context} tokens "
            f"({facts}): pass --max-context {limits.max_context} or less")
    if explicit is not None and explicit < MIN_WINDOW:
        raise BadInputError(f"--max-context {explicit} is too short: kvcompile calibrates and verifies through "
                            f"windows of at least {MIN_WINDOW} tokens; pass --max-context {MIN_WINDOW} or more")
    context = explicit if explicit is not None else limits.clamp(DEFAULT_CONTEXT)
    if context < MIN_WINDOW:
        raise UnsupportedModelError(
            f"the model takes at most {limits.max_context} tokens ({facts}); kvcompile calibrates "
            f"and verifies through windows of at least {MIN_WINDOW} tokens")
    buffer = None
    if any(not TARGETS[t].capabilities.dynamic_shapes for t in stages.targets):
        buffer = context if limits.window is None else min(context, limits.window)
        if explicit is not None and buffer < explicit:
            raise BadInputError(
                f"--max-context {explicit} is longer than its attention window, {limits.window} tokens "
                f"({facts}); the static graph attends over its whole buffer: pass "
                f"--max-context {limits.window} or less")
    texts = dataclasses.replace(stages.texts, window=context, prefill=decode_prefill(context, stages.texts.prefill))
    target = dataclasses.replace(stages.target, max_context=buffer,
                                 prefill_len=None if buffer is None else prefill_len(stages.target.prefill_len, buffer))
    return dataclasses.replace(stages, texts=texts, target=target)


DEFAULT_PREFILL_LEN = 128  # tokens per call of the static prefill graph (AR-N), as Qualcomm's LLM exports use


def prefill_len(requested: int | None, buffer: int) -> int:
    """The prefill graph's tokens per call for a static buffer of `buffer` tokens: as requested
    (0: no prefill graph), by default 128 or half the buffer if that is less; a request the
    buffer cannot hold is refused."""
    if requested is None:
        return min(DEFAULT_PREFILL_LEN, buffer // 2)
    if requested >= buffer:
        raise BadInputError(f"--prefill-len {requested} does not fit the static buffer of {buffer} tokens: pass "
                            f"--prefill-len {buffer // 2} or less (or 0 for no prefill graph)")
    return 0 if requested == 1 else requested


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
    slotted = {name: c for name, c in fused.items() if plan.for_input(name).float_slots is not None}
    slots = [GQAFloatSlotsPass(kv, slotted, *plan.for_input(next(iter(slotted))).float_slots)] if slotted else []
    run_passes(model, QuantizeKVBoundaryPass(kv, boundary), QuantizeGQACachePass(kv, fused), *slots, *cleaned_up())
    return model


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
    run_passes(model, *transform_passes(kv, transforms))
    return dataclasses.replace(plan, tensors=tuple(tensors))


def rotate_kv(model: ir.Model, kv: KVGraph, rotate: str) -> None:
    """--rotate hadamard: rotate every cache tensor along head_dim (in place, see TransformKVPass)."""
    if rotate != "hadamard":
        raise BadInputError(f"--rotate {rotate!r} is not supported; use hadamard")
    run_passes(model, *transform_passes(kv, {t.past_input: KVTransform.rotation(t) for t in kv.tensors}))


def stage_float_model(model: ir.Model, kv: KVGraph, rotate: str | None, work: Path, model_path: Path,
                      normalized: bool) -> Path:
    """The float model to calibrate and to build auto's variants from.

    --rotate is applied here (in place: the compiled model is built from the rotated graph).
    The input itself is used when it is self-contained, unrotated and was not changed by
    `normalize_export` (the KVGraph names its nodes); otherwise one copy is written to `work`
    with its weights in `work/float.onnx.data`, which the fusion check's variants reference (onnxruntime
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


def build_variant(float_path: Path, kv: KVGraph, plan: QuantPlan, work: Path, weights: WeightPool,
                  optimize: bool = False, name: str = "variant.onnx") -> Decoder:
    """Compile the float model at `float_path` with `plan` into `work` and load it."""
    model = load_model(float_path, check=False)  # checked when the compile loaded its input
    quantize_graph(model, kv, plan)
    path = work / name
    ir.save(model, path)
    float_io = float_model_io(kv, str(float_path))
    io = dataclasses.replace(float_io, kv=[stored_kvio(k, plan) for k in float_io.kv])
    return Decoder(cpu_session(path, optimize=optimize, weights=weights), io)


def load_input_model(model_path: Path, kv: KVGraph, tokens: np.ndarray, weights: WeightPool) -> Decoder:
    """The user's model in onnxruntime, checked to load and to run a prefill and a decode step.

    Whatever onnxruntime refuses here is the input's problem (exit 2, one line), and so is a later
    failure of this decoder (it runs the model as given, e.g. at a longer context); onnxruntime
    failures on graphs kvcompile wrote are kvcompile's bugs (exit 1)."""
    try:
        decoder = Decoder(cpu_session(model_path, weights=weights), float_model_io(kv, str(model_path)), input_model=model_path.name)
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


def _plan(kv: KVGraph, stats: KVStats, float_decoder: Decoder, texts: _Texts, options: PlanOptions,
          progress: Progress) -> QuantPlan:
    if options.scheme == "auto":
        return auto_plan(kv, stats, float_decoder, texts.calib_windows, options.kv_bits,
                         options.clip, options.uniform, progress)
    return make_plan(kv, stats, options.kv_bits, options.scheme, options.clip, options.group_size,
                     options.asymmetric)


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


def _load_texts(options: TextOptions, tokenizer: Path | None, vocab: int | None) -> _Texts:
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


def lower_targets(targets: tuple[str, ...],
                  lowering: LoweringInput) -> tuple[dict[str, Artifact], dict[str, tuple[str, ...]]]:
    """Lower every requested target, each with the plan legalised for what it can hold; returns
    the artifacts and, per target, the plan changes legalising made."""
    artifacts, changes = {}, {}
    for name in targets:
        target = TARGETS[name]
        dynamic = target.capabilities.dynamic_shapes
        kv = lowering.kv if dynamic else lowering.float_kv  # static graphs are built from the float model
        plan, changes[name] = legalize(kv, lowering.stats, lowering.plan, target.capabilities)
        artifacts[name] = target.lower(dataclasses.replace(lowering, plan=plan))
    return artifacts, changes


def write_manifest(artifacts: dict[str, Artifact], stage: Path, model_path: Path, tokenizer: Path | None) -> Manifest:
    if tokenizer is not None:
        shutil.copyfile(tokenizer, stage / "tokenizer.json")
    manifest = Manifest(
        kvcompile_version=__version__,
        source={"path": model_path.name, "sha256": input_hash(model_path)},
        targets={name: artifact.io for name, artifact in artifacts.items()},
        tokenizer="tokenizer.json" if tokenizer is not None else None,
    )
    manifest.write(stage)
    return manifest


def verdict(qualities: dict[str, TargetQuality], plan: QuantPlan, gate_pct: float, fused: bool,
            fuse_mode: str, htp_precision: str = "quantized") -> Verdict:
    """The gate: every target within `gate_pct` of the float model. Advice (from what auto
    measured) when the ort-cpu artifact itself failed; for a failed quantized qnn-htp graph,
    its float16 precision."""
    gate = qualities["ort-cpu"]
    failed = tuple(name for name, quality in qualities.items() if name != "ort-cpu" and not quality.passed)
    passed = gate.passed and not failed
    departed = {name for name in failed if qualities[name].agreement and not qualities[name].agreement.agrees}
    if passed:
        advice: tuple[str, ...] = ()
    elif failed:
        lost_quality = "qnn-htp" in failed and "qnn-htp" not in departed
        advice = (HTP_FP16_ADVICE,) if lost_quality and htp_precision == "quantized" else ()
    else:
        advice = tuple(gate_advice(plan, gate.ppl_delta_pct, gate_pct, fused, fuse_mode))
    return Verdict(passed=passed, gate=gate, failed_targets=failed, advice=advice,
                   target_failures=tuple(target_failure(name, qualities[name]) for name in failed))


HTP_AUTO = "auto"  # --htp-precision: quantized, rebuilt in float16 if that fails the gate
FLOAT16_EXPORT_ON_HTP = ("HTP precision: float16, because the export is float16 (the fixed-point graph is "
                         "quantized from float32 models only; compile the float32 export for it)")


def htp_precision_decision(quantized: TargetQuality) -> str:
    """Why qnn-htp's graphs compute in float16 (the report's decisions and the target's changes)."""
    seen = (f" (over its first {quantized.eval_tokens:,} predictions: it could no longer pass)"
            if quantized.stopped_early else "")
    return (f"HTP precision: the fixed-point graph (uint16 activations, int8 weights) failed the "
            f"{quantized.quality_gate_pct}% gate, {target_failure('qnn-htp', quantized).removeprefix('qnn-htp: ')}"
            f"{seen}, so qnn-htp was rebuilt to compute in float16 on the HTP (twice the weight bytes; the "
            "4-bit cache unchanged; --htp-precision quantized keeps the fixed-point graph)")


def target_failure(name: str, quality: TargetQuality) -> str:
    """One line: why a target failed the gate (its departure from its reference runtime first)."""
    departure = quality.agreement.departure() if quality.agreement else None
    if departure:
        return f"{name}: {departure}"
    runs = [quality] + ([quality.on_device] if quality.on_device else [])
    return f"{name}: " + "; ".join(f"perplexity {q.ppl_delta_pct:+.2f}% ({q.ran_on})" for q in runs
                                   if q.ppl_delta_pct > q.quality_gate_pct)


HTP_FP16_ADVICE = ("--htp-precision fp16 (not measured here): qnn-htp's graphs computed in float16 on the HTP "
                   "instead of fixed point (8-bit weights, uint16 activations), the same 4-bit cache; twice the "
                   "weight bytes")


def kv_section(kv: KVGraph, plan: QuantPlan, stats: KVStats | None) -> KVSection:
    return KVSection(layers=kv.num_layers, discovery=kv.source, attention_forms=list(kv.attention_forms),
                     tensors=tensor_rows(kv, plan, stats))


def plan_section(plan: QuantPlan, options: PlanOptions) -> PlanSection:
    return PlanSection(bits=plan.bits, scheme=plan.scheme, clip=plan.clip, storage=plan.storage,
                       budget_curve=[BudgetPoint(bits, kl) for bits, kl in plan.budget_curve],
                       rotate=options.rotate, fold_scales=options.fold_scales, bit_widths=list(plan.bit_widths),
                       choices={t.label: t.name for t in plan.tensors})


def target_reports(artifacts: dict[str, Artifact], changes: dict[str, tuple[str, ...]],
                   qualities: dict[str, TargetQuality] | None) -> dict[str, TargetReport]:
    return {name: TargetReport(artifact=artifact.io.model, kv_storage=artifact.kv_storage,
                               quality=None if qualities is None else qualities[name],
                               plan_changes=changes[name], facts=artifact.facts)
            for name, artifact in artifacts.items()}


def memory_wall_section(memory: MemoryFigures, weights_path: Path, device: Device, budget: str) -> dict[str, Any]:
    return memory_wall(dataclasses.asdict(memory), model_weights(weights_path), device, parse_size(budget))


def report_device(options: ReportOptions, targets: tuple[str, ...], socs: tuple[str, ...]) -> Device:
    """--device, else the profile of the first --soc when compiling for qnn-htp, else the default."""
    if options.device is not None:
        return load_device(options.device)
    if "qnn-htp" in targets:
        return load_device(SOC_DEVICES.get(socs[0], DEFAULT_DEVICE))
    return load_device(DEFAULT_DEVICE)


def compile_model(options: CompileOptions, progress: Progress | None = None) -> CompileResult:
    """Compile `options.model` in this process; raises QualityGateError (after writing) if quality is lost.

    The CLI runs the same two steps, `compile_into` in a child process and `finish_compile` in
    its own (`kvcompile.compile_process`), so that the ORT-format converter never runs beside
    the compile's memory."""
    out_dir = choose_output_dir(options.model, options.out_dir)
    with StagedOutput(out_dir) as output:
        staged = compile_into(options, out_dir, output.folder, progress)
        result = finish_compile(output.folder(), staged, progress)
    if staged.gate_failure is not None:
        raise QualityGateError(staged.gate_failure, result=result)
    return result


def compile_into(options: CompileOptions, out_dir: Path, open_stage: Callable[[], Path],
                 progress: Progress | None = None) -> StagedCompile:
    """Everything but the ORT-format conversion and the report files, written into the staging
    folder `open_stage()` creates once the input is read and checked (`output_dir.StagedOutput`:
    the caller renames it to `out_dir` once `finish_compile` has run)."""
    check_options(options.kv_bits, options.scheme, options.clip, options.group_size)
    stages = options.stages()
    model_path = Path(options.model)
    device = report_device(stages.report, stages.targets, stages.target.socs)
    parse_size(stages.report.budget)
    try:
        if not stages.plan.calibrated:
            return compile_uncalibrated(stages, model_path, out_dir, open_stage, device)
        return compile_calibrated(stages, model_path, out_dir, open_stage, device, progress or _no_progress)
    except (BadInputError, UnsupportedModelError):
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


def compile_calibrated(stages: StageOptions, model_path: Path, out_dir: Path, open_stage: Callable[[], Path],
                       device: Device, progress: Progress) -> StagedCompile:
    """load -> analyze -> calibrate -> plan -> rewrite -> lower -> verify (DESIGN.md's data flow)."""
    timings: dict[str, Any] = {}
    peak_rss: dict[str, int] = {}  # MiB: this process's peak by the end of each stage
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        peak_rss[name.removesuffix("_s")] = peak_rss_mib()
        return_freed_memory()  # what the stage freed goes back to the system, not to the next stage's heap

    def lap_sum(name: str) -> None:
        """`lap`, adding to what the stage already took (emit and verify run per group of targets)."""
        before = timings.get(name, 0.0)
        lap(name)
        timings[name] = round(timings[name] + before, 3)

    model = load_model(model_path)  # not announced: a refused input gets its one line and nothing else
    check_operators(model)
    normalized = normalize_export(model)
    kv = analyze(model, stages.analysis.kv_map)
    refuse_unsupported_attention(model, kv)
    limits = read_limits(model, kv, model_path)
    stages = within_limits(stages, limits)
    for name in stages.targets:
        TARGETS[name].check(kv, stages.target)
    if run_passes(model, UnfuseGQARotaryPass(kv)):  # after read_limits: it reads the node's rotary tables
        normalized = True
        kv = analyze(model, stages.analysis.kv_map)  # the keys are now centerable and take float slots
    tokenizer = find_tokenizer(model_path, stages.analysis.tokenizer)
    texts = _load_texts(stages.texts, tokenizer, vocab_size(model, kv))
    return_freed_memory()  # the tokenizer's heap (35 MiB for SmolLM2's) is not needed again
    weights = WeightPool()  # every CPU session below reads the weights from one resident copy
    float_decoder = load_input_model(model_path, kv, texts.calib_windows[0, :8], weights)
    lap("load_analyze_s")

    plan_options = stages.plan
    with tempfile.TemporaryDirectory(prefix="kvcompile-") as work_dir:
        work = Path(work_dir)
        float_path = stage_float_model(model, kv, plan_options.rotate, work, model_path, normalized)
        decomposed_kv, decomposed_path = kv, float_path  # static-shape targets are built from decomposed attention
        progress(f"checking attention fusion (--fuse-attention {plan_options.fuse_attention})", 0)
        fusion = decide_fusion(plan_options, float_decoder, float_path, kv, _input_ids_name(kv),
                               texts.calib_windows.reshape(-1), limits, work, weights,
                               lambda path, graph, plan: build_variant(path, graph, plan, work, weights,
                                                                       optimize=True, name="latency.onnx"))
        if fusion.fused:
            model, kv, float_path = fusion.model, fusion.kv, fusion.path
            fusion = dataclasses.replace(fusion, model=None)  # the report reads the decision, not its graph
        lap("fuse_s")
        # Calibration and auto's measurements run the float model before any fusion: its cache
        # holds the same entries (the fused float model was checked to match it) and it takes
        # chunks of several tokens for a whole batch, where GroupQueryAttention takes one row.
        # The staged float model is the input itself unless it was rotated or normalized (then
        # the input's session serves: one session less holding what onnxruntime folds per session).
        same_graph = plan_options.rotate is None and not normalized
        calib_decoder = float_decoder if decomposed_path == model_path or same_graph else Decoder(
            cpu_session(decomposed_path, weights=weights), float_model_io(decomposed_kv, str(decomposed_path)))
        calib_batch = windows_together(calib_decoder.io, texts.calib_windows.shape[1], texts.calib_windows.shape[0],
                                       weights.stats.mapped_bytes, MOST_CALIBRATED_TOGETHER)
        stats = collect_kv_stats(calib_decoder, texts.calib_windows, batch=calib_batch, samples_dir=work,
                                 progress=progress(f"calibrating ({texts.calib_windows.size:,} tokens)",
                                                   int(texts.calib_windows.size)))
        plan = _plan(kv, stats, calib_decoder, texts, plan_options, progress)
        del calib_decoder  # a session of its own when the staged float model is not the input's graph
        slot_layers = float_slot_layers(model, kv) if any(plan_options.float_slots) else set()
        lap("calibrate_plan_s")

        progress("rewriting the graph", 0)
        if plan_options.fold_scales:
            plan = fold_scales(model, kv, plan)
        quantize_graph(model, kv, plan)
        lap("rewrite_s")

        # The ort-cpu artifact is built first and rebuilt with float slots if it fails the gate
        # without them: its first verification then only has to tell whether it fails, and stops
        # once it must. The other targets are built once, from the plan that decision leaves.
        may_add_slots = bool(slot_layers) and not plan_options.fold_scales

        def emit_and_verify(model: ir.Model, plan: QuantPlan, stage: Path, targets: tuple[str, ...],
                            rebuilt_if_failed: tuple[str, ...] = ()):
            progress(f"writing artifacts ({', '.join(targets)})", 0)
            lowering = LoweringInput(model=model, kv=kv, plan=plan, float_path=decomposed_path,
                                     float_kv=decomposed_kv, stats=stats, stage=stage, source_dir=model_path.parent,
                                     calib_ids=texts.calib_windows.reshape(-1), options=stages.target)
            artifacts, changes = lower_targets(targets, lowering)
            lap_sum("emit_s")
            verifying = VerifyInput(float_decoder=float_decoder, eval_windows=texts.eval_windows,
                                    eval_text=texts.eval_name, prefill=stages.texts.prefill,
                                    quality_gate_pct=stages.quality_gate_pct, folder=stage, progress=progress,
                                    weights=weights)
            qualities = {name: TARGETS[name].verify(artifact, dataclasses.replace(
                verifying, stop_once_failed=name in rebuilt_if_failed)) for name, artifact in artifacts.items()}
            lap_sum("verify_s")
            return artifacts, changes, qualities

        stage = open_stage()
        artifacts, changes, qualities = emit_and_verify(model, plan, stage, ("ort-cpu",),
                                                        ("ort-cpu",) if may_add_slots else ())
        slots_decision = None
        if may_add_slots:
            slots_decision = float_slots_decision(qualities["ort-cpu"], plan_options.float_slots, len(slot_layers),
                                                  tuple(t for t in stages.targets if t != "ort-cpu"))
            if not qualities["ort-cpu"].passed:
                # The gate decides: float slots cost bytes and onnxruntime-genai compatibility, so
                # they are added only to a compile that fails without them.
                progress(slots_decision, 0)
                shutil.rmtree((stage / artifacts["ort-cpu"].io.model).parent)
                plan = with_float_slots(plan, kv, slot_layers, *plan_options.float_slots)
                del model
                model = load_model(float_path)
                quantize_graph(model, kv, plan)
                timings["first_emit_s"], timings["first_verify_s"] = timings["emit_s"], timings["verify_s"]
                timings["emit_s"] = timings["verify_s"] = 0.0
                lap("rewrite_s")
                artifacts, changes, qualities = emit_and_verify(model, plan, stage, ("ort-cpu",))
        others = tuple(t for t in stages.targets if t != "ort-cpu")
        requested_precision = stages.target.htp_precision
        htp_auto = "qnn-htp" in others and requested_precision == HTP_AUTO
        float16_htp = htp_auto and is_float16_export(decomposed_kv)  # no fixed-point graph from it
        htp_may_rebuild = htp_auto and not float16_htp
        if htp_auto:
            stages = dataclasses.replace(stages, target=dataclasses.replace(
                stages.target, htp_precision="fp16" if float16_htp else "quantized"))
        if others:
            built = emit_and_verify(model, plan, stage, others, ("qnn-htp",) if htp_may_rebuild else ())
            for merged, new in zip((artifacts, changes, qualities), built):
                merged.update(new)
        if float16_htp:
            changes["qnn-htp"] = (FLOAT16_EXPORT_ON_HTP,) + tuple(changes["qnn-htp"])
        if htp_may_rebuild and not qualities["qnn-htp"].passed:
            # The gate decides, as for float slots: float16 on the HTP doubles the weight bytes,
            # so it is built only for a model whose fixed-point graph fails the gate.
            decision = htp_precision_decision(qualities["qnn-htp"])
            progress(decision, 0)
            shutil.rmtree(stage / Path(artifacts["qnn-htp"].io.model).parts[0])  # the target's folder
            stages = dataclasses.replace(stages, target=dataclasses.replace(stages.target, htp_precision="fp16"))
            built = emit_and_verify(model, plan, stage, ("qnn-htp",))
            for merged, new in zip((artifacts, changes, qualities), built):
                merged.update(new)
            changes["qnn-htp"] = (decision,) + tuple(changes["qnn-htp"])
        # The last sessions, the weights they share and the graph in memory go now: the ORT-format
        # converter runs next (`finish_compile`: a child of this process for `compile_model`; for the
        # CLI, once this process has exited).
        float_decoder = weights = model = None
        return_freed_memory()
        ort_format = planned_ort_format(stage, artifacts)
        lap_sum("emit_s")
        manifest = write_manifest(artifacts, stage, model_path, tokenizer)
        memory = memory_figures(kv, plan)
        report = Report(
            kvcompile_version=__version__,
            source=manifest.source,
            kv=kv_section(kv, plan, stats),
            plan=plan_section(plan, plan_options),
            calibration=CalibrationSection(tokens=int(texts.calib_windows.size), text=texts.calib_name,
                                           window=stages.texts.window),
            memory=memory,
            memory_wall=memory_wall_section(memory, stage / artifacts["ort-cpu"].io.model, device,
                                            stages.report.budget),
            quality=verdict(qualities, plan, stages.quality_gate_pct,
                            fusion.fused or GROUP_QUERY_ATTENTION in kv.attention_forms,
                            plan_options.fuse_attention, requested_precision),
            targets=target_reports(artifacts, changes, qualities),
            fusion=FusionSection(fused=fusion.fused, reason=fusion.reason, float_slots=slots_decision),
            limits=LimitsSection(max_context=limits.max_context, sliding_window=limits.window,
                                 facts=list(limits.facts), eval_window=stages.texts.window,
                                 prefill=stages.texts.prefill),
            timings={**timings, **fusion.timings(), "peak_rss_mib": {
                **peak_rss, "child_processes": children_peak_rss_mib()}},
        )

    result = CompileResult(out_dir=out_dir, report=report)
    failure = None if result.passed else gate_message(report.quality, stages.quality_gate_pct, out_dir)
    return StagedCompile(result, ort_format, failure)


def float_slots_decision(first: TargetQuality, slots: tuple[int, int], layers: int,
                         static_targets: tuple[str, ...] = ()) -> str:
    """Why the artifacts have float slots or not (the report's decisions)."""
    sinks, recent = slots
    if first.passed:
        return (f"float slots: none needed (the 4-bit cache alone passed the gate at {first.ppl_delta_pct:+.2f}%; "
                f"the first {sinks} and newest {recent} positions in float would cost bytes and "
                "onnxruntime-genai compatibility)")
    static = f" (and of every cache of the {', '.join(static_targets)} graph)" if static_targets else ""
    seen = (f" over its first {first.eval_tokens:,} predictions (verification stopped there: it could no "
            "longer pass)" if first.stopped_early else "")
    return (f"float slots: the 4-bit cache alone lost {first.ppl_delta_pct:+.2f}%{seen} (gate {first.quality_gate_pct}%), "
            f"so the first {sinks} and newest {recent} positions of {layers} GroupQueryAttention layer(s)"
            f"{static} are also kept in float16 and read exactly (--float-slots 0 0: never)")


def gate_message(quality: Verdict, gate_pct: float, out_dir: Path) -> str:
    if quality.failed_targets:
        advice = f" Try: {'; '.join(quality.advice)}" if quality.advice else ""
        return (f"target(s) failed the {gate_pct}% gate: {'; '.join(quality.target_failures)}; "
                f"artifacts written to {out_dir} and marked failed (see report.md).{advice}")
    gate = quality.gate
    advice = "; ".join(quality.advice) or "see report.md"
    return (f"perplexity rose {gate.ppl_delta_pct:+.2f}% (gate {gate_pct}%): "
            f"{gate.float_ppl:.3f} -> {gate.quantized_ppl:.3f}; artifacts written to "
            f"{out_dir} and marked failed. Try: {advice}")


UNVERIFIED = Verdict(
    passed=None, gate=None,
    reason="compiled with --no-calibration: no float model was run, nothing was measured; "
           "run `kvcompile eval OUTDIR --text FILE` or compile without --no-calibration before shipping",
)
DYNAMIC_SCHEMES = ("per-token", "per-group")


def check_uncalibrated(options: PlanOptions, targets: tuple[str, ...]) -> str:
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
    calibrated = [t for t in targets if TARGETS[t].capabilities.needs_calibration]
    if calibrated:
        raise BadInputError(f"--target {', '.join(calibrated)} needs calibration (static scales, full-model "
                            "QDQ); drop --no-calibration")
    return scheme


def compile_uncalibrated(stages: StageOptions, model_path: Path, out_dir: Path, open_stage: Callable[[], Path],
                         device: Device) -> StagedCompile:
    """--no-calibration: load -> analyze -> dynamic plan -> rewrite -> lower, with no float run.

    For models too large to calibrate here, or to check structure and footprint quickly: every
    cache tensor gets an in-graph per-token (or per-group) scale, so nothing depends on data.
    The weights stay on disk until the artifact is written (onnx_ir reads external data
    lazily) and are never loaded into an onnxruntime session. The report says "unverified"."""
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    plan_options = stages.plan
    scheme = check_uncalibrated(plan_options, stages.targets)
    model = load_model(model_path)
    check_operators(model)
    normalize_export(model)
    kv = analyze(model, stages.analysis.kv_map)
    refuse_unsupported_attention(model, kv)
    limits = read_limits(model, kv, model_path)
    if GROUP_QUERY_ATTENTION in kv.attention_forms:
        raise BadInputError("GroupQueryAttention's quantized cache uses calibrated scales; "
                            "drop --no-calibration for this model")
    tokenizer = find_tokenizer(model_path, stages.analysis.tokenizer)
    if plan_options.rotate is not None:
        rotate_kv(model, kv, plan_options.rotate)
    plan = make_plan(kv, None, plan_options.kv_bits, scheme, plan_options.clip, plan_options.group_size,
                     plan_options.asymmetric)
    quantize_graph(model, kv, plan)
    timings["load_analyze_rewrite_s"] = round(time.perf_counter() - started, 3)
    stage = open_stage()
    lowering = LoweringInput(model=model, kv=kv, plan=plan, float_path=model_path, float_kv=kv, stats=None,
                             stage=stage, source_dir=model_path.parent, calib_ids=None, options=stages.target)
    artifacts, changes = lower_targets(stages.targets, lowering)
    ort_format = planned_ort_format(stage, artifacts)
    manifest = write_manifest(artifacts, stage, model_path, tokenizer)
    timings["emit_s"] = round(time.perf_counter() - started - timings["load_analyze_rewrite_s"], 3)
    memory = memory_figures(kv, plan)
    report = Report(
        kvcompile_version=__version__,
        source=manifest.source,
        kv=kv_section(kv, plan, None),
        plan=plan_section(plan, plan_options),
        calibration=None,
        memory=memory,
        memory_wall=memory_wall_section(memory, stage / artifacts["ort-cpu"].io.model, device,
                                        stages.report.budget),
        quality=UNVERIFIED,
        targets=target_reports(artifacts, changes, None),
        fusion=FusionSection(fused=False, reason="--no-calibration keeps the attention as exported"),
        limits=LimitsSection(max_context=limits.max_context, sliding_window=limits.window,
                             facts=list(limits.facts)),
        timings=timings,
    )
    return StagedCompile(CompileResult(out_dir=out_dir, report=report), ort_format, gate_failure=None)
