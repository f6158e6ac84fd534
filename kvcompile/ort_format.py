"""Running onnxruntime's ORT-format converter on a graph kvcompile prepared for it.

The ORT format is one FlatBuffer holding the optimised graph and every weight inline. The
converter needs about twice the weights in its own process (987 MiB for SmolLM2's 517 MiB, reached
while onnxruntime initializes the session, likely with the weights held twice; the FlatBuffer comes
after, at about 610 MiB in all). The graph is prepared by the compile
(`targets.ort_cpu.prepare_ort_format`, which needs onnx); the conversion itself is here, in a
module that imports nothing heavy, so that the CLI's small parent process can run it after the
compile's process has exited (`kvcompile.compile_process`) and the two never overlap.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvcompile.errors import TargetError, how_process_ended

# What onnxruntime's converter (`onnxruntime.tools.convert_onnx_models_to_ort`, optimization style
# Fixed, level all, target ARM) does to write the file: one session that saves its optimized graph in
# the ORT format. Done here rather than through the tool: importing `onnxruntime.tools` imports
# torch where it is installed, and the tool then reloads the file it wrote to list its operators;
# without prepacking and the arena (neither changes the file) SmolLM2's conversion peaked at
# 1,289 MiB instead of the tool's 2,008.
# The converter process imports onnxruntime alone (not onnx, not kvcompile: 24 MiB less next to
# the weights and the FlatBuffer it holds) and reads the graph kvcompile wrote for it (argv[1]).
_CONVERT = """
import sys
import onnxruntime as ort
with open(sys.argv[1], "rb") as f:
    graph = f.read()
options = ort.SessionOptions()
options.optimized_model_filepath = sys.argv[2]
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.add_session_config_entry("session.qdqisint8allowed", "1")
options.add_session_config_entry("session.save_model_format", "ORT")
options.add_session_config_entry("session.disable_prepacking", "1")
options.add_session_config_entry("session.model_external_initializers_file_folder_path", ".")
options.enable_cpu_mem_arena = False
ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
"""
_ADDR_NO_RANDOMIZE = 0x0040000
# The converter's whole environment: nothing of the caller's (see run_converter).
CONVERTER_ENV = {"PYTHONHASHSEED": "0", "LC_ALL": "C"}
WORK_FOLDER = ".ort-format"  # next to the model, whose weights the graph reads by relative path
GRAPH_NAME = "graph.onnx"


@dataclass(frozen=True)
class PendingConversion:
    """An ORT-format file still to write: `WORK_FOLDER/GRAPH_NAME` next to the model holds the
    graph prepared for the converter, and `target` is where the file goes."""

    target: Path  # <model's folder>/model.ort

    @property
    def work(self) -> Path:
        return self.target.parent / WORK_FOLDER


@dataclass(frozen=True)
class ConverterRun:
    """What the conversion cost: the report's timings and peak memory."""

    seconds: float
    peak_rss_mib: int  # the converter process's own peak


def _without_address_randomization() -> None:
    ctypes.CDLL(None, use_errno=True).personality(_ADDR_NO_RANDOMIZE)


def run_converter(pending: PendingConversion) -> ConverterRun:
    """Write `pending.target` from the prepared graph, then remove the work folder (also on failure).

    The converter writes some tables in the iteration order of pointer-keyed hash maps, so the
    file depends on where the process's allocations land. It runs in a child process with
    address-space randomization off (Linux personality ADDR_NO_RANDOMIZE), in the model's folder
    with the same relative arguments whatever the output folder is called, and with a fixed
    environment: the length of an absolute path, or of the caller's environment variables,
    shifted the allocations (a compile into another folder, or from another shell, wrote
    different bytes). The same model then gives a byte-identical file (tested) with the same
    Python installation. The process is waited for with `os.wait4`, whose usage figures are this
    process's alone (RUSAGE_CHILDREN would give the largest of every child so far)."""
    work, target = pending.work, pending.target
    try:
        started = time.perf_counter()
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                [sys.executable, "-c", _CONVERT, f"{WORK_FOLDER}/{GRAPH_NAME}", f"{WORK_FOLDER}/{target.name}"],
                stdout=subprocess.DEVNULL, stderr=stderr, cwd=target.parent, env=CONVERTER_ENV,
                preexec_fn=_without_address_randomization)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            if process.returncode != 0:
                stderr.seek(0)
                last = (stderr.read().decode(errors="replace").strip().splitlines() or [f"the converter process {how_process_ended(status)}"])[-1]
                raise TargetError(f"onnxruntime could not convert the ort-cpu model to the ORT format: {last}")
        (work / target.name).replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ConverterRun(seconds=round(time.perf_counter() - started, 3), peak_rss_mib=round(usage.ru_maxrss / 1024))
