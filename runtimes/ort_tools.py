"""onnxruntime's Python tools, loaded without the package that imports torch.

`onnxruntime/tools/__init__.py` imports torch whenever it is installed (for an export helper
kvcompile never calls). In a compile that costs about 200 MiB of resident memory and over a
second, for nothing: torch is installed beside kvcompile to build models, not to compile them.
A tool module that imports no sibling module is loaded here from its file instead, under its
own name (its logger keeps its name), so the package's `__init__` never runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_tool(name: str) -> ModuleType:
    """`onnxruntime.tools.<name>` without running `onnxruntime/tools/__init__.py`."""
    qualified = f"onnxruntime.tools.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    runtime = importlib.util.find_spec("onnxruntime")
    path = Path(runtime.origin).parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(qualified, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[qualified]
        raise
    return module
