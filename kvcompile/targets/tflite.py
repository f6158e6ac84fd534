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

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import onnx

from kvcompile.errors import TargetError
from kvcompile.kvgraph import KVGraph
from kvcompile.manifest import TargetIO
from kvcompile.model_io import remove_model, save_model
from kvcompile.quality import TargetQuality
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.tflite import TFLiteSession
from kvcompile.runtimes.verify import agreement, decode_quality
from kvcompile.targets import nnapi
from kvcompile.targets.base import Artifact, LoweringInput, TargetOptions, VerifyInput
from kvcompile.targets.onnx_to_tf import tf_module
from kvcompile.targets.static import (
    STATIC_CAPABILITIES,
    VERIFY_PREFILL,
    check_static,
    static_target_io,
    long_verification_windows,
)

FOLDER = "tflite"
REFERENCE = "reference.onnx"
COMPARE_STEPS = 16


def convert(onnx_path: Path) -> bytes:
    """ONNX static decode graph -> .tflite bytes, builtin ops only. The ONNX model is released
    once TensorFlow holds its weights (`tf_module`)."""
    try:
        import tensorflow as tf
    except ImportError:
        raise TargetError("tflite: converting needs tensorflow-cpu (pip install kvcompile[tflite])") from None

    module = tf_module(onnx.load(onnx_path))
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
        raise TargetError(f"tflite: TFLiteConverter failed: {_conversion_failure(result)}")


def _conversion_failure(result: subprocess.CompletedProcess) -> str:
    """The converter's own error line, or how the process ended: TensorFlow logs warnings last
    when the process is killed (out of memory on a large model), and those are not the cause."""
    if result.returncode < 0:
        signal = -result.returncode
        return (f"the converter process was killed by signal {signal}"
                + (" (out of memory: TensorFlow holds several copies of the weights while converting)"
                   if signal == 9 else ""))
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith(("WARNING", "INFO", "W0", "I0"))]
    return lines[-1] if lines else f"exit code {result.returncode}"


KV_STORAGE = ("uint8, two 4-bit codes per byte, unpacked and packed in-graph with TFLite builtins "
              "(float arithmetic: FLOOR, MUL, ADD, SUB, CAST)")


class TFLiteTarget:
    name = "tflite"
    runs_on = "ai-edge-litert interpreter (LiteRT)"
    capabilities = STATIC_CAPABILITIES

    def check(self, kv: KVGraph, options: TargetOptions) -> None:
        check_static(self.name, kv)

    def lower(self, lowering: LoweringInput) -> Artifact:
        """Writes tflite/model.tflite (converted from the nnapi target's graph) and
        tflite/reference.onnx (that graph, what verify compares the interpreter with)."""
        context = lowering.options.max_context
        folder = lowering.stage / FOLDER
        folder.mkdir()
        model, used = nnapi.nnapi_graph(lowering.float_path, lowering.float_kv, lowering.plan, context)
        onnx_path = folder / "model.onnx"
        save_model(model, onnx_path)
        tflite_path = folder / "model.tflite"
        convert_in_child(onnx_path, tflite_path)
        remove_model(onnx_path)
        io = static_target_io(lowering.float_kv, used, model, f"{FOLDER}/{tflite_path.name}", context)
        session = TFLiteSession(tflite_path)
        ops = session.op_names()
        if any("Flex" in op or op == "CUSTOM" for op in ops):
            raise TargetError(f"tflite: the converted model needs non-builtin ops: {ops}")
        save_model(model, folder / REFERENCE)
        facts = {"max_context": context, "ops": ops, "io_dtypes": session.io_dtypes()}
        return Artifact(self.name, io, KV_STORAGE, facts)

    def verify(self, artifact: Artifact, verifying: VerifyInput) -> TargetQuality:
        """LiteRT against onnxruntime running the same graph on identical inputs (logits and the new
        entries' codes; LiteRT must follow it: `Agreement.agrees`), then decode-path quality against
        the float model. The reference graph is removed afterwards: the artifact is the .tflite file."""
        tflite = self.open(verifying.folder, artifact.io)
        reference_path = verifying.folder / FOLDER / REFERENCE
        reference = Decoder(cpu_session(reference_path), artifact.io)
        agreement_ = agreement(tflite, reference, verifying.eval_windows.reshape(-1), COMPARE_STEPS,
                               "onnxruntime CPU EP, the same ONNX graph", compare_codes=True)
        remove_model(reference_path)
        windows = long_verification_windows(verifying.eval_windows, artifact.io.max_context)
        quality = decode_quality(verifying.float_decoder, tflite, windows, prefill=VERIFY_PREFILL, batch=1,
                                 gate_pct=verifying.quality_gate_pct, text=verifying.eval_text, ran_on=self.runs_on)
        return dataclasses.replace(quality, passed=quality.passed and agreement_.agrees, agreement=agreement_)

    def open(self, folder: Path, io: TargetIO, soc: str | None = None) -> Decoder:
        return Decoder(TFLiteSession(folder / io.model), io)


TARGET = TFLiteTarget()


if __name__ == "__main__":  # convert_in_child: python -m kvcompile.targets.tflite MODEL.onnx OUT.tflite
    try:
        Path(sys.argv[2]).write_bytes(convert(Path(sys.argv[1])))
    except TargetError as exc:
        sys.exit(str(exc))
