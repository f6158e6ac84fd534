"""Loading a compiled target for running: the registry's target opens its artifact.

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
from kvcompile.targets import TARGETS


def runs_on(target: str) -> str:
    return TARGETS[target].runs_on


def default_target(manifest: Manifest) -> str:
    """ort-cpu when the folder has it (every compile builds it), else the first target."""
    return "ort-cpu" if "ort-cpu" in manifest.targets else sorted(manifest.targets)[0]


def load_decoder(folder: Path, manifest: Manifest, target: str | None = None, soc: str | None = None) -> Decoder:
    target = target or default_target(manifest)
    if target not in manifest.targets:
        raise BadInputError(f"{str(folder)!r} has no {target!r} artifact; it has {', '.join(manifest.targets)}")
    if target not in TARGETS:
        raise BadInputError(f"{str(folder)!r} holds a {target!r} artifact, which this kvcompile does not know")
    return TARGETS[target].open(folder, manifest.targets[target], soc)
