"""Target qnn-htp: a static 4-bit-KV decode graph, fully quantized, compiled ahead of time for
Qualcomm's Hexagon NPU (HTP) and verified on onnxruntime-qnn's HTP backend.

Steps (each a function below):
1. plan: the HTP takes one per-tensor scale per cache tensor, static and symmetric. Per-channel
   scales are folded into the attention (TransformKVPass) so the cache needs one scale of 1.0;
   tensors the main plan stores with per-token scales are re-planned per-channel (the report
   says which).
2. graph: the decode graph for a fixed `max_context` (StaticDecodePass): one new token, fixed
   buffers of max_context - 1 slots, an attention bias; the new K/V entries are its outputs, as
   4-bit codes one per byte (the HTP has no bit operations to unpack nibbles; the report gives
   the bytes it reads). Opset 21, RMSNorm fused (the HTP computes the decomposed form's
   Reciprocal wrongly in 16 bits).
3. QDQ: onnxruntime's QNN flow (get_qnn_qdq_config): uint16 activations, uint8 weights,
   calibrated on real decode steps of the calibration text.
4. AOT: an EPContext model and QNN context binary per SoC (`ep.context_enable`).
5. verify: each compiled model loads with CPU fallback disabled (every node on the HTP), the HTP
   agrees with the CPU run of the same QDQ graph, and the decode-path perplexity on a short text
   is within the quality gate of the float model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kvcompile.errors import TargetError
from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import TargetIO
from kvcompile.model_io import model_files, save_model
from kvcompile.passes.kv_codec import ONNX
from kvcompile.plan import QuantPlan
from kvcompile.targets.static import static_graph, static_plan, static_target_io, verification_windows
from kvcompile.runtimes.calibrate import KVStats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import decode_path_scores
from kvcompile.runtimes.session import QNN_SOCS, cpu_session, qnn_provider_options, qnn_session

FOLDER = "qnn-htp"
QDQ_OPSET = 21  # 16-bit Q/DQ
CALIBRATION_STEPS = 96
COMPARE_STEPS = 16


@dataclass(frozen=True)
class QnnOptions:
    socs: tuple[str, ...] = ("SM8650",)
    max_context: int = 1024
    verify_windows: int = 2
    verify_window: int = 64
    quality_gate_pct: float = 2.0


def check_socs(socs: tuple[str, ...]) -> None:
    for soc in socs:
        if soc not in QNN_SOCS:
            raise TargetError(f"--soc {soc!r} is not known; choose from {', '.join(QNN_SOCS)}")


def calibration_feeds(decoder: Decoder, token_ids: np.ndarray, steps: int) -> list[dict[str, np.ndarray]]:
    """Inputs of real decode steps (CPU run of the float static graph) for the QDQ calibration."""
    cache = decoder.new_cache(1)
    feeds = []
    limit = min(steps * 2, decoder.io.max_context - 1, token_ids.size)
    for t in range(limit):
        step_feeds = decoder._feeds(cache, token_ids[None, t : t + 1])
        if t % 2 == 0:
            feeds.append({k: np.array(v, copy=True) for k, v in step_feeds.items()})
        decoder.step(cache, token_ids[None, t : t + 1])
    return feeds


def quantize_qdq(static_path: Path, feeds: list[dict[str, np.ndarray]], out_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

        def rewind(self) -> None:
            self.items = iter(feeds)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice meant for image models
    ort.set_default_logger_severity(3)
    try:
        config = get_qnn_qdq_config(str(static_path), Reader(), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QUInt8)
        quantize(str(static_path), str(out_path), config)
    finally:
        root.setLevel(level)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def compare_with_cpu(htp: Decoder, cpu: Decoder, token_ids: np.ndarray) -> dict:
    """Same inputs to both (the CPU run's cache each step): logits cosine and max |difference|."""
    cache = cpu.new_cache(1)
    cosines, worst = [], 0.0
    for t in range(COMPARE_STEPS):
        feeds = cpu._feeds(cache, token_ids[None, t : t + 1])
        names = [htp.io.logits]
        ours = htp.session.run(names, feeds)[0]
        theirs, _ = cpu.step(cache, token_ids[None, t : t + 1])
        cosines.append(_cosine(ours[0, -1], theirs[0, -1]))
        worst = max(worst, float(np.abs(ours[0, -1] - theirs[0, -1]).max()))
    return {"logits_cosine_min": round(min(cosines), 6), "logits_cosine_mean": round(float(np.mean(cosines)), 6),
            "logits_max_abs_diff": round(worst, 5), "steps_compared": COMPARE_STEPS}


def emit(float_path: Path, float_decoder: Decoder, kv: KVGraph, plan: QuantPlan, stats: KVStats, stage: Path,
         calib_ids: np.ndarray, eval_windows: np.ndarray, options: QnnOptions) -> tuple[TargetIO, dict]:
    check_socs(options.socs)
    folder = stage / FOLDER
    folder.mkdir()
    chosen, notes = static_plan(kv, stats, plan)
    model, folded = static_graph(float_path, kv, chosen, options.max_context, style=ONNX, packed=False,
                                 fold_per_channel=True, fuse_rmsnorm=True, opset=QDQ_OPSET)
    static_path = folder / "model.static.onnx"
    save_model(model, static_path)
    io = static_target_io(kv, folded, model, f"{FOLDER}/model.qdq.onnx", options.max_context, packed=False)

    started = time.perf_counter()
    float_static = Decoder(cpu_session(static_path), io)
    quantize_qdq(static_path, calibration_feeds(float_static, calib_ids, CALIBRATION_STEPS), folder / "model.qdq.onnx")
    static_path.unlink()  # an intermediate: the QDQ model and the compiled contexts are the artifacts
    qdq_seconds = time.perf_counter() - started
    nodes_total = len(onnx.load(folder / "model.qdq.onnx", load_external_data=False).graph.node)

    compiled = {}
    qdq_path = folder / "model.qdq.onnx"
    qdq = qdq_path.read_bytes() if model_files(qdq_path) == [qdq_path] else qdq_path  # bytes: see qnn_session
    for soc in options.socs:
        (folder / soc).mkdir()
        started = time.perf_counter()
        try:
            qnn_session(qdq, soc, context_file=folder / soc / "model_ctx.onnx")
        except Exception as exc:  # onnxruntime reports unsupported nodes and QNN errors this way
            raise TargetError(f"qnn-htp: the QDQ graph could not be compiled for {soc} with every node on "
                              f"the HTP: {str(exc).splitlines()[0]}") from None
        binaries = sorted((folder / soc).glob("*.bin"))
        compiled[soc] = {"context_model": f"{FOLDER}/{soc}/model_ctx.onnx",
                         "aot_seconds": round(time.perf_counter() - started, 2),
                         "context_binary_bytes": sum(b.stat().st_size for b in binaries)}

    first = options.socs[0]
    htp = Decoder(qnn_session(folder / first / "model_ctx.onnx", first), io)
    cpu = Decoder(cpu_session(folder / "model.qdq.onnx"), io)
    agreement = compare_with_cpu(htp, cpu, eval_windows.reshape(-1))
    windows = verification_windows(eval_windows, options.verify_windows, options.verify_window, options.max_context)
    float_score, htp_score = decode_path_scores([float_decoder, htp], windows, prefill=8, batch=1)
    delta = 100.0 * (htp_score.ppl / float_score.ppl - 1.0)
    for soc in options.socs[1:]:  # every compiled binary loads with the CPU fallback off
        qnn_session(folder / soc / "model_ctx.onnx", soc)

    cache_bytes = sum(int(np.prod(t.shape)) for t in htp.new_cache(1).tensors.values())
    fp16_bytes = sum(2 * t.elements_per_token for t in kv.tensors) * (options.max_context - 1)
    note = {
        "artifact": f"{FOLDER}/{first}/model_ctx.onnx",
        "qdq_model": f"{FOLDER}/model.qdq.onnx",
        "soc": first,
        "socs": compiled,
        "max_context": options.max_context,
        "nodes_total": nodes_total,
        "nodes_on_htp": nodes_total,  # loaded with session.disable_cpu_ep_fallback=1
        "ran": True,
        "aot_seconds": compiled[first]["aot_seconds"],
        "context_binary_bytes": compiled[first]["context_binary_bytes"],
        "qdq_seconds": round(qdq_seconds, 2),
        "quantization": "activations uint16, weights uint8 (onnxruntime QNN QDQ config); KV cache 4-bit, "
                        "per-tensor scales with per-channel scales folded into the attention",
        "kv_storage": "uint8, one 4-bit code per byte (the HTP has no bit operations to unpack nibbles)",
        "kv_cache_bytes": cache_bytes,
        "kv_fp16_bytes": fp16_bytes,
        "kv_bytes_read_per_step": cache_bytes,
        "kv_bytes_at_rest_if_packed_on_host": cache_bytes // 2,
        "plan_changes": notes,
        "agreement_with_cpu": agreement,
        "quality": {"float_ppl": round(float_score.ppl, 4), "htp_ppl": round(htp_score.ppl, 4),
                    "ppl_delta_pct": round(delta, 4), "top1_agreement": round(htp_score.top1_agreement, 5),
                    "eval_tokens": htp_score.tokens, "passed": delta <= options.quality_gate_pct},
    }
    options_by_soc = {soc: {"context_model": compiled[soc]["context_model"], **qnn_provider_options(soc)}
                      for soc in options.socs}
    io = dataclasses.replace(io, model=note["artifact"], options={**io.options, "socs": options_by_soc,
                                                                 "qdq_model": note["qdq_model"]})
    return io, note
