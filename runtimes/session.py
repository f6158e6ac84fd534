"""onnxruntime sessions for the CPU execution provider.

Sessions never load custom-op libraries (a model cannot make kvcompile execute its code) and run
with a fixed thread count, so measurements are comparable between runs.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def cpu_session(model: Path | bytes, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    """An InferenceSession on the CPU EP (threads=0 lets onnxruntime pick)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
