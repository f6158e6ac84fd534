"""`kvcompile inspect`: what the analysis finds in a model and what a compile would do with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcompile.kvgraph import DECOMPOSED, KVGraph
from kvcompile.model_io import load_model
from kvcompile.pipeline import analyze, normalize_export
from kvcompile.report import layout_name


def would_do(kv: KVGraph) -> str:
    forms = set(kv.attention_forms)
    if forms == {DECOMPOSED}:
        return ("store every K and V cache tensor in 4 bits (uint8 graph I/O, two codes per byte "
                "along head_dim) with calibrated static scales, dequantized in-graph before "
                "attention (target ort-cpu), then verify perplexity through the decode path")
    other = ", ".join(sorted(forms - {DECOMPOSED}))
    return (f"nothing yet: the cache is read by {other}, which needs the fused quantized-KV "
            "lowering; `kvcompile compile` refuses such models with a message until it lands")


def inspect_model(model_path: Path, kv_map: Path | None = None) -> dict[str, Any]:
    model = load_model(Path(model_path))
    normalize_export(model)
    kv = analyze(model, kv_map)
    return {
        "model": str(model_path),
        "layers": kv.num_layers,
        "discovery": kv.source,
        "attention_forms": list(kv.attention_forms),
        "inputs": [{"name": i.name, "role": i.role, "dtype": i.dtype} for i in kv.inputs],
        "logits": kv.logits_output,
        "fp16_bytes_per_token": kv.fp16_bytes_per_token(),
        "tensors": [
            {
                "label": t.label, "layer": t.layer, "kind": t.kind, "head": t.head,
                "input": t.past_input, "output": t.present_output, "layout": layout_name(t.axes),
                "shape": list(t.past_shape), "kv_heads": t.num_heads, "head_dim": t.head_dim,
                "dtype": t.dtype, "attention": t.attention, "rope": t.rope,
                "projection": t.projection,
            }
            for t in kv.tensors
        ],
        "would_do": would_do(kv),
    }
