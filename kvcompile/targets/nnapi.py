"""Target nnapi: the static decode graph for onnxruntime's NNAPI execution provider (ORT mobile).

- The graph: the static decode graph (one token, fixed buffers of max_context - 1 slots, an
  attention bias), with the 4-bit cache packed two codes per byte in uint8 (NNAPI has no 4-bit
  type) and packed/unpacked in-graph with float arithmetic: NNAPI has no bit operations, but
  Floor, Div, Mul and Add on exact small integers do the same. Then the ops NNAPI lacks are
  replaced by equivalents (passes.legalize_nnapi), so the whole graph is one NNAPI partition.
- Artifacts: `nnapi/model.onnx` and `nnapi/model.ort` (what an Android app loads).
- Checks: onnxruntime's mobile usability checker reports the NNAPI partitions and node coverage
  (an Android device is not available here, so the NNAPI EP itself cannot run); the same graph
  runs on the CPU EP through the decode path and is compared with the float model.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.errors import TargetError
from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import TargetIO
from kvcompile.model_io import save_model
from kvcompile.passes.kv_codec import ARITHMETIC
from kvcompile.passes.legalize_nnapi import legalize_nnapi_passes
from kvcompile.passes.manager import run_passes
from kvcompile.plan import QuantPlan
from kvcompile.quality import TargetQuality
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.verify import decode_quality
from kvcompile.targets.base import Artifact, LoweringInput, TargetOptions, VerifyInput
from kvcompile.targets.ort_cpu import write_ort_format
from kvcompile.targets.static import (
    STATIC_CAPABILITIES,
    VERIFY_PREFILL,
    check_static,
    static_cache_bytes,
    static_graph,
    static_target_io,
    long_verification_windows,
)

FOLDER = "nnapi"
OPSET = 18


def nnapi_graph(float_path: Path, kv: KVGraph, plan: QuantPlan, context: int) -> tuple[ir.Model, QuantPlan]:
    """The static decode graph, packed 4-bit cache in float arithmetic, legal for NNAPI."""
    model, used = static_graph(float_path, kv, plan, context, style=ARITHMETIC,
                               fold_per_channel=False, fuse_rmsnorm=False, opset=OPSET)
    run_passes(model, *legalize_nnapi_passes())
    return model, used


_PARTITIONS = re.compile(r"(\d+) partitions? with a total of (\d+)/(\d+) nodes can be handled by the NNAPI EP")
_UNSUPPORTED = re.compile(r"Checking NNAPI.*?Unsupported ops: ([^\n]*)", re.S)


def check_partitions(model_path: Path) -> dict:
    """NNAPI partitions and node coverage, from onnxruntime's mobile usability checker."""
    result = subprocess.run([sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability",
                             str(model_path)], capture_output=True, text=True)
    log = result.stdout + result.stderr
    match = _PARTITIONS.search(log)
    if result.returncode != 0 or match is None:
        last = (log.strip().splitlines() or ["no output"])[-1]
        raise TargetError(f"nnapi: onnxruntime's mobile usability checker failed on the model: {last}")
    partitions, supported, total = (int(g) for g in match.groups())
    unsupported = _UNSUPPORTED.search(log.split("Checking CoreML")[0])
    return {"partitions": partitions, "nodes_on_nnapi": supported, "nodes_total": total,
            "coverage_pct": round(100.0 * supported / total, 2),
            "unsupported_ops": unsupported.group(1).strip() if unsupported else "",
            "checked_by": "onnxruntime.tools.check_onnx_model_mobile_usability"}


KV_STORAGE = ("uint8, two 4-bit codes per byte, unpacked and packed in-graph with float arithmetic "
              "(Floor/Div/Mul/Add: NNAPI has no bit operations)")


class NnapiTarget:
    name = "nnapi"
    runs_on = "onnxruntime CPU EP (the same .ort graph; no Android device here for the NNAPI EP)"
    capabilities = STATIC_CAPABILITIES

    def check(self, kv: KVGraph, options: TargetOptions) -> None:
        check_static(self.name, kv)

    def lower(self, lowering: LoweringInput) -> Artifact:
        """Writes nnapi/model.onnx and nnapi/model.ort; the facts give the NNAPI partitions."""
        context = lowering.options.max_context
        folder = lowering.stage / FOLDER
        folder.mkdir()
        model, used = nnapi_graph(lowering.float_path, lowering.float_kv, lowering.plan, context)
        onnx_path = folder / "model.onnx"
        save_model(model, onnx_path)
        ort_path = write_ort_format(onnx_path)
        partitions = check_partitions(onnx_path)
        io = static_target_io(lowering.float_kv, used, model, f"{FOLDER}/{ort_path.name}", context)
        facts = {"onnx_model": f"{FOLDER}/{onnx_path.name}", "max_context": context, **partitions,
                 "kv_cache_bytes": static_cache_bytes(io)}
        return Artifact(self.name, io, KV_STORAGE, facts)

    def verify(self, artifact: Artifact, verifying: VerifyInput) -> TargetQuality:
        windows = long_verification_windows(verifying.eval_windows, artifact.io.max_context)
        return decode_quality(verifying.float_decoder, self.open(verifying.folder, artifact.io), windows,
                              prefill=VERIFY_PREFILL, batch=1, gate_pct=verifying.quality_gate_pct,
                              text=verifying.eval_text, ran_on=self.runs_on)

    def open(self, folder: Path, io: TargetIO, soc: str | None = None) -> Decoder:
        return Decoder(cpu_session(folder / io.model), io)


TARGET = NnapiTarget()
