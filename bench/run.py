"""`make bench`: every figure in the README's tables, measured in one run on this machine.

Quality: kvcompile's schemes on the fixture and the outlier fixture, and the peers (the
onnxruntime-genai builder's int4 KV cache, HF QuantizedCache int4) on the same model and the
same held-out windows, all scored through the decode path. Compile: wall time and peak RSS of
the default compile in a fresh process. The real model, SmolLM2-135M-Instruct (models/real.py,
built from its wheel into the model cache): its default compile (time, peak RSS, quality as its
report states them) and its decode-step latency. Results go to bench/results.json; `--table`
reprints the README tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.latency import THREADS as LATENCY_THREADS
from bench.latency import latency_rows, latency_table
from bench.measure import measure, run_measured
from bench.peers import genai_int4_scores, hf_quantized_cache_scores
from bench.scale import scale_rows, scale_table
from kvcompile.errors import QualityGateError
from kvcompile.manifest import read_manifest
from kvcompile.pipeline import DEFAULT_CONTEXT, CompileOptions, compile_model
from kvcompile.tokens import bundled_text, load_token_ids, make_windows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"
FIXTURES = {
    "fixture": REPO / "models/fixture/onnx-dynamo/model.onnx",
    "fixture-genai": REPO / "models/fixture/onnx-genai/model.onnx",
    "fixture-outliers": REPO / "models/fixture-outliers/onnx-dynamo/model.onnx",
}
TOKENIZER = REPO / "models/fixture/hf/tokenizer.json"
EVAL_WINDOWS, WINDOW, PREFILL = 48, 256, 32  # kvcompile's default verification

# (fixture, extra CLI flags); every case also gets --kv-bits from the flags or 4.
OFF = ["--fuse-attention", "off"]
CASES = [
    ("fixture", []),
    ("fixture-genai", []),
    ("fixture", OFF),
    ("fixture", OFF + ["--scheme", "per-channel", "--clip", "mse"]),
    ("fixture", OFF + ["--scheme", "per-channel", "--clip", "minmax"]),
    ("fixture", OFF + ["--scheme", "per-tensor"]),
    ("fixture", ["--scheme", "kivi"]),
    ("fixture", ["--scheme", "per-token"]),
    ("fixture", ["--scheme", "per-token", "--rotate", "hadamard"]),
    ("fixture", OFF + ["--scheme", "per-channel", "--rotate", "hadamard"]),
    ("fixture", OFF + ["--kv-bits", "4.25"]),
    ("fixture", OFF + ["--kv-bits", "4.5"]),
    ("fixture-outliers", ["--scheme", "per-tensor"]),
    ("fixture-outliers", OFF + ["--scheme", "per-tensor", "--rotate", "hadamard"]),
    ("fixture-outliers", ["--scheme", "per-channel", "--fold-scales"]),
    ("fixture-outliers", []),
]


# The fixtures are trained on 256-token windows (models/train.py): their table is measured at the
# context they were trained for, as a user compiles for the context they deploy (--max-context).
FIXTURE_CONTEXT = 256


def options_for(fixture: str, flags: list[str], out_dir: Path) -> CompileOptions:
    values = dict(zip(flags[::2], flags[1::2]))
    flag_set = set(flags)
    return CompileOptions(
        model=FIXTURES[fixture], out_dir=out_dir,
        kv_bits=float(values.get("--kv-bits", 4)),
        scheme=values.get("--scheme", "auto"),
        clip=values.get("--clip", "wmse"),
        rotate=values.get("--rotate"),
        fold_scales="--fold-scales" in flag_set,
        fuse_attention=values.get("--fuse-attention", "auto"),
        max_context=FIXTURE_CONTEXT,
    )


def compile_case(fixture: str, flags: list[str], work: Path, index: int) -> dict:
    options = options_for(fixture, flags, work / f"case{index}")
    started = time.perf_counter()
    try:
        report = compile_model(options).report.to_dict()
    except QualityGateError as exc:
        report = exc.result.report.to_dict()
    quality, memory = report["quality"], report["memory"]
    return {
        "model": fixture,
        "method": "kvcompile " + (" ".join(flags) if flags else "(default: --scheme auto)"),
        "command": f"kvcompile {options.model.relative_to(REPO)} --max-context {FIXTURE_CONTEXT} --kv-bits 4 {' '.join(flags)}".replace(
            "--kv-bits 4 --kv-bits", "--kv-bits"),
        "bits_per_element": memory["avg_bits_per_element"],
        "ratio_vs_fp16": memory["ratio_vs_fp16"],
        "float_ppl": quality["float_ppl"],
        "ppl": quality["quantized_ppl"],
        "ppl_delta_pct": quality["ppl_delta_pct"],
        "top1_agreement": quality["top1_agreement"],
        "mean_kl": quality["mean_kl"],
        "gate": "pass" if quality["passed"] else "FAIL",
        "stored_as": sorted(set(report["plan"]["choices"].values())),
        "form": "fused GroupQueryAttention" if report["fusion"]["fused"] or fixture == "fixture-genai" else "Q/DQ",
        "compile_seconds": round(time.perf_counter() - started, 1),
    }


def peer_row(method: str, bits: str, float_score, score, model: str = "fixture") -> dict:
    return {
        "model": model, "method": method, "command": "bench/peers.py", "bits_per_element": bits,
        "ratio_vs_fp16": None, "float_ppl": round(float_score.ppl, 4), "ppl": round(score.ppl, 4),
        "ppl_delta_pct": round(100 * (score.ppl / float_score.ppl - 1), 4),
        "top1_agreement": round(score.top1_agreement, 5), "mean_kl": round(score.mean_kl, 6),
        "gate": "pass" if 100 * (score.ppl / float_score.ppl - 1) <= 2 else "FAIL", "stored_as": [], "form": "",
        "compile_seconds": None,
    }


def default_compile_cost(work: Path) -> dict:
    """Wall time and peak RSS of `kvcompile MODEL --kv-bits 4` in a fresh process."""
    command = [sys.executable, "-m", "kvcompile.cli", str(FIXTURES["fixture"]), "--kv-bits", "4", "-o", str(work / "cost")]
    seconds, rss_mib = measure(command)
    return {"command": "kvcompile models/fixture/onnx-dynamo/model.onnx --kv-bits 4",
            "seconds": round(seconds, 1), "peak_rss_mib": round(rss_mib, 1)}


SMOLLM2_CONTEXTS = (1024, 4096)


def smollm2_figures(work: Path) -> dict:
    """SmolLM2's torch.onnx export (what most users bring): `kvcompile MODEL --kv-bits 4` in a
    fresh process, its report's figures, and the decode-step latency of its float, Q/DQ and
    fused forms at 1,024 and 4,096 tokens."""
    from models.real import build_form

    model = build_form("dynamo")
    out = work / "smollm2"
    command = [sys.executable, "-m", "kvcompile.cli", str(model), "--kv-bits", "4", "-o", str(out)]
    measured = run_measured(command)
    if measured.returncode not in (0, 3):  # 3: failed its gate, with an honest report
        sys.stderr.write(measured.stderr[-2000:])
        raise subprocess.CalledProcessError(measured.returncode, command, measured.stdout, measured.stderr)
    report = json.loads((out / "report.json").read_text())
    quality = report["quality"]
    weight_bytes = sum(f.stat().st_size for f in model.parent.iterdir() if f.name.startswith("model.onnx"))
    return {
        "command": "kvcompile $KVCOMPILE_MODEL_CACHE/smollm2/dynamo/model.onnx --kv-bits 4",
        "seconds": round(measured.seconds, 1), "peak_rss_mib": round(measured.rss_mib, 1),
        "weight_bytes": weight_bytes, "exit_code": measured.returncode,
        "timings": report["timings"], "fused": report["fusion"]["fused"],
        "ratio_vs_fp16": report["memory"]["ratio_vs_fp16"],
        "bits_per_element": report["memory"]["avg_bits_per_element"],
        "choices": sorted(set(report["plan"]["choices"].values())),
        "quality": {key: quality.get(key) for key in
                    ("float_ppl", "quantized_ppl", "ppl_delta_pct", "top1_agreement", "mean_kl", "passed", "advice")},
        "latency": latency_rows(model, work / "smollm2-latency", SMOLLM2_CONTEXTS),
        "peers": smollm2_peers(report, bool(read_manifest(out).targets["ort-cpu"].options.float_slots),
                               work / "smollm2-peers"),
    }


def smollm2_peers(report: dict, float_slots: bool, work: Path) -> list[dict]:
    """kvcompile's default on SmolLM2 next to the peers, on the windows its compile verified on
    (the bundled held-out text, 12 x 1,024 tokens, 32-token prefill): its row is its report's,
    the peers are scored on the same token windows by the same decode-path evaluator (HF's in
    PyTorch, teacher-forced the same way)."""
    from models.real import build_form, model_dir

    hf_dir = model_dir() / "hf"
    work.mkdir(parents=True, exist_ok=True)
    defaults = CompileOptions(model=Path("unused"))
    windows = make_windows(load_token_ids(bundled_text("heldout.txt"), hf_dir / "tokenizer.json"), DEFAULT_CONTEXT,
                           defaults.eval_tokens // DEFAULT_CONTEXT, "held-out")
    quality, memory = report["quality"], report["memory"]
    rows = [{
        "model": "SmolLM2", "method": "kvcompile (default: --kv-bits 4)", "command": "kvcompile MODEL --kv-bits 4",
        "bits_per_element": memory["avg_bits_per_element"], "ratio_vs_fp16": memory["ratio_vs_fp16"],
        "float_ppl": quality["float_ppl"], "ppl": quality["quantized_ppl"], "ppl_delta_pct": quality["ppl_delta_pct"],
        "top1_agreement": quality["top1_agreement"], "mean_kl": quality["mean_kl"],
        "gate": "pass" if quality["passed"] else "FAIL", "stored_as": sorted(set(report["plan"]["choices"].values())),
        "form": "fused GroupQueryAttention" + (" + float slots" if float_slots else ""),
        "compile_seconds": None,
    }]
    print("SmolLM2 peer: onnxruntime-genai int4_per_channel", file=sys.stderr, flush=True)
    rows.append(peer_row("onnxruntime-genai builder int4_per_channel (its calibration)", "4.000",
                         *genai_int4_scores(work, bundled_text("calib.txt"), windows, defaults.prefill, hf_dir,
                                            build_form("genai")), model="SmolLM2"))
    for residual in (128, 1):
        print(f"SmolLM2 peer: HF QuantizedCache quanto int4 residual {residual}", file=sys.stderr, flush=True)
        rows.append(peer_row(f"HF QuantizedCache quanto int4, residual_length={residual}",
                             f"4.5 + {residual} float tokens",
                             *hf_quantized_cache_scores(windows, defaults.prefill, residual, hf_dir=hf_dir),
                             model="SmolLM2"))
    return rows


def smollm2_tables(figures: dict) -> str:
    """The default compile's figures in one line, then the latency table."""
    quality = figures["quality"]
    gate = "passed" if quality["passed"] else "FAILED the gate"
    return (f"SmolLM2 default compile: {figures['seconds']:.0f} s, peak RSS {figures['peak_rss_mib']:,.0f} MiB "
            f"({figures['peak_rss_mib'] * 2**20 / figures['weight_bytes']:.1f}x the weights), exit "
            f"{figures['exit_code']}; {'fused GroupQueryAttention' if figures['fused'] else 'Q/DQ'}, "
            f"{figures['bits_per_element']:.3f} bits/element, {figures['ratio_vs_fp16']:.2f}x smaller than fp16; "
            f"PPL {quality['float_ppl']:.3f} -> {quality['quantized_ppl']:.3f} ({quality['ppl_delta_pct']:+.2f}%), "
            f"top-1 {100 * quality['top1_agreement']:.1f}%, KL {quality['mean_kl']:.4f}: {gate}\n\n"
            + latency_table(figures["latency"])
            + ("\n\n" + quality_table({"quality": figures["peers"]}) if "peers" in figures else ""))


def quality_table(results: dict) -> str:
    lines = [
        "| model | method | form | bits/element | memory vs fp16 | PPL (float -> quantized) | delta | top-1 agree | "
        "mean KL | gate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["quality"]:
        bits = r["bits_per_element"] if isinstance(r["bits_per_element"], str) else f"{r['bits_per_element']:.3f}"
        ratio = "-" if r["ratio_vs_fp16"] is None else f"{r['ratio_vs_fp16']:.2f}x smaller"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['form']} | {bits} | {ratio} | {r['float_ppl']:.3f} -> {r['ppl']:.3f} | "
            f"{r['ppl_delta_pct']:+.2f}% | {100 * r['top1_agreement']:.1f}% | {r['mean_kl']:.4f} | {r['gate']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="reprint the tables from results.json")
    parser.add_argument("--smollm2-only", action="store_true",
                        help="measure only SmolLM2's figures and replace them in results.json")
    args = parser.parse_args()
    if args.smollm2_only:
        results = json.loads(RESULTS.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            results["smollm2"] = smollm2_figures(Path(tmp))
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(smollm2_tables(results["smollm2"]))
        return
    if args.table:
        results = json.loads(RESULTS.read_text())
        print(quality_table(results), latency_table(results["latency"]), scale_table(results["scale"]), sep="\n\n")
        if "smollm2" in results:
            print("", smollm2_tables(results["smollm2"]), sep="\n")
        return
    windows = make_windows(load_token_ids(bundled_text("heldout.txt"), TOKENIZER), WINDOW, EVAL_WINDOWS, "held-out")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        quality = []
        for index, (fixture, flags) in enumerate(CASES):
            print(f"[{index + 1}/{len(CASES)}] {fixture} {' '.join(flags)}", file=sys.stderr, flush=True)
            quality.append(compile_case(fixture, flags, work, index))
        print("peer: onnxruntime-genai int4_per_channel", file=sys.stderr, flush=True)
        quality.append(peer_row("onnxruntime-genai builder int4_per_channel (its calibration)", "4.000",
                                *genai_int4_scores(work, bundled_text("calib.txt"), windows, PREFILL)))
        for residual in (128, 1):
            print(f"peer: HF QuantizedCache quanto int4 residual {residual}", file=sys.stderr, flush=True)
            quality.append(peer_row(f"HF QuantizedCache quanto int4, residual_length={residual}",
                                    f"4.5 + {residual} float tokens",
                                    *hf_quantized_cache_scores(windows, PREFILL, residual)))
        print("latency", file=sys.stderr, flush=True)
        latency = latency_rows(FIXTURES["fixture"], work)
        cost = default_compile_cost(work)
        scale = scale_rows(work)
        print("SmolLM2", file=sys.stderr, flush=True)
        smollm2 = smollm2_figures(work)
    results = {
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "eval": {"windows": EVAL_WINDOWS, "window": WINDOW, "prefill": PREFILL, "text": "models/data/heldout.txt"},
        "quality": quality,
        "latency": latency,
        "latency_threads": LATENCY_THREADS,
        "default_compile": cost,
        "scale": scale,
        "smollm2": smollm2,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(quality_table(results), latency_table(latency), scale_table(scale), smollm2_tables(smollm2), sep="\n\n")
    print(f"\ndefault compile: {cost['seconds']} s, peak RSS {cost['peak_rss_mib']} MiB")
    print(f"written to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
