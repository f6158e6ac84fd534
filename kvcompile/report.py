"""The compile report (`report.json`, `report.md`): what was done, memory and quality figures.

Memory figures count every stored byte: packed codes plus scales and zero points. Per-token
figures are what one more token adds to the cache (codes and per-token scales);
`avg_bits_per_element` is the same per cache element (what --kv-bits budgets); static scales
are a fixed `static_bytes`; `ratio_vs_fp16` compares the whole cache at `reference_context`
tokens, static scales included, against the same cache in float16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kvcompile.errors import BadInputError
from kvcompile.kvgraph import KVGraph
from kvcompile.memory_wall import format_bytes
from kvcompile.plan import QuantPlan
from kvcompile.quant import sqnr_db
from kvcompile.report_types import MemoryFigures, Report, TensorRow
from kvcompile.kvstats import KVStats

REFERENCE_CONTEXT = 1024


def layout_name(axes) -> str:
    """Axis order as letters: b(atch) h(eads) s(eq) d (head_dim), e.g. "bhsd"; keys stored
    transposed read "bhds"."""
    letters = {axes.batch: "b", axes.seq: "s", axes.head_dim: "d"}
    if axes.heads is not None:
        letters[axes.heads] = "h"
    return "".join(letters[i] for i in sorted(letters))


def memory_figures(kv: KVGraph, plan: QuantPlan, context: int = REFERENCE_CONTEXT) -> MemoryFigures:
    fp16_per_token = kv.fp16_bytes_per_token()
    stored_bits = 0.0
    static_bytes = 0
    for tensor in kv.tensors:
        tensor_plan = plan.for_input(tensor.past_input)
        stored_bits += tensor.elements_per_token * tensor_plan.stored_bits_per_element(tensor)
        static_bytes += tensor_plan.static_bytes()
    quantized_per_token = stored_bits / 8
    elements = sum(t.elements_per_token for t in kv.tensors)
    return MemoryFigures(
        fp16_bytes_per_token=fp16_per_token,
        quantized_bytes_per_token=quantized_per_token,
        static_bytes=static_bytes,
        reference_context=context,
        fp16_bytes_at_reference=fp16_per_token * context,
        quantized_bytes_at_reference=quantized_per_token * context + static_bytes,
        ratio_vs_fp16=round(fp16_per_token * context / (quantized_per_token * context + static_bytes), 4),
        # what --kv-bits budgets: bits per cache element that grow with the context
        avg_bits_per_element=round(stored_bits / elements, 4),
        elements_per_token=elements,
    )


def tensor_rows(kv: KVGraph, plan: QuantPlan, stats: KVStats | None) -> list[TensorRow]:
    """One row per cache tensor, with the calibration-set reconstruction SQNR of its plan
    (None without calibration)."""
    rows = []
    for tensor in kv.tensors:
        tensor_plan = plan.for_input(tensor.past_input)
        codec = tensor_plan.canonical_codec()
        sqnr = absmax = None
        if stats is not None:
            samples = stats.tensors[tensor.past_input].samples
            sqnr = None if codec is None else round(sqnr_db(samples, codec.fake_quantize(samples)), 2)
            absmax = round(float(np.max(stats.tensors[tensor.past_input].absmax)), 4)
        rows.append(TensorRow(
            label=tensor.label,
            layer=tensor.layer,
            kind=tensor.kind,
            input=tensor.past_input,
            output=tensor.present_output,
            layout=layout_name(tensor.axes),
            kv_heads=tensor.num_heads,
            head_dim=tensor.head_dim,
            dtype=tensor.dtype,
            attention=tensor.attention,
            rope=tensor.rope,
            bits=tensor_plan.bits,
            granularity=tensor_plan.granularity,
            group=tensor_plan.group,
            symmetric=tensor_plan.symmetric,
            scheme=tensor_plan.name,
            stored_bits_per_element=round(tensor_plan.stored_bits_per_element(tensor), 4),
            reason=tensor_plan.reason,
            sqnr_db=sqnr,
            measured_kl=tensor_plan.evidence or None,
            calib_absmax=absmax,
        ))
    return rows


def read_report(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{str(folder)!r} has no report.json; is it a kvcompile output folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{str(path)!r} is not a readable report ({exc})") from None
    if not isinstance(report, dict) or "memory_wall" not in report:
        raise BadInputError(f"{str(path)!r} was written by an older kvcompile without a memory-wall section; "
                            "compile again")
    return report


def write_report(report: Report, folder: Path) -> None:
    """report.json, report.md and report.png, each written to a temporary name and renamed."""
    write_report_data(report.to_dict(), folder)


def write_report_data(report: dict[str, Any], folder: Path) -> None:
    """The same from report.json's form (what `kvcompile report` reads back and redoes)."""
    _replace(folder / "report.json", lambda path: path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n"))
    _replace(folder / "report.md", lambda path: path.write_text(render_markdown(report)))
    from kvcompile.plot import write_plot  # here, not at start: matplotlib's 31 MiB are not held through the compile

    _replace(folder / "report.png", lambda path: write_plot(report, path))


def _replace(path: Path, write) -> None:
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    memory, quality = report["memory"], report["quality"]
    if quality["passed"] is None:
        headline = f"Quality: **UNVERIFIED**: {quality['reason']}"
    else:
        headline = (f"Quality gate ({quality['quality_gate_pct']}% perplexity rise): "
                    f"**{'PASSED' if quality['passed'] else 'FAILED'}**")
    lines = [
        f"# kvcompile report: {report['source']['path']}",
        "",
        headline,
        "",
        "## Memory (every stored byte: codes, scales, zero points)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| float16 KV bytes per token | {memory['fp16_bytes_per_token']} |",
        f"| compiled KV bytes per token | {_fmt(memory['quantized_bytes_per_token'], 1)} |",
        f"| static scale/zero-point bytes | {memory['static_bytes']} |",
        f"| average stored bits per element | {_fmt(memory['avg_bits_per_element'], 3)} |",
        f"| ratio vs float16 at {memory['reference_context']} tokens | {_fmt(memory['ratio_vs_fp16'], 2)}x |",
        "",
    ]
    if quality["passed"] is not None:
        lines += quality_markdown(quality)
    lines += decisions_markdown(report)
    lines += [
        f"## KV cache ({report['kv']['layers']} layers, found by {report['kv']['discovery']} analysis)",
        "",
        "| tensor | input -> output | layout | heads x dim | attention | stored as | bits/elem | SQNR dB | why |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["kv"]["tensors"]:
        lines.append(
            f"| {row['label']} | {row['input']} -> {row['output']} | {row['layout']} | "
            f"{row['kv_heads']}x{row['head_dim']} | {row['attention']} | {row['scheme']} | "
            f"{row['stored_bits_per_element']:.3f} | {_fmt(row['sqnr_db'], 1)} | {row['reason']} |"
        )
    lines += memory_wall_markdown(report["memory_wall"])
    lines += ["", "## Targets", "", "| target | artifact | ran | quality (perplexity change, where it ran) | stores the cache as |",
              "| --- | --- | --- | --- | --- |"]
    for name, target in report["targets"].items():
        lines.append(f"| {name} | {target['artifact']} | {target['ran']} | {target_quality_cell(target.get('quality'))} | "
                     f"{target['kv_storage']} |")
    lines.append("")
    return "\n".join(lines)


def target_quality_cell(quality: dict[str, Any] | None) -> str:
    if not quality:
        return "-"

    def one(q: dict[str, Any]) -> str:
        return (f"{q['ppl_delta_pct']:+.3f}% over {q['eval_tokens']:,} tokens, {'pass' if q['passed'] else 'FAIL'} "
                f"({q['ran_on']})")

    cell = one(quality)
    if quality.get("on_device"):
        cell += f"; short text: {one(quality['on_device'])}"
    agreement = quality.get("agreement")
    if agreement and not agreement.get("agrees", True):
        cell += f"; departs from {agreement['reference']} (cosine below {agreement['min_cosine']}): FAIL"
    return cell


def decisions_markdown(report: dict[str, Any]) -> list[str]:
    """What kvcompile decided about the attention and the contexts it ran, and why."""
    lines = ["## Decisions", ""]
    if "fusion" in report:
        lines.append(f"- attention: {report['fusion']['reason']}")
        if report["fusion"].get("float_slots"):
            lines.append(f"- {report['fusion']['float_slots']}")
    limits = report.get("limits")
    if limits is not None:
        context = limits["max_context"]
        lines.append(f"- model context limit: {f'{context:,} tokens' if context else 'none found in the graph or configs'}")
        if limits["sliding_window"]:
            lines.append(f"- shortest attention window: {limits['sliding_window']:,} tokens")
        lines += [f"  - {fact}" for fact in limits["facts"]]
        if limits.get("eval_window"):
            lines.append(f"- calibration and verification windows: {limits['eval_window']} tokens "
                         f"({limits['prefill']}-token prefill, then one token per step): the quality figures "
                         f"hold up to this context; static key ranges are not checked beyond it "
                         f"(--max-context sets it)")
    for name, target in report.get("targets", {}).items():
        lines += [f"- {name}: {change}" for change in target.get("plan_changes", ())]
    return lines + [""]


def quality_markdown(quality: dict[str, Any]) -> list[str]:
    return [
        "## Quality (teacher-forced through the decode path)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| float perplexity | {_fmt(quality['float_ppl'])} |",
        f"| compiled perplexity | {_fmt(quality['quantized_ppl'])} |",
        f"| perplexity change | {delta_text(quality)} |",
        f"| top-1 agreement with float | {_fmt(100 * quality['top1_agreement'], 2)}% |",
        f"| mean KL(float \\|\\| compiled) | {_fmt(quality['mean_kl'], 5)} nats |",
        f"| tokens scored | {quality['eval_tokens']} ({quality['eval_text']}) |",
        "",
    ] + ([f"To try (from what this compile measured): {'; '.join(quality['advice'])}", ""]
         if quality.get("advice") else [])


def delta_text(quality: dict[str, Any]) -> str:
    """The perplexity change, with its standard error over the verification windows where known."""
    stderr = quality.get("ppl_delta_stderr_pct")
    text = f"{quality['ppl_delta_pct']:+.3f}%"
    return text if stderr is None else f"{text} (standard error {stderr:.3f} points over the windows)"


def _tokens(count: int | None) -> str:
    return "-" if count is None else f"{count:,}"


def memory_wall_markdown(wall: dict[str, Any]) -> list[str]:
    device, per_token = wall["device"], wall["kv_bytes_per_token"]
    on_chip, budget = wall["on_chip_fit_tokens"], wall["budget_fit_tokens"]
    on_chip_name = (f"{device['on_chip_kind']}, {format_bytes(device['on_chip_bytes'])}"
                    if device["on_chip_bytes"] else "on-chip memory: not published for this device")
    gain = (f"{budget['compiled'] / budget['fp16']:.2f}x" if budget["fp16"] else "-")
    lines = [
        "",
        f"## Memory wall on {device['name']}",
        "",
        f"Device figures are published specifications ({device['kind']}), not measurements: "
        f"{device['memory']} at {device['transfer_mts']} MT/s x {device['bus_bits']} bit = "
        f"{device['peak_bandwidth_gb_s']} GB/s peak; {on_chip_name}. See report.png.",
        "",
        "| figure | float16 | this compile |",
        "| --- | --- | --- |",
        f"| KV bytes per token | {per_token['fp16']:,.0f} | {per_token['compiled']:,.1f} "
        f"(+ {wall['static_bytes']:,.0f} static) |",
        f"| longest context held on chip | {_tokens(on_chip['fp16'])} | {_tokens(on_chip['compiled'])} |",
        f"| longest context in a {format_bytes(wall['budget_bytes'])} KV budget | {_tokens(budget['fp16'])} | "
        f"{_tokens(budget['compiled'])} ({gain}) |",
        "",
        f"Decode-time lower bound ({wall['model']}); weights {format_bytes(wall['weights']['bytes_in_bound'])} "
        f"({wall['weights']['as']}, {wall['weights']['parameters']:,} parameters):",
        "",
        "| context | float16 KV ms/token | this compile ms/token | KV share of float16 traffic | speedup |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in wall["decode_lower_bound"]:
        lines.append(f"| {row['context']:,} | {row['fp16_ms']:.3f} | {row['compiled_ms']:.3f} | "
                     f"{100 * row['kv_share_fp16']:.1f}% | {row['speedup']:.2f}x |")
    lines += ["", "Sources:", ""] + [f"- {source}" for source in device["sources"]]
    return lines
