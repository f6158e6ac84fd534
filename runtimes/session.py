"""onnxruntime sessions for the CPU execution provider.

Sessions never load custom-op libraries (a model cannot make kvcompile execute its code) and run
with a fixed thread count, so measurements are comparable between runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as _ort_state

from kvcompile.runtimes.weights import WeightPool

# What onnxruntime raises when it cannot load or run a model (none derive from RuntimeError).
ORT_ERRORS = tuple(getattr(_ort_state, name) for name in (
    "EPFail", "EngineError", "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel",
    "NoSuchFile", "NotFound", "NotImplemented", "RuntimeException"))


def cpu_session(model: Path | bytes, threads: int = 0, optimize: bool = True,
                as_written_qdq: bool = False, weights: WeightPool | None = None) -> ort.InferenceSession:
    """An InferenceSession on the CPU EP (threads=0 lets onnxruntime pick).

    `as_written_qdq`: a QDQ graph computed as written (DequantizeLinear, the float op, then
    QuantizeLinear), the reference for a fixed-point backend. By default onnxruntime fuses each
    DequantizeLinear(int8 weight) -> MatMul into MatMulNBits, which quantizes the activations to
    int8 as well (accuracy level 4): SmolLM2's QDQ graph at 256 tokens lost KL 0.0103 to the float
    graph that way, 0.0066 as written (README, qnn-htp).
    `weights`: take the model's external weights from this pool (one resident copy for every
    session of a compile), do not prepack them (a packed copy is private to its session) unless
    the graph runs a kernel that needs it (`weights.NEEDS_PREPACKING`), read transposed weights as
    stored (`weights.read_transposed_weights_in_place`), and allocate without an arena (the memory
    of a large step returns to the system after it)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors arrive as exceptions; the log would repeat them on stderr
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if as_written_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if weights is not None and not isinstance(model, bytes):
        shared = weights.initializers(Path(model))
        if not shared.prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False  # an arena keeps its largest step's memory for the session's life
        for name, value in shared.values.items():
            options.add_initializer(name, value)
        if shared.graph is not None:  # the graph reads transposed weights in place; the rest of its data is here
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(model).parent))
        session = ort.InferenceSession(shared.graph or str(model), options, providers=["CPUExecutionProvider"])
        session.weight_pool = weights  # onnxruntime reads the pool's arrays: they must live as long as the session
        return session
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# A decode loop hands freed memory back every this many steps. Each step's cache outputs are a
# little larger than the last step's, so the C library's heap cannot reuse what the previous step
# freed and keeps growing: SmolLM2's float-slot artifact, 6 windows over 1,024 steps, ended with a
# 300 MiB heap of which 160 MiB was free (anonymous memory +233 MiB; +97 MiB returning it every 16
# steps, at the same 83-85 ms a step; every step: 120 ms a step, the pages fault in again).
RETURN_FREED_EVERY = 16


def return_freed_memory() -> None:
    """Ask the C library to hand freed heap memory back to the system (glibc's malloc_trim).
    A session's prepacked weights are freed into the heap when the session goes, and the heap
    keeps them; the ORT-format converter that runs after the compile's sessions needs it back."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


# Qualcomm SoCs kvcompile compiles for: (QNN soc_model id, HTP architecture).
QNN_SOCS = {
    "SM8450": (42, 69),  # Snapdragon 8 Gen 1
    "SM8550": (43, 73),  # Snapdragon 8 Gen 2
    "SM8650": (57, 75),  # Snapdragon 8 Gen 3
    "SM8750": (69, 79),  # Snapdragon 8 Elite
    "SM8850": (87, 81),  # Snapdragon 8 Elite Gen 5
}
QNN_EP = "QNNExecutionProvider"
_qnn_registered = False


def qnn_provider_options(soc: str) -> dict[str, str]:
    """The HTP backend for `soc`. Float values run in float16 (`enable_htp_fp16_precision`,
    onnxruntime-qnn's default, set so it does not depend on one): a whole fp16 graph, and the
    float part of a quantized graph (its residual stream, `qnn_htp.residual_stream_nodes`)."""
    soc_model, htp_arch = QNN_SOCS[soc]
    # Graph I/O quantization stays on the HTP (not offloaded to the CPU EP), so a model loaded
    # with CPU fallback disabled proves that every node runs on the HTP.
    return {"backend_type": "htp", "soc_model": str(soc_model), "htp_arch": str(htp_arch),
            "offload_graph_io_quantization": "0", "enable_htp_fp16_precision": "1"}


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """The QNN libraries print to the process's stdout; keep it clean (`--json`) by sending
    native writes to stderr while they load."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _qnn_options(soc: str) -> ort.SessionOptions:
    """Session options on onnxruntime-qnn's HTP backend for `soc`, CPU fallback off."""
    global _qnn_registered
    import onnxruntime_qnn

    if not _qnn_registered:
        with _native_stdout_to_stderr():
            ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        _qnn_registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(devices, qnn_provider_options(soc))
    return options


def _enable_context(options: ort.SessionOptions, context_file: Path) -> None:
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(context_file))
    options.add_session_config_entry("ep.context_embed_mode", "0")


def _session(model: Path | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    with _native_stdout_to_stderr():
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options)


def qnn_session(model: Path | bytes, soc: str, context_file: Path | None = None,
                shared: bool = False) -> ort.InferenceSession:
    """A session on onnxruntime-qnn's HTP backend (a simulator on x86 Linux), CPU fallback off.

    With `context_file`, creating the session compiles the graph ahead of time and writes an
    EPContext model there (with its QNN context binary next to it). Compile from the model's
    bytes where it has no external data: onnxruntime names the compiled partition after a hash
    of the path it loaded the model from, else of the graph's value names, and that name is
    written into both files (a compile into another folder would otherwise differ).
    `shared`: load an EPContext model whose context binary other sessions share
    (`compile_shared_qnn_context`; only where `loads_shared_qnn_contexts`)."""
    options = _qnn_options(soc)
    if context_file is not None:
        _enable_context(options, context_file)
    if shared:
        options.add_session_config_entry("ep.share_ep_contexts", "1")
    return _session(model, options)


def loads_shared_qnn_contexts() -> bool:
    """Whether this machine can load a weight-shared QNN context binary: onnxruntime-qnn writes
    them on x86 but loads them only on an ARM64 device (its own tests run them only there; on
    x86 the HTP simulator fails with QNN_COMMON_ERROR_NOT_SUPPORTED or crashes)."""
    return platform.machine().lower() in ("aarch64", "arm64")


def compile_shared_qnn_context(models: list[tuple[Path | bytes, Path]], soc: str) -> None:
    """Compile several graphs (model, EPContext model to write) into ONE QNN context binary with
    HTP weight sharing: a weight that every graph holds under the same name and with the same
    quantized values is stored once. onnxruntime-qnn's flow: each session sets
    `ep.share_ep_contexts`, the last also `ep.stop_share_ep_contexts`; only that one writes the
    .bin (named after the first EPContext model), and every EPContext model points to it. The
    graphs must differ in their value names (`qnn_session`: a partition is named after them)."""
    for index, (model, context_file) in enumerate(models):
        options = _qnn_options(soc)
        _enable_context(options, context_file)
        options.add_session_config_entry("ep.share_ep_contexts", "1")
        if index == len(models) - 1:
            options.add_session_config_entry("ep.stop_share_ep_contexts", "1")
        _session(model, options)
