"""Loading a compiled target for running: the right session for each artifact, from the manifest.

  ort-cpu   onnxruntime CPU EP on the .onnx model
  qnn-htp   onnxruntime-qnn's HTP backend on the EPContext model for the chosen SoC (on x86 Linux
            the backend simulates the NPU), CPU fallback disabled
  nnapi     the .ort model on onnxruntime's CPU EP (the NNAPI EP exists only on Android)
  tflite    LiteRT's interpreter
"""

from __future__ import annotations

from pathlib import Path

from kvcompile.errors import BadInputError
from kvcompile.manifest import Manifest
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session, qnn_session
from kvcompile.runtimes.tflite import TFLiteSession

RUNS_ON = {"ort-cpu": "onnxruntime CPU EP", "qnn-htp": "onnxruntime-qnn HTP backend",
           "nnapi": "onnxruntime CPU EP (NNAPI runs on Android only)", "tflite": "LiteRT interpreter"}


def default_target(manifest: Manifest) -> str:
    """ort-cpu when the folder has it (every compile builds it), else the first target."""
    return "ort-cpu" if "ort-cpu" in manifest.targets else sorted(manifest.targets)[0]


def load_decoder(folder: Path, manifest: Manifest, target: str | None = None, soc: str | None = None) -> Decoder:
    target = target or default_target(manifest)
    if target not in manifest.targets:
        raise BadInputError(f"{str(folder)!r} has no {target!r} artifact; it has {', '.join(manifest.targets)}")
    io = manifest.targets[target]
    if target == "qnn-htp":
        socs = io.options["socs"]
        soc = soc or next(iter(socs))
        if soc not in socs:
            raise BadInputError(f"qnn-htp was compiled for {', '.join(socs)}, not {soc}")
        return Decoder(qnn_session(folder / socs[soc]["context_model"], soc), io)
    if target == "tflite":
        return Decoder(TFLiteSession(folder / io.model), io)
    return Decoder(cpu_session(folder / io.model), io)
