"""Target qnn-htp: static 4-bit-KV decode and prefill graphs, fully quantized (or in float16),
compiled ahead of time for Qualcomm's Hexagon NPU (HTP) and verified on onnxruntime-qnn's HTP
backend.

Two precisions (`--htp-precision`): "quantized" (default; steps below) and "fp16": the float
static graphs (kv_codec's float-dq style, per-channel cache scales in the graph) compiled with
onnxruntime-qnn's `enable_htp_fp16_precision`, the HTP computing activations and weights in
float16: no calibration, no QDQ, twice the weight bytes of uint8, and the float model's quality
with the 4-bit cache.

Steps (each a function below):
1. plan: the HTP takes one per-tensor scale per cache tensor, static and symmetric. Per-channel
   scales are folded into the attention (TransformKVPass) so the cache needs one scale of 1.0;
   tensors the main plan stores with per-token scales are re-planned per-channel (the report
   says which).
2. graph: the decode graph for a fixed `max_context` (StaticDecodePass): one new token, fixed
   buffers of max_context - 1 slots, an attention bias; the new K/V entries are its outputs.
   The cache is two 4-bit codes per byte, as on the CPU: the HTP has no bit operations, so the
   graph unpacks a byte b as hi = floor(b / 16), lo = b - 16 * hi and packs new entries as
   lo + 16 * hi (kv_codec's fixed-point style), exact in 16-bit fixed point on grids chosen for
   it (`exact_overrides`). The NPU reads a quarter of float16's cache bytes. Opset 21, RMSNorm
   fused (the HTP computes the decomposed form's Reciprocal wrongly in 16 bits).
3. QDQ: onnxruntime's QNN flow (get_qnn_qdq_config): uint16 activations, MatMul weights int8
   per output channel (`per_channel_weight_overrides`), other weights uint8 per tensor,
   calibrated on real decode steps of the calibration text spread over the whole context; the
   values the packing marks exact get the grids that hold them exactly instead; the residual
   stream (its Adds and norms) stays float, float16 on the HTP (`residual_stream_nodes`), and
   so do the MatMuls that write massive activations into it (`massive_output_matmuls`).
4. AOT: an EPContext model and QNN context binary per SoC (`ep.context_enable`).
5. verify: the decode-path perplexity of the QDQ graph on the CPU EP over windows of the full
   context is within the quality gate of the float model; each compiled model loads with CPU
   fallback disabled (every node on the HTP), the HTP agrees with that CPU run, and a short
   text decoded on the HTP simulator passes the gate too.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kvcompile.errors import BadInputError, TargetError, UnsupportedModelError
from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import QnnContext, TargetIO
from kvcompile.model_io import check_external_data, remove_model, save_model
from kvcompile.passes.kv_codec import EXACT_GRID, FIXED_POINT, FLOAT_DQ
from kvcompile.passes.names import prefix_intermediate_names
from kvcompile.quality import TargetQuality
from kvcompile.runtimes.decoder import Decoder, padded_chunks
from kvcompile.runtimes.kvcache import StaticCache
from kvcompile.runtimes.session import (QNN_SOCS, compile_shared_qnn_context, cpu_session, loads_shared_qnn_contexts,
                                        qnn_provider_options, qnn_session)
from kvcompile.runtimes.verify import agreement, decode_quality
from kvcompile.targets.base import Artifact, LoweringInput, TargetOptions, VerifyInput
from kvcompile.targets.static import (
    STATIC_CAPABILITIES,
    VERIFY_PREFILL,
    check_static,
    long_verification_windows,
    static_cache_bytes,
    static_graph,
    static_target_io,
    verification_windows,
)

FOLDER = "qnn-htp"
QDQ_OPSET = 21  # 16-bit Q/DQ
CALIBRATION_STEPS = 96
ACTIVATION_HEADROOM = 2.0  # calibrated activation ranges widened this much (`calibrated_ranges`)
POSITION_ROLES = ("position_ids", "attention_bias", "attention_mask")  # inputs that do not carry the text
PER_CHANNEL_WEIGHTS = "int8-per-channel"  # MatMul weights (`per_channel_weight_overrides`)
MASSIVE_OUTPUT_RATIO = 100.0  # a residual-writing MatMul this many times its peers' median stays float
COMPARE_STEPS = 16


HTP_WINDOWS, HTP_WINDOW = 2, 64  # the simulator is slow: a short text
QUANTIZED, FP16 = "quantized", "fp16"


def is_float16_export(kv: KVGraph) -> bool:
    """A float16 export (its cache is float16): the fixed-point graph's QDQ quantization takes
    float32 models only (onnxruntime's quantizer gave a QuantizeLinear float16 input and float32
    scale), so qnn-htp computes it in float16 (measured: llama's float16 export compiles and runs so)."""
    return any(t.dtype == "float16" for t in kv.tensors)
PRECISIONS = (QUANTIZED, FP16)
CPU_RUN = {QUANTIZED: "onnxruntime CPU EP running the QDQ graph the HTP contexts were compiled from, as written "
                      "(its residual stream in float32; the HTP computes it in float16)",
           FP16: "onnxruntime CPU EP running the float graph the HTP contexts were compiled from (in float32; "
                 "the HTP computes it in float16)"}
QUANTIZATION = {QUANTIZED: "activations uint16 but the residual stream (Adds, norms) and the MatMuls that "
                           "write massive activations into it float16, MatMul weights int8 per output channel, other weights uint8 (onnxruntime QNN QDQ config); KV cache 4-bit, "
                           "per-tensor scales with per-channel scales folded into the attention",
                FP16: "activations and weights float16 on the HTP (enable_htp_fp16_precision); KV cache 4-bit, "
                      "per-channel scales in the graph"}


def check_socs(socs: tuple[str, ...]) -> None:
    for soc in socs:
        if soc not in QNN_SOCS:
            raise TargetError(f"--soc {soc!r} is not known; choose from {', '.join(QNN_SOCS)}")


def calibration_positions(positions: int, steps: int) -> list[int]:
    """Which of `positions` decode steps (0 .. positions - 1) the QDQ calibration records: at most
    about `steps`, every other one where that covers them all, else evenly spaced, and always the
    last. An activation that grows with the position (RoPE's angles, computed in the graph by
    every exporter) is clipped past the largest position it was calibrated on: calibrating the
    first 192 positions of a 1,024-token graph cost SmolLM2 +1,359% (README)."""
    if positions <= 0:
        return []
    stride = max(2, -(-positions // steps))
    return sorted(set(range(0, positions, stride)) | {positions - 1})


def prefill_calibration_feeds(decoder: Decoder, token_ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Inputs of the prefill graph's calls (CPU run of the float static graphs) over the whole
    context the buffer holds, `prefill_len` tokens a call: every position it will see."""
    cache = decoder.new_cache(1)
    feeds = []
    whole = token_ids[None, : min(decoder.io.max_context - 1, token_ids.size)]
    for padded, real in padded_chunks(whole, decoder.io.options.prefill_len):
        feeds.append({k: np.array(v, copy=True) for k, v in decoder.feeds(cache, padded, real).items()})
        decoder.step(cache, padded[:, :real])
    return feeds


def calibration_feeds(decoder: Decoder, token_ids: np.ndarray, steps: int) -> list[dict[str, np.ndarray]]:
    """Inputs of real decode steps (CPU run of the float static graph) for the QDQ calibration,
    over the whole context the graph holds (`calibration_positions`)."""
    cache = decoder.new_cache(1)
    recorded = set(calibration_positions(min(decoder.io.max_context - 1, token_ids.size), steps))
    feeds = []
    for t in range(max(recorded, default=-1) + 1):
        step_feeds = decoder.feeds(cache, token_ids[None, t : t + 1])
        if t in recorded:
            feeds.append({k: np.array(v, copy=True) for k, v in step_feeds.items()})
        decoder.step(cache, token_ids[None, t : t + 1])
    return feeds


UINT16_LEVELS = 65535
UINT16_STEP_COUNTS = [d for d in range(1, UINT16_LEVELS + 1) if UINT16_LEVELS % d == 0]  # 3 * 5 * 17 * 257


def exact_grid(low: float, high: float, unit: float) -> tuple[np.float32, np.uint16]:
    """A uint16 scale and zero point whose grid holds every multiple of `unit` in [low, high]
    exactly: the grid spans the fewest units that divide 65535 and cover the range, so each of
    those values is a whole number of grid steps (e.g. [0, 255] -> 257 steps per unit). `unit`
    0: the whole uint16 range over [low, high]."""
    if unit == 0:
        scale = np.float32((high - low) / UINT16_LEVELS)
        return scale, np.uint16(round(-low / scale))
    units = round((high - low) / unit)
    span = next((d for d in UINT16_STEP_COUNTS if d >= units), None)
    if span is None:
        raise ValueError(f"no uint16 grid holds {units + 1} values exactly")
    steps_per_unit = UINT16_LEVELS // span
    return np.float32(unit / steps_per_unit), np.uint16(round(-low / unit) * steps_per_unit)


def exact_overrides(graph: onnx.GraphProto) -> dict[str, list[dict]]:
    """The quantizer's tensor overrides for the values the cache's packing marks exact (kv_codec,
    `EXACT_GRID`): each gets `exact_grid`'s scale and zero point instead of a calibrated range."""
    overrides = {}
    for value in [*graph.value_info, *graph.output]:  # a marked value may be a graph output
        marks = {p.key: p.value for p in value.metadata_props}
        if EXACT_GRID in marks:
            low, high, unit = (float(v) for v in marks[EXACT_GRID].split(","))
            scale, zero_point = exact_grid(low, high, unit)
            overrides[value.name] = [{"scale": np.array(scale), "zero_point": np.array(zero_point)}]
    return overrides


def per_channel_weight_overrides(graph: onnx.GraphProto) -> dict[str, list[dict]]:
    """The quantizer's overrides that store each MatMul weight held as a rank-2 initializer
    [K, N] per output channel (axis 1), int8 symmetric. onnxruntime-qnn lowers such a MatMul to
    QNN's FullyConnected, which takes per-channel weights on the HTP only when they are signed and
    symmetric (uint8 per-channel is refused and the node falls back to the CPU); its quantization
    config otherwise stores MatMul weights per tensor. One scale per output channel instead of
    one per matrix halved SmolLM2's next-token KL against the float graph (README)."""
    from onnxruntime.quantization import QuantType

    rank2 = {i.name for i in graph.initializer if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT}
    return {node.input[1]: [{"axis": 1, "symmetric": True, "quant_type": QuantType.QInt8}]
            for node in graph.node if node.op_type == "MatMul" and node.input[1] in rank2}


def text_dependent_values(graph: onnx.GraphProto, position_inputs: set[str]) -> set[str]:
    """The values that depend on the text: everything downstream of a graph input other than the
    position ones (position ids, attention bias). What depends on positions alone (RoPE's angles,
    cos and sin) takes the same values on any text, and the calibration saw every position."""
    constants = {i.name for i in graph.initializer}  # an older IR lists initializers as inputs too
    reached = {i.name for i in graph.input if i.name not in position_inputs and i.name not in constants}
    for node in graph.node:  # topologically sorted
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


NORMS = ("SimplifiedLayerNormalization", "LayerNormalization")  # RMSNorm (fused by kvcompile), LayerNorm


def residual_adds(graph: onnx.GraphProto) -> list[str]:
    """The Adds that sum the residual stream: those a norm (`NORMS`) reads."""
    producers = {output: node for node in graph.node for output in node.output}
    adds = []
    for node in graph.node:
        if node.op_type in NORMS:
            source = producers.get(node.input[0])
            if source is not None and source.op_type == "Add":
                adds.append(source.name)
    return adds


def residual_stream_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes that carry the residual stream: every norm (RMSNorm, fused as
    SimplifiedLayerNormalization, or LayerNormalization) and the Adds whose sums it reads. They are left float (float16 on the HTP): a transformer's
    residual stream holds "massive activations", a few channels of one token (the first)
    thousands of times the others (SmolLM2: 23,554 in channel 507 from layer 11 on, every other
    value under 100), so one uint16 grid over it leaves every other token about 60 steps and the
    error of 18 layers adds up; in float16 each value keeps 11 bits of its own."""
    adds = residual_adds(graph)
    return adds + [node.name for node in graph.node if node.op_type in NORMS]


def massive_output_matmuls(graph: onnx.GraphProto, ranges: dict[str, tuple[float, float]],
                           ratio: float = MASSIVE_OUTPUT_RATIO) -> dict[str, float]:
    """The MatMuls that write a massive activation into the residual stream: those whose output
    a residual Add reads (the attention output and MLP down projections) and whose calibrated
    largest magnitude is at least `ratio` times the median of theirs. They are left float
    (float16 on the HTP) like the stream: the projection that creates a massive activation
    (SmolLM2: layer 11's down projection, 23,554 in one channel of the first token, the median
    projection about 25) puts every other token's output on a uint16 grid about 0.7 wide, a few
    steps over its values, and that error enters the stream. Picked by range, not by name, so
    the layers differ per model; a model without massive activations leaves none float.
    Returns each such MatMul's calibrated largest magnitude."""
    producers = {output: node for node in graph.node for output in node.output}
    adds = set(residual_adds(graph))
    peaks = {}
    for node in graph.node:
        if node.name not in adds:
            continue
        for value in node.input:
            source = producers.get(value)
            if source is not None and source.op_type == "MatMul" and value in ranges:
                low, high = ranges[value]
                peaks[source.name] = max(abs(low), abs(high))
    if not peaks:
        return {}
    median = float(np.median(list(peaks.values())))
    return {name: round(peak, 1) for name, peak in sorted(peaks.items()) if peak >= ratio * median}


def calibrated_ranges(static_path: Path, op_types: list[str], reader, headroom: float, text_dependent: set[str],
                      cache_path: Path) -> dict[str, tuple[float, float]]:
    """Min/max of every activation over the calibration calls, those in `text_dependent`
    (`text_dependent_values`) widened `headroom` times about zero, written as onnxruntime's calibration cache for
    `quantize_static` to read. A held-out text drives some activations past the largest value
    the calibration text did (SmolLM2's MLP products reached 1.4-1.9x it) and a value past its
    grid is clipped; uint16 has resolution to spare for some headroom, not for much (README:
    2x halved SmolLM2's KL against the float graph, 4x doubled it). Returns the ranges as
    calibrated (before the headroom)."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData, create_calibrator,
                                                    save_tensors_data)

    with tempfile.TemporaryDirectory(prefix="kvcompile-calibration-") as scratch:
        calibrator = create_calibrator(static_path, op_types, augmented_model_path=Path(scratch) / "augmented.onnx",
                                       calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    widened = {}
    for name, data in ranges.data.items():
        scale = headroom if name in text_dependent else 1.0
        widened[name] = TensorData(lowest=np.float32(data.range_value[0] * scale),
                                   highest=np.float32(data.range_value[1] * scale))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, widened), cache_path)
    return {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in ranges.data.items()}


def quantize_qdq(static_path: Path, feeds: list[dict[str, np.ndarray]], out_path: Path,
                 position_inputs: set[str] = frozenset(), headroom: float = ACTIVATION_HEADROOM,
                 weights: str = PER_CHANNEL_WEIGHTS, float_residual: bool = True,
                 massive_ratio: float | None = MASSIVE_OUTPUT_RATIO) -> dict[str, float]:
    """QDQ-quantize a float static graph for the HTP (step 3): uint16 activations over their
    calibrated ranges, with `headroom` on those that do not depend on the `position_inputs`
    alone; MatMul weights int8 per output channel, other weights uint8 per tensor; the packing's
    exact grids; the residual stream float (`residual_stream_nodes`), and the MatMuls that write
    massive activations into it (`massive_output_matmuls`). Returns those MatMuls' peaks.
    (`weights` "uint8" / "uint16": every weight per tensor in that type, onnxruntime's QNN config
    as it is; `float_residual` False: the residual stream quantized too; `massive_ratio` None:
    every MatMul quantized; for bench.qnn_quant_variants.)"""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static
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
        graph = onnx.load(static_path, load_external_data=False).graph
        per_channel = per_channel_weight_overrides(graph) if weights == PER_CHANNEL_WEIGHTS else {}
        residual = residual_stream_nodes(graph) if float_residual else []
        config = get_qnn_qdq_config(str(static_path), Reader(), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QUInt16 if weights == "uint16" else QuantType.QUInt8,
                                    init_overrides=per_channel | exact_overrides(graph))
        with tempfile.TemporaryDirectory(prefix="kvcompile-ranges-") as scratch:
            ranges = Path(scratch) / "ranges.json"
            calibrated = calibrated_ranges(static_path, config.op_types_to_quantize, Reader(), headroom,
                                           text_dependent_values(graph, set(position_inputs)), ranges)
            massive = (massive_output_matmuls(graph, calibrated, massive_ratio)
                       if float_residual and massive_ratio is not None else {})
            quantize_static(str(static_path), str(out_path), None, calibrate_method=config.calibrate_method,
                            quant_format=config.quant_format, activation_type=config.activation_type,
                            weight_type=config.weight_type, op_types_to_quantize=config.op_types_to_quantize,
                            nodes_to_quantize=config.nodes_to_quantize,
                            nodes_to_exclude=list(config.nodes_to_exclude or []) + residual + list(massive),
                            per_channel=config.per_channel, reduce_range=config.reduce_range,
                            use_external_data_format=config.use_external_data_format,
                            extra_options=config.extra_options, calibration_cache_path=ranges)
    finally:
        root.setLevel(level)
    return massive


def bytes_read(io: TargetIO, kv: KVGraph) -> dict[str, int | float]:
    """Cache bytes the graph reads each step (packed codes and float16 slots), against a float16
    cache of the same buffer."""
    cache = StaticCache(io, 1)
    read = sum(t.nbytes for t in cache.tensors.values())
    fp16 = sum(2 * t.elements_per_token for t in kv.tensors) * (io.max_context - 1)
    return {"kv_bytes_read_per_step": read, "kv_fp16_bytes_per_step": fp16,
            "kv_read_vs_fp16": round(fp16 / read, 3)}


KV_STORAGE = {QUANTIZED: "uint8, two 4-bit codes per byte, unpacked and packed in-graph in 16-bit fixed point "
                         "(Floor/Mul/Sub/Add on exact grids: the HTP has no bit operations)",
              FP16: "uint8, two 4-bit codes per byte, unpacked and packed in-graph in float16 arithmetic "
                    "(Floor/Div/Mul/Add: the HTP has no bit operations)"}


@dataclasses.dataclass(frozen=True)
class StaticGraph:
    """One of the target's graphs: the decode graph ("model", one token a call) or the prefill
    graph ("prefill", `new_tokens` a call), and the files it becomes."""

    name: str
    new_tokens: int
    precision: str

    @property
    def source(self) -> str:
        """The graph its context is compiled from: QDQ, or float for fp16."""
        return f"{self.name}.{'qdq' if self.precision == QUANTIZED else 'float'}.onnx"

    @property
    def context(self) -> str:
        return f"{self.name}_ctx.onnx"


def compile_source(path: Path) -> Path | bytes:
    """What the QNN EP compiles a graph from: its bytes where it has no external data, so the
    compiled partition's name does not depend on the folder (see qnn_session)."""
    proto = onnx.load(path, load_external_data=False)
    return path if check_external_data(proto, path.parent) else path.read_bytes()


def build_static(lowering: LoweringInput, graph: StaticGraph, context: int):
    """The float static graph for `graph` with the plan it stores. The prefill graph's values are
    renamed apart from the decode graph's (their weights keep their names, which is what QNN
    shares): onnxruntime names a compiled partition after its value names, and two partitions of
    one name cannot share a context. Quantized: the fixed-point codec, per-channel scales folded;
    fp16: the float-dq codec, per-channel scales in the graph."""
    quantized = graph.precision == QUANTIZED
    model, folded = static_graph(lowering.float_path, lowering.float_kv, lowering.plan, context,
                                 style=FIXED_POINT if quantized else FLOAT_DQ, fold_per_channel=quantized,
                                 fuse_rmsnorm=True, fuse_gelu=True, opset=QDQ_OPSET, new_tokens=graph.new_tokens)
    if graph.name != "model":
        prefix_intermediate_names(model, f"{graph.name}/")
    return model, folded


def compile_contexts(folder: Path, graphs: list[StaticGraph], soc: str) -> dict:
    """Compile the graphs in `folder` ahead of time for `soc` into `folder/soc`: one QNN
    context binary (a lone graph's own, or both graphs' with their weights shared) and an
    EPContext model per graph; returns the report's facts on them."""
    (folder / soc).mkdir()
    started = time.perf_counter()
    sources = [compile_source(folder / g.source) for g in graphs]
    try:
        if len(graphs) == 1:
            qnn_session(sources[0], soc, context_file=folder / soc / graphs[0].context)
        else:
            compile_shared_qnn_context([(source, folder / soc / graph.context)
                                        for source, graph in zip(sources, graphs)], soc)
    except Exception as exc:  # onnxruntime reports unsupported nodes and QNN errors this way
        raise TargetError(f"qnn-htp: the QDQ graphs could not be compiled for {soc} with every node on "
                          f"the HTP: {str(exc).splitlines()[0]}") from None
    binaries = sorted((folder / soc).glob("*.bin"))
    facts = {"context_model": f"{FOLDER}/{soc}/{graphs[0].context}",
             "aot_seconds": round(time.perf_counter() - started, 2),
             "context_binaries": len(binaries),
             "context_binary_bytes": sum(b.stat().st_size for b in binaries)}
    if len(graphs) > 1:
        facts["prefill_context_model"] = f"{FOLDER}/{soc}/{graphs[1].context}"
    return facts


def quantize_graphs(folder: Path, graphs: list[StaticGraph], static_paths: dict[str, Path], io: TargetIO,
                    calib_ids: np.ndarray) -> dict[str, dict[str, float]]:
    """QDQ-quantize each float static graph on real calls of its own (the CPU EP running the
    float static graphs over the calibration text); the float graphs are removed after. Returns
    per graph the MatMuls left float for their massive outputs, with their calibrated peaks
    (`massive_output_matmuls`)."""
    prefill = static_paths.get("prefill")
    float_static = Decoder(cpu_session(static_paths["model"]), io,
                           prefill=cpu_session(prefill) if prefill else None)
    feeds = {"model": calibration_feeds(float_static, calib_ids, CALIBRATION_STEPS)}
    if prefill:
        feeds["prefill"] = prefill_calibration_feeds(float_static, calib_ids)
    del float_static
    position_inputs = {i.name for i in io.inputs if i.role in POSITION_ROLES}
    float_matmuls = {}
    for graph in graphs:
        float_matmuls[graph.name] = quantize_qdq(static_paths[graph.name], feeds.pop(graph.name),
                                                 folder / graph.source, position_inputs)
        remove_model(static_paths[graph.name])  # intermediates: the QDQ models and the contexts are the artifacts
    return float_matmuls


def compiled_precision(io: TargetIO) -> str:
    """The precision a qnn-htp artifact was compiled in: the graph its contexts were compiled
    from is QDQ or float (`StaticGraph.source`)."""
    return FP16 if io.options.compiled_from.endswith(".float.onnx") else QUANTIZED


class QnnHtpTarget:
    name = "qnn-htp"
    runs_on = "onnxruntime-qnn HTP backend (simulated on x86 Linux)"
    capabilities = STATIC_CAPABILITIES  # per-channel scales are folded into the attention below

    def check(self, kv: KVGraph, options: TargetOptions) -> None:
        check_socs(options.socs)
        check_static(self.name, kv)
        if options.htp_precision == QUANTIZED and is_float16_export(kv):
            raise UnsupportedModelError(
                "--htp-precision quantized builds qnn-htp's fixed-point graph from a float32 model, and this export "
                "is float16 (its cache is float16): use --htp-precision fp16 (auto chooses it for a float16 export), "
                "or compile the float32 export")

    def lower(self, lowering: LoweringInput) -> Artifact:
        """The decode graph and (with a prefill length) the prefill graph, per-channel scales
        folded (the HTP takes one scale per tensor), each QDQ-quantized on real steps of its own,
        then compiled ahead of time per SoC into one QNN context that stores their weights once."""
        socs, context = lowering.options.socs, lowering.options.max_context
        prefill_len, precision = lowering.options.prefill_len or 0, lowering.options.htp_precision
        check_socs(socs)
        folder = lowering.stage / FOLDER
        folder.mkdir()
        graphs = [StaticGraph("model", 1, precision)] + (
            [StaticGraph("prefill", prefill_len, precision)] if prefill_len else [])
        static_paths = {g.name: folder / (f"{g.name}.static.onnx" if precision == QUANTIZED else g.source)
                        for g in graphs}
        for graph in graphs:  # one float graph in memory at a time
            model, folded = build_static(lowering, graph, context)
            if graph.name == "model":
                io = static_target_io(lowering.float_kv, folded, model, f"{FOLDER}/{graph.source}", context)
            save_model(model, static_paths[graph.name])
            del model
        io = dataclasses.replace(io, options=dataclasses.replace(io.options, prefill_len=prefill_len or None))

        started = time.perf_counter()
        float_matmuls = {}
        if precision == QUANTIZED:
            float_matmuls = quantize_graphs(folder, graphs, static_paths, io, lowering.calib_ids)
        qdq_seconds = time.perf_counter() - started
        nodes_total = {g.name: len(onnx.load(folder / g.source, load_external_data=False).graph.node) for g in graphs}
        compiled = {soc: compile_contexts(folder, graphs, soc) for soc in socs}

        first = socs[0]
        contexts = {soc: QnnContext(compiled[soc]["context_model"], qnn_provider_options(soc),
                                    compiled[soc].get("prefill_context_model")) for soc in socs}
        io = dataclasses.replace(io, model=compiled[first]["context_model"], options=dataclasses.replace(
            io.options, qnn_contexts=contexts, compiled_from=f"{FOLDER}/{graphs[0].source}",
            prefill_compiled_from=f"{FOLDER}/{graphs[1].source}" if prefill_len else None))
        cache_bytes = static_cache_bytes(io)
        facts = {
            "compiled_from": f"{FOLDER}/{graphs[0].source}",
            "precision": precision,
            "soc": first,
            "socs": compiled,
            "max_context": context,
            "prefill_len": prefill_len,
            "graphs": [g.name for g in graphs],
            "nodes_total": nodes_total["model"],
            "nodes_on_htp": nodes_total["model"],  # every context loads with session.disable_cpu_ep_fallback=1 (verify)
            "prefill_nodes_total": nodes_total.get("prefill", 0),
            "prefill_nodes_on_htp": nodes_total.get("prefill", 0),
            "aot_seconds": compiled[first]["aot_seconds"],
            "context_binary_bytes": compiled[first]["context_binary_bytes"],
            "qdq_seconds": round(qdq_seconds, 2),
            "quantization": QUANTIZATION[precision],
            "float_matmuls": float_matmuls,  # MatMuls writing massive activations (`massive_output_matmuls`)
            "kv_cache_bytes": cache_bytes,
            **bytes_read(io, lowering.float_kv),
        }
        return Artifact(self.name, io, KV_STORAGE[precision], facts)

    def verify(self, artifact: Artifact, verifying: VerifyInput) -> TargetQuality:
        """The gate reads the CPU EP run of the same QDQ graph over windows of the full context (the
        HTP simulator is too slow for them); on the HTP backend with CPU fallback disabled: agreement
        with that CPU run (the HTP must follow it: `Agreement.agrees`), a short text's decode-path
        quality (it must pass the gate too), and every other SoC's context loads. Where a failure
        only decides a rebuild (`stop_once_failed`), the CPU run stops once it cannot pass and a
        failed CPU run skips the simulator."""
        io = artifact.io
        socs = list(io.options.qnn_contexts)
        prefill_path = io.options.prefill_compiled_from
        cpu = Decoder(cpu_session(verifying.folder / io.options.compiled_from, as_written_qdq=True), io, prefill=(
            cpu_session(verifying.folder / prefill_path, as_written_qdq=True) if prefill_path else None))
        gate = dict(prefill=VERIFY_PREFILL, batch=1, gate_pct=verifying.quality_gate_pct, text=verifying.eval_text,
                    stop_once_failed=verifying.stop_once_failed)
        quality = decode_quality(verifying.float_decoder, cpu, long_verification_windows(
            verifying.eval_windows, io.max_context), ran_on=CPU_RUN[compiled_precision(io)], **gate)
        if verifying.stop_once_failed and not quality.passed:
            return quality
        htp = self.open(verifying.folder, io, socs[0])
        graph = "QDQ graph" if compiled_precision(io) == QUANTIZED else "float graph (float32)"
        agreement_ = agreement(htp, cpu, verifying.eval_windows.reshape(-1), COMPARE_STEPS,
                               f"onnxruntime CPU EP, the same {graph}", compare_codes=False)
        short = verification_windows(verifying.eval_windows, HTP_WINDOWS, HTP_WINDOW, io.max_context)
        on_device = decode_quality(verifying.float_decoder, htp, short, ran_on=self.runs_on, **gate)
        for soc in socs[1:]:
            self.open(verifying.folder, io, soc)
        passed = quality.passed and on_device.passed and agreement_.agrees
        return dataclasses.replace(quality, passed=passed, agreement=agreement_, on_device=on_device)

    def open(self, folder: Path, io: TargetIO, soc: str | None = None) -> Decoder:
        """The graphs compiled for `soc` (default: the first) on the HTP, CPU fallback disabled:
        the decode graph, and the prefill graph where there is one. A lone decode graph loads
        its context anywhere; the two graphs' shared context binary loads only on an ARM64
        device, so elsewhere (the x86 simulator) the same QDQ graphs are compiled in-process."""
        contexts = io.options.qnn_contexts
        soc = soc or next(iter(contexts))
        if soc not in contexts:
            raise BadInputError(f"qnn-htp was compiled for {', '.join(contexts)}, not {soc}")
        context = contexts[soc]
        if context.prefill_context_model is None:
            return Decoder(qnn_session(folder / context.context_model, soc), io)
        if loads_shared_qnn_contexts():
            return Decoder(qnn_session(folder / context.context_model, soc, shared=True), io,
                           prefill=qnn_session(folder / context.prefill_context_model, soc, shared=True))
        return Decoder(qnn_session(compile_source(folder / io.options.compiled_from), soc), io,
                       prefill=qnn_session(compile_source(folder / io.options.prefill_compiled_from), soc))


TARGET = QnnHtpTarget()
