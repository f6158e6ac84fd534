"""The compile pipeline: load -> analyze -> calibrate -> plan -> rewrite -> emit -> verify.

This is the one place that strings the stages together; it reads top to bottom like the data
flow in DESIGN.md. Stages talk only through the values they return.
"""

from __future__ import annotations

import dataclasses
import shutil
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
from kvcompile.errors import BadInputError, QualityGateError, TargetError, UnsupportedModelError
from kvcompile.kvgraph import DECOMPOSED, KVGraph
from kvcompile.manifest import KVIO, Manifest, Packing, TargetIO, float_model_io
from kvcompile.model_io import check_output_dir, input_hash, load_model, save_model, staged_output_dir
from kvcompile.passes.find_kv_cache import find_kv_cache, load_kv_map
from kvcompile.passes.quantize_kv_boundary import QuantizeKVBoundaryPass, packed_dims
from kvcompile.plan import QuantPlan, check_options, make_plan
from kvcompile.quant import codes_per_byte
from kvcompile.report import memory_figures, tensor_rows, write_report
from kvcompile.runtimes.calibrate import KVStats, collect_kv_stats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import DecodeScore, decode_path_scores
from kvcompile.runtimes.session import cpu_session
from kvcompile.tokens import bundled_text, find_tokenizer, load_token_ids, make_windows

AVAILABLE_TARGETS = ("ort-cpu",)
PLANNED_TARGETS = ("qnn-htp", "nnapi", "tflite")
MIN_OPSET = 18  # BitwiseAnd/BitwiseOr used by the packing fragments

# progress(stage description, total units) -> advance(units)
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class CompileOptions:
    model: Path
    out_dir: Path | None = None
    kv_bits: int = 4
    scheme: str = "per-channel"
    clip: str = "mse"
    targets: tuple[str, ...] = ("ort-cpu",)
    calib: Path | None = None
    calib_tokens: int = 8192
    eval_text: Path | None = None
    eval_tokens: int = 12288
    tokenizer: Path | None = None
    kv_map: Path | None = None
    quality_gate_pct: float = 2.0
    window: int = 256
    prefill: int = 32


@dataclass
class CompileResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["quality"]["passed"])


def default_out_dir(model: Path) -> Path:
    return Path(model).parent / f"{Path(model).stem}.kvcompiled"


def resolve_targets(requested: tuple[str, ...]) -> tuple[str, ...]:
    targets: list[str] = []
    for name in requested or ("ort-cpu",):
        names = AVAILABLE_TARGETS if name == "all" else (name,)
        for target in names:
            if target in PLANNED_TARGETS:
                raise TargetError(
                    f"target {target!r} is not built yet in kvcompile {__version__}; "
                    f"available: {', '.join(AVAILABLE_TARGETS)}"
                )
            if target not in AVAILABLE_TARGETS:
                raise BadInputError(
                    f"unknown target {target!r}; choose from {', '.join(AVAILABLE_TARGETS + PLANNED_TARGETS)} or all"
                )
            if target not in targets:
                targets.append(target)
    return tuple(targets)


def analyze(model: ir.Model, kv_map: Path | None) -> KVGraph:
    return load_kv_map(model, kv_map) if kv_map is not None else find_kv_cache(model)


def refuse_unsupported_attention(kv: KVGraph) -> None:
    """Until the fused lowering exists, only decomposed attention can be rewritten."""
    others = sorted(set(kv.attention_forms) - {DECOMPOSED})
    if others:
        raise UnsupportedModelError(
            f"the KV cache is read by {', '.join(others)}; kvcompile {__version__} rewrites "
            "decomposed attention (Concat + MatMul/Softmax) only, the fused quantized-KV "
            "lowering for attention ops is not built yet. Export with decomposed attention "
            "(torch.onnx / optimum) to compile now"
        )


def _no_progress(_: str, __: int) -> Callable[[int], None]:
    return lambda _units: None


def _upgrade_opset(model: ir.Model) -> None:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if version >= MIN_OPSET:
        return
    try:
        onnxscript.version_converter.convert_version(model, MIN_OPSET, fallback=True)
    except Exception as exc:  # the converters raise many kinds of errors
        raise UnsupportedModelError(
            f"the model uses opset {version}; kvcompile needs opset {MIN_OPSET} and could not "
            f"convert it ({type(exc).__name__}: {exc}); re-export with opset >= {MIN_OPSET}"
        ) from None


def quantize_graph(model: ir.Model, kv: KVGraph, plan: QuantPlan) -> ir.Model:
    """Apply the rewrite passes for the plan (in place) and clean up."""
    _upgrade_opset(model)
    passes = ir.passes.PassManager([
        QuantizeKVBoundaryPass(kv, plan.codecs(kv)),
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
    ])
    passes(model)
    return model


def quantized_kvio(float_io: KVIO, plan: QuantPlan) -> KVIO:
    tensor_plan = plan.for_input(float_io.input)
    if tensor_plan.bits is None:
        return float_io
    bits = tensor_plan.bits
    return dataclasses.replace(
        float_io,
        stored_dtype="uint8",
        stored_shape=packed_dims(float_io.logical_shape, float_io.head_dim_axis, bits),
        bits=bits,
        granularity=tensor_plan.granularity,
        symmetric=tensor_plan.symmetric,
        packing=Packing(axis=float_io.head_dim_axis, codes_per_byte=codes_per_byte(bits)),
        scale=tensor_plan.scale.tolist(),
        scale_shape=list(tensor_plan.scale.shape),
        zero_point=tensor_plan.zero_point.tolist(),
    )


def emit_ort_cpu(model: ir.Model, kv: KVGraph, plan: QuantPlan, stage: Path) -> TargetIO:
    folder = stage / "ort-cpu"
    folder.mkdir()
    save_model(model, folder / "model.onnx")
    onnx.checker.check_model(folder / "model.onnx", full_check=True)
    float_io = float_model_io(kv, "ort-cpu/model.onnx")
    return dataclasses.replace(float_io, kv=[quantized_kvio(k, plan) for k in float_io.kv])


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


def _kv_storage(plan: QuantPlan) -> str:
    return f"uint8, {8 // plan.bits} x {plan.bits}-bit codes per byte along head_dim" if plan.bits < 8 else "uint8 codes"


@dataclass(frozen=True)
class _Texts:
    calib_windows: np.ndarray
    eval_windows: np.ndarray
    calib_name: str
    eval_name: str


def _load_texts(options: CompileOptions, tokenizer: Path | None) -> _Texts:
    calib = Path(options.calib) if options.calib else bundled_text("calib.txt")
    evaluation = Path(options.eval_text) if options.eval_text else bundled_text("heldout.txt")
    return _Texts(
        calib_windows=make_windows(load_token_ids(calib, tokenizer), options.window,
                                   max(1, options.calib_tokens // options.window), "calibration"),
        eval_windows=make_windows(load_token_ids(evaluation, tokenizer), options.window,
                                  max(1, options.eval_tokens // options.window), "evaluation"),
        calib_name=calib.name if options.calib else "bundled calib.txt",
        eval_name=evaluation.name if options.eval_text else "bundled heldout.txt",
    )


def _emit(model: ir.Model, kv: KVGraph, plan: QuantPlan, stage: Path, model_path: Path,
          tokenizer: Path | None) -> Manifest:
    target_ios = {"ort-cpu": emit_ort_cpu(model, kv, plan, stage)}
    if tokenizer is not None:
        shutil.copyfile(tokenizer, stage / "tokenizer.json")
    manifest = Manifest(
        kvcompile_version=__version__,
        source={"path": model_path.name, "sha256": input_hash(model_path)},
        targets=target_ios,
        tokenizer="tokenizer.json" if tokenizer is not None else None,
    )
    manifest.write(stage)
    return manifest


def _verify(float_decoder: Decoder, manifest: Manifest, stage: Path, texts: _Texts,
            options: CompileOptions, progress: Progress) -> dict[str, Any]:
    """Decode-path quality of the ort-cpu artifact against the float model."""
    io = manifest.targets["ort-cpu"]
    compiled = Decoder(cpu_session(stage / io.model), io)
    steps = texts.eval_windows.shape[0] * (options.window - options.prefill - 1)
    float_score, compiled_score = decode_path_scores(
        [float_decoder, compiled], texts.eval_windows, options.prefill,
        progress=progress("verifying (decode path)", steps))
    return _score_summary(float_score, compiled_score, options.quality_gate_pct, texts.eval_name)


def _report(kv: KVGraph, plan: QuantPlan, stats: KVStats, manifest: Manifest, quality: dict[str, Any],
            texts: _Texts, options: CompileOptions, targets: tuple[str, ...],
            timings: dict[str, float]) -> dict[str, Any]:
    return {
        "kvcompile_version": __version__,
        "source": manifest.source,
        "status": "passed" if quality["passed"] else "failed-quality-gate",
        "kv": {
            "layers": kv.num_layers,
            "discovery": kv.source,
            "attention_forms": list(kv.attention_forms),
            "tensors": tensor_rows(kv, plan, stats),
        },
        "plan": {"bits": plan.bits, "scheme": plan.scheme, "clip": plan.clip, "storage": plan.storage},
        "calibration": {"tokens": int(texts.calib_windows.size), "text": texts.calib_name,
                        "window": options.window},
        "memory": memory_figures(kv, plan),
        "quality": quality,
        "targets": {
            name: {"artifact": io.model, "ran": True, "kv_storage": _kv_storage(plan)}
            for name, io in manifest.targets.items() if name in targets
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def compile_model(options: CompileOptions, progress: Progress | None = None) -> CompileResult:
    """Compile `options.model`; raises QualityGateError (after writing) if quality is lost."""
    progress = progress or _no_progress
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    check_options(options.kv_bits, options.scheme, options.clip)
    targets = resolve_targets(options.targets)
    model_path = Path(options.model)
    out_dir = Path(options.out_dir) if options.out_dir is not None else default_out_dir(model_path)
    check_output_dir(out_dir, model_path)

    model = load_model(model_path)
    kv = analyze(model, options.kv_map)
    refuse_unsupported_attention(kv)
    tokenizer = find_tokenizer(model_path, options.tokenizer)
    texts = _load_texts(options, tokenizer)
    float_decoder = Decoder(cpu_session(model_path), float_model_io(kv, str(model_path)))
    lap("load_analyze_s")

    stats = collect_kv_stats(float_decoder, texts.calib_windows,
                             progress=progress("calibrating", int(texts.calib_windows.size)))
    plan = make_plan(kv, stats, options.kv_bits, options.scheme, options.clip)
    lap("calibrate_plan_s")

    quantize_graph(model, kv, plan)
    lap("rewrite_s")

    with staged_output_dir(out_dir) as stage:
        manifest = _emit(model, kv, plan, stage, model_path, tokenizer)
        lap("emit_s")
        quality = _verify(float_decoder, manifest, stage, texts, options, progress)
        lap("verify_s")
        report = _report(kv, plan, stats, manifest, quality, texts, options, targets, timings)
        write_report(report, stage)

    result = CompileResult(out_dir=out_dir, report=report)
    if not result.passed:
        raise QualityGateError(
            f"perplexity rose {quality['ppl_delta_pct']:+.2f}% (gate {options.quality_gate_pct}%): "
            f"{quality['float_ppl']:.3f} -> {quality['quantized_ppl']:.3f}; artifacts written to "
            f"{out_dir} and marked failed. Try --scheme per-channel or more bits",
            result=result,
        )
    return result
