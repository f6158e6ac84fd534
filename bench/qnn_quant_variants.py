"""Where qnn-htp's quantized (QDQ) error comes from: the float static decode graph kvcompile
quantizes for the HTP (its 4-bit cache included), re-quantized under weight and activation-range
variants, each QDQ graph run on the CPU EP through the decode path against that float graph.

    python -m bench.qnn_quant_variants MODEL.onnx OUT [--max-context 256] [--windows 2]
        [--variants uint8,uint16,int8pc,int8pc+h2,int8pc+h2+fres,int8pc+h2+fres+m100,int8pc+c8+h1.5]

kvcompile's own pipeline runs `MODEL --target qnn-htp --max-context N --prefill-len 0` up to
qnn-htp's quantization step and stops there, keeping the float static graph, its TargetIO and the
calibration ids in OUT (reused by a later run on the same OUT). A variant is the MatMul weights
(`uint8`: onnxruntime's QNN config, every weight uint8 per tensor; `uint16`: every weight uint16
per tensor; `int8pc`: kvcompile's int8 per output channel), then `+hX` for X times headroom on
the text-dependent activation ranges (default 1: as calibrated), `+cN` for calibration steps
from N windows of the calibration text (default 1, as kvcompile), `+fres` for the residual
stream left float and `+mN` (with +fres) for the MatMuls writing into it whose calibrated output
reaches N times their median left float too (kvcompile's default is `int8pc+h2+fres+m100`). Measured on `--windows`
held-out windows of the buffer's length; the comparison is with the float static graph, so the
figures are the whole model's fixed point, not the cache's. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from kvcompile import pipeline
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.verify import decode_quality
from kvcompile.targets import qnn_htp
from kvcompile.tokens import bundled_text, load_token_ids

WEIGHTS = {"uint8": "uint8", "uint16": "uint16", "int8pc": qnn_htp.PER_CHANNEL_WEIGHTS}


class _Stop(Exception):
    pass


def capture_static_graph(model: Path, out: Path, context: int) -> dict:
    """Run the pipeline for qnn-htp until it quantizes; keep what quantization reads."""
    kept = out / "captured.pkl"
    if kept.exists():
        return pickle.loads(kept.read_bytes())

    def keep(folder, graphs, static_paths, io, calib_ids):
        path = static_paths["model"]
        for part in path.parent.glob(path.name + "*"):
            shutil.copy(part, out / part.name)
        kept.write_bytes(pickle.dumps({"io": io, "calib_ids": calib_ids, "static": path.name}))
        raise _Stop

    real = qnn_htp.quantize_graphs
    qnn_htp.quantize_graphs = keep
    try:
        pipeline.compile_model(pipeline.CompileOptions(model=model, out_dir=out / "compile", targets=("qnn-htp",),
                                                       max_context=context, prefill_len=0, calib_tokens=4096,
                                                       eval_tokens=2048))
    except _Stop:
        pass
    finally:
        qnn_htp.quantize_graphs = real
    return pickle.loads(kept.read_bytes())


@dataclasses.dataclass(frozen=True)
class Variant:
    """One quantization variant, parsed from its spec (module docstring)."""

    weights: str
    headroom: float = 1.0
    calib_windows: int = 1
    float_residual: bool = False
    massive_ratio: float | None = None


def parse_variant(spec: str) -> Variant:
    parts = spec.split("+")
    if parts[0] not in WEIGHTS:
        raise SystemExit(f"weights {parts[0]!r}: choose from {', '.join(WEIGHTS)}")
    variant = Variant(WEIGHTS[parts[0]])
    for part in parts[1:]:
        if part == "fres":
            variant = dataclasses.replace(variant, float_residual=True)
        elif part.startswith("h"):
            variant = dataclasses.replace(variant, headroom=float(part[1:]))
        elif part.startswith("c"):
            variant = dataclasses.replace(variant, calib_windows=int(part[1:]))
        elif part.startswith("m"):
            variant = dataclasses.replace(variant, massive_ratio=float(part[1:]))
        else:
            raise SystemExit(f"unknown variant part {part!r} in {spec!r}")
    if variant.massive_ratio is not None and not variant.float_residual:
        raise SystemExit(f"{spec!r}: +mN leaves MatMuls float beside a float residual stream; add +fres")
    return variant


def calibration_feeds(decoder: Decoder, calib_ids: np.ndarray, windows: int) -> list[dict[str, np.ndarray]]:
    """qnn-htp's calibration steps, spread over `windows` windows of the calibration text."""
    width = decoder.io.max_context - 1
    steps = qnn_htp.CALIBRATION_STEPS // windows
    return [feed for w in range(windows)
            for feed in qnn_htp.calibration_feeds(decoder, calib_ids[w * width : (w + 1) * width], steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-context", type=int, default=256)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--variants", default="uint8,int8pc,int8pc+h2,int8pc+h2+fres,int8pc+h2+fres+m100")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kept = capture_static_graph(args.model, args.out, args.max_context)
    io, calib_ids, static = kept["io"], kept["calib_ids"], args.out / kept["static"]
    position_inputs = {i.name for i in io.inputs if i.role in qnn_htp.POSITION_ROLES}
    tokenizer = args.model.parent / "tokenizer.json"
    width = io.max_context - 1
    held_out = load_token_ids(bundled_text("heldout.txt"), tokenizer if tokenizer.exists() else None, None)
    windows = held_out[: args.windows * width].reshape(args.windows, width)
    float_static = Decoder(cpu_session(static), io)
    for spec in args.variants.split(","):
        variant = parse_variant(spec)
        started = time.perf_counter()
        qdq = args.out / f"{spec}.qdq.onnx"
        float_matmuls = qnn_htp.quantize_qdq(static, calibration_feeds(float_static, calib_ids, variant.calib_windows),
                                             qdq, position_inputs, headroom=variant.headroom, weights=variant.weights,
                                             float_residual=variant.float_residual,
                                             massive_ratio=variant.massive_ratio)
        quality = decode_quality(float_static, Decoder(cpu_session(qdq, as_written_qdq=True), io), windows, prefill=8, batch=1,
                                 gate_pct=2.0, text="bundled heldout.txt", ran_on="onnxruntime CPU EP")
        print(json.dumps({"variant": spec, "max_context": io.max_context, "float_ppl": quality.float_ppl,
                          "qdq_ppl": quality.quantized_ppl, "ppl_delta_pct": quality.ppl_delta_pct,
                          "top1_agreement": quality.top1_agreement, "mean_kl": quality.mean_kl,
                          "predictions": quality.eval_tokens, "float_matmuls": float_matmuls,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
