"""Target ort-cpu: the compiled ONNX model, its ORT-format twin, and an onnxruntime-genai config.

Writes OUTDIR/ort-cpu/
  model.onnx (+ model.onnx.data for large models)   checked with onnx.checker
  model.ort                                         for ORT mobile builds (optimised for ARM), when
                                                    the weights fit the format (see ORT_FORMAT_LIMIT_BYTES)
  genai_config.json + tokenizer files               when onnxruntime-genai can drive the cache
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import onnx
import onnx_ir as ir

from kvcompile.genai_config import write_genai_config
from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import TargetIO, float_model_io
from kvcompile.model_io import check_onnx, initializer_bytes, save_model
from kvcompile.ort_format import GRAPH_NAME, PendingConversion, run_converter
from kvcompile.plan import QuantPlan, stored_kvio
from kvcompile.quality import TargetQuality
from kvcompile.quant import SUPPORTED_BITS
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.kvcache import windows_together
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.weights import read_transposed_weights_in_place
from kvcompile.runtimes.perplexity import scored_predictions
from kvcompile.runtimes.verify import decode_quality
from kvcompile.targets.base import Artifact, Capabilities, LoweringInput, TargetOptions, VerifyInput

FOLDER = "ort-cpu"
MOST_VERIFIED_TOGETHER = 16  # windows decoded together in verification (fewer for a large cache)


# The ORT format is one FlatBuffer (32-bit offsets: at most 2 GiB) holding the optimised graph and
# every weight inline; it has no external data. A 1.5 GB float32 model already fails to save
# (measured), so above 1 GiB of weights kvcompile does not try and says so in the report.
ORT_FORMAT_LIMIT_BYTES = 1 << 30
ORT_FORMAT_SKIPPED = ("not written: the weights exceed 1 GiB and the ORT format (a FlatBuffer, 2 GiB at most, "
                      "no external data) cannot hold them; ship model.onnx with model.onnx.data (the full "
                      "onnxruntime-android/ios packages load ONNX)")


def prepare_ort_format(onnx_path: Path, transposed_in_place: bool = False) -> PendingConversion:
    """Write the graph onnxruntime's converter reads (`kvcompile.ort_format`) next to the model.

    It is the model's graph without its weights, which stay where the model's are. For the
    ort-cpu artifact (`transposed_in_place`), a weight a MatMul reads through a Transpose (a tied
    lm_head) is read as stored (FusedMatMul transB, `read_transposed_weights_in_place`): the file
    then holds it once, not also the transposed copy onnxruntime's constant folding would save
    (113 MB for SmolLM2), and a phone loading it maps that much less. Not for nnapi: FusedMatMul
    is not an NNAPI operator."""
    pending = PendingConversion(onnx_path.with_suffix(".ort"))
    shutil.rmtree(pending.work, ignore_errors=True)
    pending.work.mkdir()
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        if transposed_in_place:
            read_transposed_weights_in_place(model, {tensor.name for tensor in model.graph.initializer})
        (pending.work / GRAPH_NAME).write_bytes(model.SerializeToString())
    except BaseException:
        shutil.rmtree(pending.work, ignore_errors=True)
        raise
    return pending


def write_ort_format(onnx_path: Path, transposed_in_place: bool = False) -> Path:
    """Convert to the ORT format next to the model, now (as onnxruntime's converter does, ARM target)."""
    pending = prepare_ort_format(onnx_path, transposed_in_place)
    run_converter(pending)
    return pending.target


def planned_ort_format(stage: Path, artifacts: dict[str, Artifact]) -> PendingConversion | None:
    """Prepare the ORT-format file the ort-cpu artifact's facts name, for `finish.finish_compile`
    to convert. `lower` only names it: the converter needs about twice the weights in its own
    process, so it runs once the compile's sessions, and the process that held them, are gone,
    and once per compile (not again for an artifact rebuilt with float slots)."""
    artifact = artifacts.get(OrtCpuTarget.name)
    if artifact is None or not artifact.facts.get("ort_format"):
        return None
    return prepare_ort_format(stage / artifact.io.model, transposed_in_place=True)


def query_heads(model: ir.Model, kv: KVGraph) -> int:
    """Query heads: GroupQueryAttention's num_heads, else the query's head axis at Q.K^T."""
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            return node.attributes["num_heads"].as_int()
    key = kv.tensors[0]
    reader = next((n for n in model.graph if n.name == key.reader), None)
    if reader is not None and key.reader_operand is not None:
        dims = reader.inputs[1 - key.reader_operand].shape
        if dims is not None and dims.rank() == 4 and isinstance(dims.dims[1], int):
            return dims.dims[1]
    return key.num_heads


def kv_storage(plan: QuantPlan) -> str:
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
    centered = sum(t.center is not None for t in plan.tensors)
    if centered:
        extra += f"; {centered} tensor(s) stored minus a calibrated per-channel center (GroupQueryAttention)"
    slotted = [t for t in plan.tensors if t.float_slots is not None]
    if slotted:
        sinks, recent = slotted[0].float_slots
        extra += (f"; {len(slotted)} tensor(s) with their first {sinks} and newest {recent} positions also in float "
                  "(GroupQueryAttention reads them in float)")
    return f"uint8 codes packed along head_dim: {parts}{extra}"


class OrtCpuTarget:
    """The rewritten model itself, with dynamic shapes: every compile builds and verifies it."""

    name = "ort-cpu"
    runs_on = "onnxruntime CPU EP"
    capabilities = Capabilities(bits=SUPPORTED_BITS, float_tensors=True, dynamic_scales=True, asymmetric=True,
                                dynamic_shapes=True, needs_calibration=False, centered=True, float_slots=True)

    def check(self, kv: KVGraph, options: TargetOptions) -> None:
        """Every attention form kvcompile analyses compiles here."""

    def lower(self, lowering: LoweringInput) -> Artifact:
        model, kv, plan = lowering.model, lowering.kv, lowering.plan
        folder = lowering.stage / FOLDER
        folder.mkdir()
        onnx_path = folder / "model.onnx"
        save_model(model, onnx_path)
        checker = check_onnx(onnx_path)
        fits_ort_format = initializer_bytes(model) <= ORT_FORMAT_LIMIT_BYTES
        ort_format = f"{FOLDER}/{onnx_path.with_suffix('.ort').name}" if fits_ort_format else None  # written last
        float_io = float_model_io(kv, f"{FOLDER}/model.onnx")
        io = dataclasses.replace(float_io, kv=[stored_kvio(k, plan) for k in float_io.kv])
        slots = next((t.float_slots for t in plan.tensors if t.float_slots is not None), None)
        if slots is not None:
            io = dataclasses.replace(io, options=dataclasses.replace(io.options, float_slots=list(slots)))
        vocab = model.graph.outputs[[v.name for v in model.graph.outputs].index(kv.logits_output)].shape.dims[-1]
        genai = write_genai_config(kv, io, query_heads(model, kv), vocab, lowering.source_dir, folder)
        facts = {"ort_format": ort_format, "onnx_checker": checker, "onnxruntime_genai": genai}
        if not fits_ort_format:
            facts["ort_format_note"] = ORT_FORMAT_SKIPPED
        return Artifact(self.name, io, kv_storage(plan), facts)

    def verify(self, artifact: Artifact, verifying: VerifyInput) -> TargetQuality:
        """The whole held-out text, the compile's window and prefill: the figures the gate reads."""
        windows = verifying.eval_windows
        steps = scored_predictions(windows, verifying.prefill)
        progress = verifying.progress(f"verifying through the decode path ({windows.shape[0]} windows of "
                                      f"{windows.shape[1]} tokens)", steps)
        compiled = Decoder(cpu_session(verifying.folder / artifact.io.model, weights=verifying.weights), artifact.io)
        weight_bytes = verifying.weights.stats.mapped_bytes if verifying.weights is not None else 0
        batch, reference_batch = (windows_together(io, windows.shape[1], windows.shape[0], weight_bytes,
                                                   MOST_VERIFIED_TOGETHER)
                                  for io in (artifact.io, verifying.float_decoder.io))
        return decode_quality(verifying.float_decoder, compiled, windows, prefill=verifying.prefill, batch=batch,
                              reference_batch=reference_batch, gate_pct=verifying.quality_gate_pct,
                              text=verifying.eval_text, ran_on=self.runs_on, progress=progress,
                              stop_once_failed=verifying.stop_once_failed)

    def open(self, folder: Path, io: TargetIO, soc: str | None = None) -> Decoder:
        return Decoder(cpu_session(folder / io.model), io)


TARGET = OrtCpuTarget()
