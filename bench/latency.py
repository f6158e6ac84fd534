"""Decode-step latency vs context on ORT CPU: float, kvcompile's Q/DQ artifact, the fused one.

All four models are timed in one run, round-robin at each context (runtimes.latency: median of
interleaved steps, batch 1, one new token against context - 1 cached tokens bound with IOBinding),
single-threaded so two shared cores' scheduling does not blur the comparison.
  float        the fixture as exported (decomposed attention, float32 cache)
  fused float  the same fused into GroupQueryAttention, cache still float32 (what fusion alone buys)
  q/dq 4-bit   kvcompile --fuse-attention off: 4-bit cache, dequantized to float in-graph each step
  fused 4-bit  kvcompile's default: GroupQueryAttention reading its 4-bit cache
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common

from kvcompile.errors import QualityGateError
from kvcompile.manifest import float_model_io, read_manifest
from kvcompile.model_io import load_model
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.fuse_gqa import fuse_attention_passes
from kvcompile.passes.manager import run_passes
from kvcompile.pipeline import CompileOptions, compile_model
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.latency import compare_decode_latency
from kvcompile.runtimes.session import cpu_session

CONTEXTS = (256, 1024, 2048, 4096)
THREADS = 1


def _decoder(path: Path) -> Decoder:
    kv = find_kv_cache(load_model(path))
    return Decoder(cpu_session(path, threads=THREADS), float_model_io(kv, str(path)))


def _compiled(out: Path) -> Decoder:
    io = read_manifest(out).targets["ort-cpu"]
    return Decoder(cpu_session(out / io.model, threads=THREADS), io)


def latency_rows(model: Path, work: Path, contexts: tuple[int, ...] = CONTEXTS) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    fused_float = load_model(model)
    run_passes(fused_float, *fuse_attention_passes(find_kv_cache(fused_float), "input_ids"))
    ir.save(fused_float, work / "fused_float.onnx", external_data="fused_float.onnx.data")  # the weights, moved
    # A gate of 0% fails any 4-bit cache, which makes the compile add its float slots (the form a
    # model that fails the gate without them ships): timed next to the fused cache without them.
    for name, fuse, gate in (("qdq", "off", 100.0), ("fused", "auto", 100.0), ("fused-slots", "auto", 0.0)):
        try:
            compile_model(CompileOptions(model=model, out_dir=work / name, fuse_attention=fuse, scheme="per-channel",
                                         calib_tokens=2048, eval_tokens=1024, quality_gate_pct=gate))
        except QualityGateError:
            pass  # the artifact is written; only its speed is measured here
    decoders = {
        "float": _decoder(model),
        "fused float": _decoder(work / "fused_float.onnx"),
        "q/dq 4-bit": _compiled(work / "qdq"),
        "fused 4-bit": _compiled(work / "fused"),
    }
    if read_manifest(work / "fused-slots").targets["ort-cpu"].options.float_slots:
        decoders["fused 4-bit + float slots"] = _compiled(work / "fused-slots")
    kv = find_kv_cache(load_model(model))
    float_bytes = sum(t.elements_per_token for t in kv.tensors) * 4
    rows = []
    for context in contexts:
        seconds = compare_decode_latency(decoders, context)
        rows.append({
            "context": context,
            "ms": {name: round(s * 1000, 3) for name, s in seconds.items()},
            "ratio_to_float": {name: round(s / seconds["float"], 3) for name, s in seconds.items()},
            "kv_bytes": {"float32": float_bytes * context, "float16": float_bytes * context // 2,
                         "4-bit": float_bytes * context // 8},
        })
    return rows


def latency_table(rows: list[dict]) -> str:
    names = list(rows[0]["ms"])
    lines = ["| context | " + " | ".join(f"{n} ms (x float)" for n in names) + " | KV MiB fp32 / fp16 / 4-bit |",
             "| --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for row in rows:
        cells = " | ".join(f"{row['ms'][n]:.2f} ({row['ratio_to_float'][n]:.2f}x)" for n in names)
        kv = row["kv_bytes"]
        lines.append(f"| {row['context']} | {cells} | {kv['float32'] / 2**20:.1f} / {kv['float16'] / 2**20:.1f} / "
                     f"{kv['4-bit'] / 2**20:.2f} |")
    return "\n".join(lines)
