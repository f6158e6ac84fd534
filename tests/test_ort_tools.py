"""onnxruntime's tools without the torch import of their package (runtimes/ort_tools.py)."""

from __future__ import annotations

import subprocess
import sys

from conftest import DYNAMO


def test_symbolic_shape_inference_runs_without_importing_torch():
    """`onnxruntime/tools/__init__.py` imports torch where it is installed (200 MiB resident in a
    compile); the analysis runs the symbolic shape inference without it."""
    script = f"""
import sys
from kvcompile.model_io import load_model
from kvcompile.passes.normalize import normalize_export
from kvcompile.runtimes.ort_tools import load_tool
model = load_model({str(DYNAMO)!r})
normalize_export(model)
assert load_tool("symbolic_shape_infer").SymbolicShapeInference is not None
print("torch" in sys.modules, "onnxruntime.tools" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
