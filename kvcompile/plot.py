"""report.png: the memory wall (KV bytes vs context against the device) and the per-layer plan.

Left panel: KV-cache bytes as the context grows, for float16, plain 8-bit and 4-bit codes
and this compile (every stored byte), against the device's on-chip memory and the RAM budget;
where this compile's line crosses each, the context is marked. Right panel: bits per element
of each layer's K and V as stored, and the SQNR each reaches on the calibration set.
The PNG carries no timestamp or version metadata, so it is byte-identical across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from kvcompile.memory_wall import format_bytes  # noqa: E402

COLORS = {"fp16": "#8c8c8c", "int8": "#6baed6", "int4": "#2171b5", "compiled": "#d94801"}


def _tokens(value: float, _position: Any = None) -> str:
    return f"{value / 1024:g}K" if value >= 1024 else f"{value:g}"


def _kv_panel(ax, wall: dict[str, Any]) -> None:
    per_token = wall["kv_bytes_per_token"]
    static = wall["static_bytes"]
    budget = wall["budget_bytes"]
    on_chip = wall["device"]["on_chip_bytes"]
    top = max(budget, on_chip or 0) * 4
    last = max(1 << 17, 1 << int(np.ceil(np.log2(top / per_token["compiled"]))))
    context = np.unique(np.geomspace(128, last, 200).astype(np.int64))
    lines = [("fp16", "float16", per_token["fp16"], 0.0),
             ("int8", "8-bit codes, no scales", per_token["int8"], 0.0),
             ("int4", "4-bit codes, no scales", per_token["int4"], 0.0),
             ("compiled", "this compile (every stored byte)", per_token["compiled"], static)]
    for key, label, bytes_per_token, fixed in lines:  # the codes-only lines drawn over this compile's
        ax.plot(context, bytes_per_token * context + fixed, color=COLORS[key], label=label,
                linewidth=3.2 if key == "compiled" else 1.4, linestyle="-" if key in ("fp16", "compiled") else "--",
                zorder=2 if key == "compiled" else 3)

    def limit(capacity: float, name: str, fit: dict[str, int], style: str) -> None:
        # Named in the legend, which sits in the empty lower-right triangle under the curves;
        # a label on the line itself collides with the curves where they cross it.
        ax.axhline(capacity, color="black", linestyle=style, linewidth=1, label=f"{name}: {format_bytes(capacity)}")
        for key, offset, align in (("fp16", (-6, 5), "right"), ("compiled", (6, -13), "left")):
            if fit[key]:
                ax.plot([fit[key]], [capacity], "o", color=COLORS[key], markersize=6, zorder=5)
                ax.annotate(f"{fit[key]:,} tokens", (fit[key], capacity), textcoords="offset points",
                            xytext=offset, ha=align, fontsize=8, color=COLORS[key], fontweight="bold",
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.8})

    if on_chip:
        limit(on_chip, f"on chip: {wall['device']['on_chip_kind']}", wall["on_chip_fit_tokens"], ":")
    limit(budget, "KV budget", wall["budget_fit_tokens"], "-.")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: format_bytes(v)))
    ax.set_xlim(context[0], context[-1])
    ax.set_ylim(per_token["int4"] * context[0] / 2, top)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache bytes")
    note = "" if on_chip else " (on-chip size not published)"
    ax.set_title(f"KV cache vs context on {wall['device']['name']}{note}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _layer_panel(ax, tensors: list[dict[str, Any]]) -> None:
    layers = sorted({t["layer"] for t in tensors})
    x = np.arange(len(layers))
    width = 0.38
    sqnr_ax = ax.twinx()
    for offset, kind, color in ((-width / 2, "key", "#2171b5"), (width / 2, "value", "#6baed6")):
        rows = {t["layer"]: t for t in tensors if t["kind"] == kind}
        bits = [rows[layer]["stored_bits_per_element"] if layer in rows else 0 for layer in layers]
        ax.bar(x + offset, bits, width, color=color, label=f"{kind} bits/element")
        sqnr = [rows[layer]["sqnr_db"] if layer in rows and rows[layer]["sqnr_db"] is not None else np.nan
                for layer in layers]
        sqnr_ax.plot(x + offset, sqnr, "D", color="#d94801", markersize=5,
                     markerfacecolor="white" if kind == "value" else "#d94801", label=f"{kind} SQNR")
    ax.set_xticks(x, [f"L{layer}" for layer in layers], fontsize=8 if len(layers) <= 32 else 6)
    ax.set_ylabel("stored bits per element")
    ax.set_ylim(0, max(9, max(t["stored_bits_per_element"] for t in tensors) + 1))
    sqnr_ax.set_ylabel("SQNR on calibration data (dB)", color="#d94801")
    sqnr_ax.set_ylim(0, max(40.0, np.nanmax([t["sqnr_db"] or 0 for t in tensors]) + 5))
    measured = any(t["sqnr_db"] is not None for t in tensors)
    ax.set_title("per layer: bits as stored and SQNR" if measured else
                 "per layer: bits as stored (SQNR not measured: --no-calibration)", fontsize=10)
    handles = ax.get_legend_handles_labels()
    sqnr_handles = sqnr_ax.get_legend_handles_labels()
    ax.legend(handles[0] + sqnr_handles[0], handles[1] + sqnr_handles[1], fontsize=8, loc="upper right", ncol=2)


def write_plot(report: dict[str, Any], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    _kv_panel(left, report["memory_wall"])
    _layer_panel(right, report["kv"]["tensors"])
    figure.suptitle(f"kvcompile: {report['source']['path']}  ({report['memory']['avg_bits_per_element']:.2f} "
                    f"bits/element, {report['memory']['ratio_vs_fp16']:.2f}x smaller than float16)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
