"""`kvcompile inspect`: what the analysis finds in a model and what a compile would do with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcompile.kvgraph import GROUP_QUERY_ATTENTION, KVGraph
from kvcompile.model_io import load_model
from kvcompile.passes.normalize import normalize_export
from kvcompile.pipeline import analyze
from kvcompile.report import layout_name


def would_do(kv: KVGraph) -> str:
    """What a default compile would do with this cache, by how the cache is kept."""
    appended = [t for t in kv.tensors if t.concat_node is not None]
    fused = [t for t in kv.tensors if t.attention == GROUP_QUERY_ATTENTION]
    kept = sorted({t.attention for t in kv.tensors if t not in appended and t not in fused})
    if kept:
        return (f"refuse it: the cache is kept inside {', '.join(kept)} (its past/present slots), which kvcompile "
                "does not rewrite")
    parts = []
    if appended:
        sliding = " (sliding-window caches stay bounded)" if any(t.kept_entries for t in appended) else ""
        parts.append(f"store the {len(appended)} Concat-appended cache tensors in 4 bits (uint8 graph I/O, two codes "
                     f"per byte along head_dim){sliding}, fusing decomposed attention into GroupQueryAttention "
                     "where the fused float model reproduces the original, else dequantizing in-graph (Q/DQ)")
    if fused:
        parts.append(f"give the {len(fused)} GroupQueryAttention cache tensors the kernel's own 4-bit cache")
    return "; ".join(parts) + ", with calibrated scales chosen by auto, then verify perplexity through the decode path"


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
