"""Running a .tflite model with the LiteRT interpreter (ai-edge-litert, or tflite-runtime).

`TFLiteSession` offers the one method the decode loop uses from an onnxruntime session,
`run(output_names, feeds)`, on top of the model's serving signature, so the same Decoder drives
TFLite artifacts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def interpreter_class():
    """ai-edge-litert's Interpreter (the maintained LiteRT package), else tflite-runtime's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return None
    return Interpreter


class TFLiteSession:
    def __init__(self, model: Path):
        interpreter = interpreter_class()
        if interpreter is None:
            raise RuntimeError("no TFLite interpreter: install ai-edge-litert (pip install kvcompile[tflite])")
        self.interpreter = interpreter(model_path=str(model))
        self.interpreter.allocate_tensors()
        self.runner = self.interpreter.get_signature_runner()

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.runner(**feeds)
        return [outputs[name] for name in output_names]

    def op_names(self) -> list[str]:
        return sorted({op["op_name"] for op in self.interpreter._get_ops_details()})

    def io_dtypes(self) -> dict[str, str]:
        """Signature input and output names -> numpy dtype names."""
        details = {**self.runner.get_input_details(), **self.runner.get_output_details()}
        return {name: np.dtype(d["dtype"]).name for name, d in sorted(details.items())}
