"""Target tflite: a .tflite decode graph with the 4-bit cache kept packed at its inputs/outputs.

- The graph: the same static decode graph as the nnapi target (4-bit codes two per byte in uint8,
  packed and unpacked with float arithmetic, no bit operations), translated op by op into
  TensorFlow (targets.onnx_to_tf) and converted with TFLiteConverter restricted to
  TFLITE_BUILTINS: no Flex (select-TF) ops. Its serving signature keeps the ONNX input and output
  names (`past_key_values.0.key`, `present.0.key`, ...).
- Checks: LiteRT's interpreter runs it (ai-edge-litert; tflite-runtime where installed) on the
  same inputs as onnxruntime runs the ONNX graph, step by step through the decode path
  (logits cosine, max difference, identical new-slot codes), and its decode-path perplexity is
  compared with the float model's. The report lists its ops and I/O dtypes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from kvcompile.errors import TargetError
from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import TargetIO
from kvcompile.model_io import save_model
from kvcompile.plan import QuantPlan
from kvcompile.runtimes.calibrate import KVStats
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.perplexity import decode_path_scores
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.tflite import TFLiteSession
from kvcompile.targets import nnapi
from kvcompile.targets.onnx_to_tf import tf_function
from kvcompile.targets.static import static_plan, static_target_io, verification_windows

FOLDER = "tflite"
COMPARE_STEPS = 16


def convert(onnx_model: onnx.ModelProto) -> bytes:
    """ONNX static decode graph -> .tflite bytes, builtin ops only."""
    try:
        import tensorflow as tf
    except ImportError:
        raise TargetError("tflite: converting needs tensorflow-cpu (pip install kvcompile[tflite])") from None

    class DecodeStep(tf.Module):
        def __init__(self):
            super().__init__()
            self.serving_default = tf_function(onnx_model)

    module = DecodeStep()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serving_default.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def convert_in_child(onnx_path: Path, tflite_path: Path) -> None:
    """Run `convert` in a fresh Python process.

    TensorFlow's converter segfaults in a process that has already loaded the QNN HTP backend
    (`--target all` compiles qnn-htp first), and it leaves ~1 GB of TensorFlow behind; a child
    process keeps the compiler's own address space clean of both.
    """
    result = subprocess.run([sys.executable, "-m", "kvcompile.targets.tflite", str(onnx_path), str(tflite_path)],
                            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0 or not tflite_path.is_file():
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {result.returncode}"
        raise TargetError(f"tflite: TFLiteConverter failed: {detail}")


def compare_with_onnxruntime(tflite: Decoder, ort: Decoder, token_ids: np.ndarray) -> dict:
    """Same inputs to both at every step (onnxruntime's cache): logits and new-slot codes."""
    cache = ort.new_cache(1)
    worst, cosines, codes_equal = 0.0, [], True
    for t in range(COMPARE_STEPS):
        feeds = ort._feeds(cache, token_ids[None, t : t + 1])
        ours = dict(zip(tflite.output_names, tflite.session.run(tflite.output_names, feeds)))
        logits, presents = ort.step(cache, token_ids[None, t : t + 1])
        a, b = ours[ort.io.logits][0, -1], logits[0, -1]
        worst = max(worst, float(np.abs(a - b).max()))
        cosines.append(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))
        codes_equal &= all(np.array_equal(ours[k.output], presents[k.output]) for k in ort.io.kv)
    return {"logits_cosine_min": round(min(cosines), 6), "logits_max_abs_diff": round(worst, 6),
            "new_slot_codes_identical": bool(codes_equal), "steps_compared": COMPARE_STEPS}


def emit(float_path: Path, float_decoder: Decoder, kv: KVGraph, plan: QuantPlan, stats: KVStats, stage: Path,
         eval_windows: np.ndarray, context: int, quality_gate_pct: float) -> tuple[TargetIO, dict]:
    folder = stage / FOLDER
    folder.mkdir()
    chosen, notes = static_plan(kv, stats, plan)
    model, used = nnapi.nnapi_graph(float_path, kv, chosen, context)
    onnx_path = folder / "model.onnx"
    save_model(model, onnx_path)
    tflite_path = folder / "model.tflite"
    convert_in_child(onnx_path, tflite_path)
    onnx_path.unlink()  # the intermediate ONNX graph is the nnapi target's own artifact
    io = static_target_io(kv, used, model, f"{FOLDER}/{tflite_path.name}", context, packed=True)
    session = TFLiteSession(tflite_path)
    ops = session.op_names()
    if any("Flex" in op or op == "CUSTOM" for op in ops):
        raise TargetError(f"tflite: the converted model needs non-builtin ops: {ops}")
    tflite = Decoder(session, io)
    save_model(model, folder / "reference.onnx")
    agreement = compare_with_onnxruntime(tflite, Decoder(cpu_session(folder / "reference.onnx"), io),
                                         eval_windows.reshape(-1))
    (folder / "reference.onnx").unlink()
    windows = verification_windows(eval_windows, nnapi.VERIFY_WINDOWS, nnapi.VERIFY_WINDOW, context)
    float_score, score = decode_path_scores([float_decoder, tflite], windows, prefill=8, batch=1)
    delta = 100.0 * (score.ppl / float_score.ppl - 1.0)
    note = {
        "artifact": f"{FOLDER}/{tflite_path.name}",
        "ran": True,
        "ran_on": "ai-edge-litert interpreter (LiteRT)",
        "max_context": context,
        "ops": ops,
        "io_dtypes": session.io_dtypes(),
        "kv_storage": "uint8, two 4-bit codes per byte, unpacked and packed in-graph with TFLite builtins "
                      "(float arithmetic: FLOOR, MUL, ADD, SUB, CAST)",
        "plan_changes": notes,
        "agreement_with_onnxruntime": agreement,
        "quality": {"float_ppl": round(float_score.ppl, 4), "tflite_ppl": round(score.ppl, 4),
                    "ppl_delta_pct": round(delta, 4), "top1_agreement": round(score.top1_agreement, 5),
                    "eval_tokens": score.tokens, "passed": delta <= quality_gate_pct},
    }
    return io, note


if __name__ == "__main__":  # convert_in_child: python -m kvcompile.targets.tflite MODEL.onnx OUT.tflite
    try:
        Path(sys.argv[2]).write_bytes(convert(onnx.load(sys.argv[1])))
    except TargetError as exc:
        sys.exit(str(exc))
