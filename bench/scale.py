"""Scale: a Llama-3.2-1B-shaped decoder compiled at 2 to 16 layers, uncalibrated and calibrated.

The model has Llama-3.2-1B's shapes (hidden 2048, 32 query / 8 KV heads, head_dim 64, MLP 8192,
vocabulary 128256, tied embeddings, llama3 RoPE scaling) with random weights, exported by the
same torch.onnx dynamo path as the fixture (models/export.py), float32 with external data: 1.5 GB
at 2 layers, 4.9 GB at 16. Each size is built in a child process, then measured:
  compile   `kvcompile MODEL --kv-bits 4 --no-calibration`: wall time and peak RSS of the
            process tree (bench/measure.py); the weights are streamed from the input's data
            file to the output's, so peak RSS should stay far below the weight bytes
  loads     the artifact in onnxruntime (CPU EP) and one 8-token prefill + one decode step:
            proof that it runs, with its own time and peak RSS (ORT holds the weights once)
  calibrated  `kvcompile MODEL --kv-bits 4` + CALIBRATED_FLAGS (fewer tokens: a 1B model decodes
            slowly on two cores): fusion check, calibration, auto, artifact and verification, with
            its wall time, peak RSS, peak RSS per stage (the report's timings) and calibration and
            verification tokens per second. Random weights: its perplexity figures mean nothing
            (a failed gate, exit 3, is recorded like a pass); its time and memory do.
Usage: python -m bench.scale [--layers 2 4 8 16]; python -m bench.scale --make 16 DIR exports one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import measure, run_measured

LAYERS = (2, 4, 8, 16)
WEIGHTS = ("float32", "int4")
STAGES = ("load_analyze", "fuse", "calibrate_plan", "rewrite", "emit", "verify", "ort_format_converter")  # in order
CALIBRATED_FLAGS = ["--max-context", "256", "--calib-tokens", "1024", "--eval-tokens", "1024"]
# The random-weight model has no tokenizer; the fixture's (2,048 ids) turns the bundled texts into ids.
TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "fixture" / "onnx-dynamo" / "tokenizer.json"
LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


def make_model(layers: int, out_dir: Path, weights: str = "float32") -> Path:
    """Export a random-weight Llama-3.2-1B-shaped decoder with `layers` layers (torch needed):
    float32 through torch.onnx dynamo, or `int4`: the onnxruntime-genai builder's `-p int4`
    export (MatMulNBits weights, GroupQueryAttention), the form phone users have."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.export import export_dynamo
    from models.exporters import TOKENIZER_FILES, export_genai

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_3_2_1B, num_hidden_layers=layers, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    if weights == "float32":
        return export_dynamo(model, out_dir, external_data=True, tokenizer=False)
    with tempfile.TemporaryDirectory(prefix="kvcompile-scale-hf-") as hf:
        model.save_pretrained(hf, safe_serialization=True)
        del model
        for name in TOKENIZER_FILES:  # the builder writes the tokenizer next to the model
            shutil.copyfile(TOKENIZER.parent / name, Path(hf) / name)
        return export_genai(Path(hf), out_dir, "int4")


def run_one_step(out_dir: Path) -> dict:
    """Load the compiled artifact in onnxruntime and run a prefill and one decode step."""
    import numpy as np

    from kvcompile.manifest import read_manifest
    from kvcompile.runtimes.decoder import Decoder
    from kvcompile.runtimes.session import cpu_session

    started = time.perf_counter()
    io = read_manifest(out_dir).targets["ort-cpu"]
    decoder = Decoder(cpu_session(out_dir / io.model), io)
    loaded = time.perf_counter()
    cache = decoder.new_cache(1)
    decoder.step(cache, np.arange(1, 9)[None])
    stepped = time.perf_counter()
    logits, _ = decoder.step(cache, np.array([[9]]))
    done = time.perf_counter()
    if not np.isfinite(logits).all():
        raise SystemExit("non-finite logits")
    return {"load_s": round(loaded - started, 2), "decode_step_ms": round(1e3 * (done - stepped), 1),
            "cache_bytes_after_9_tokens": cache.nbytes()}


def scale_row(layers: int, work: Path, weights: str = "float32") -> dict:
    model_dir = work / f"llama-1b-shaped-{layers}l-{weights}"
    out_dir = model_dir.with_name(model_dir.name + ".kvcompiled")
    print(f"scale: exporting {layers} layers ({weights})", file=sys.stderr, flush=True)
    export_s, export_rss = measure([sys.executable, "-m", "bench.scale", "--make", str(layers), str(model_dir),
                                    "--weights", weights])
    model = model_dir / "model.onnx"
    weight_bytes = sum(p.stat().st_size for p in model_dir.iterdir())
    if weights == "int4":  # GroupQueryAttention's 4-bit cache needs calibrated scales: no --no-calibration row
        row = {"layers": layers, "weights": weights, "model_bytes": weight_bytes, "export_seconds": round(export_s, 1),
               "export_peak_rss_mib": round(export_rss), "calibrated": calibrated_compile(model, out_dir, weight_bytes)}
        shutil.rmtree(model_dir)
        shutil.rmtree(out_dir)
        return row
    command = ["kvcompile", "MODEL", "--kv-bits", "4", "--no-calibration"]
    print(f"scale: compiling {layers} layers", file=sys.stderr, flush=True)
    compile_s, compile_rss = measure([sys.executable, "-m", "kvcompile.cli", str(model), *command[2:], "-o",
                                      str(out_dir), "--json"])
    report = json.loads((out_dir / "report.json").read_text())
    step_s, step_rss = measure([sys.executable, "-m", "bench.scale", "--step", str(out_dir)])
    step = json.loads((out_dir / "step.json").read_text())
    target = report["targets"]["ort-cpu"]
    shutil.rmtree(out_dir)
    calibrated = calibrated_compile(model, out_dir, weight_bytes)
    row = {
        "layers": layers,
        "weights": weights,
        "parameters": report["memory_wall"]["weights"]["parameters"],
        "model_bytes": weight_bytes,
        "export_seconds": round(export_s, 1), "export_peak_rss_mib": round(export_rss),
        "command": " ".join(command),
        "compile_seconds": round(compile_s, 1),
        "compile_peak_rss_mib": round(compile_rss),
        "peak_rss_vs_weights": round(compile_rss * 2**20 / weight_bytes, 3),
        "stage_seconds": report["timings"],
        "kv_bytes_per_token": {"fp16": report["memory"]["fp16_bytes_per_token"],
                               "compiled": report["memory"]["quantized_bytes_per_token"]},
        "ort_format": target["ort_format"] is not None,
        "onnx_checker": target["onnx_checker"],
        "ort_load_seconds": step["load_s"], "ort_decode_step_ms": step["decode_step_ms"],
        "ort_run_seconds": round(step_s, 1), "ort_peak_rss_mib": round(step_rss),
        "calibrated": calibrated,
    }
    shutil.rmtree(model_dir)
    shutil.rmtree(out_dir)
    return row


def calibrated_compile(model: Path, out_dir: Path, weight_bytes: int) -> dict:
    """The default (calibrated, verified) compile with fewer tokens: time, memory, throughput."""
    print(f"scale: calibrated compile of {model.parent.name}", file=sys.stderr, flush=True)
    measured = run_measured([sys.executable, "-m", "kvcompile.cli", str(model), "--kv-bits", "4", *CALIBRATED_FLAGS,
                             "--tokenizer", str(TOKENIZER), "-o", str(out_dir), "--json"])
    if measured.returncode not in (0, 3):  # 3: the gate, meaningless on random weights
        sys.stderr.write(measured.stderr[-2000:])
        raise SystemExit(f"calibrated compile exited {measured.returncode}")
    report = json.loads((out_dir / "report.json").read_text())
    timings, quality = report["timings"], report["quality"]
    calibration_tokens = report["calibration"]["tokens"]
    verified = quality["eval_tokens"]
    return {
        "command": " ".join(["kvcompile", "MODEL", "--kv-bits", "4", *CALIBRATED_FLAGS]),
        "exit": measured.returncode,
        "seconds": round(measured.seconds, 1), "peak_rss_mib": round(measured.rss_mib),
        "peak_rss_vs_weights": round(measured.rss_mib * 2**20 / weight_bytes, 3),
        "stage_peak_rss_mib": timings["peak_rss_mib"],
        "stage_seconds": {k: v for k, v in timings.items() if k.endswith("_s")},
        "calibration_tokens": calibration_tokens,
        "calibration_tokens_per_s": round(calibration_tokens / timings["calibrate_plan_s"], 1),
        "verified_predictions": verified,
        "verification_tokens_per_s": round(verified / (timings.get("first_verify_s", 0) + timings["verify_s"]), 1),
    }


def scale_rows(work: Path, layers: tuple[int, ...] = LAYERS, weights: tuple[str, ...] = WEIGHTS) -> list[dict]:
    rows = []
    for w in weights:
        for n in layers:
            rows.append(scale_row(n, work, w))
            print(f"scale: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # kept if a later row fails
    return rows


def scale_table(rows: list[dict]) -> str:
    lines = [
        "| layers | parameters | weights (bytes stored) | export | compile time | compile peak RSS | RSS / weights | "
        "KV bytes/token fp16 -> 4-bit | .ort | ORT load + decode step | ORT peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in [r for r in rows if "compile_seconds" in r]:  # the --no-calibration rows (float32)
        kv = r["kv_bytes_per_token"]
        lines.append(
            f"| {r['layers']} | {r['parameters'] / 1e9:.3f} B | {r['weights']} {r['model_bytes'] / 1e9:.2f} GB | "
            f"{r['export_seconds']} s | "
            f"{r['compile_seconds']} s | {r['compile_peak_rss_mib']:,} MiB | {r['peak_rss_vs_weights']:.3f} | "
            f"{kv['fp16']:,} -> {kv['compiled']:,.0f} | {'written' if r['ort_format'] else 'skipped (>1 GiB)'} | "
            f"{r['ort_load_seconds']} s + {r['ort_decode_step_ms']} ms | {r['ort_peak_rss_mib']:,} MiB |")
    calibrated = [r for r in rows if r.get("calibrated")]
    if calibrated:
        lines += ["", f"Calibrated and verified (`{calibrated[0]['calibrated']['command']}`):", "",
                  "| layers | weights | compile time | exit | peak RSS | RSS / weights | peak reached in | "
                  "calibration tokens/s | verification tokens/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in calibrated:
            c = r["calibrated"]
            by_stage = c["stage_peak_rss_mib"]  # the peak so far at each stage's end
            peak_stage = next(s for s in STAGES if by_stage.get(s) == max(by_stage.get(t, 0) for t in STAGES))
            lines.append(f"| {r['layers']} | {r['weights']} | {c['seconds']} s | {c['exit']} | {c['peak_rss_mib']:,} MiB | "
                         f"{c['peak_rss_vs_weights']:.2f} | {peak_stage} ({by_stage[peak_stage]:,} MiB) | "
                         f"{c['calibration_tokens_per_s']} | {c['verification_tokens_per_s']} |")
    float32 = [r for r in rows if r["weights"] == "float32"]
    if len(float32) > 1:
        first, last = float32[0], float32[-1]
        lines.append("")
        lines.append(
            f"From {first['layers']} to {last['layers']} layers the weights grow "
            f"{last['model_bytes'] / first['model_bytes']:.2f}x, compile time "
            f"{last['compile_seconds'] / first['compile_seconds']:.2f}x and compile peak RSS "
            f"{last['compile_peak_rss_mib'] / first['compile_peak_rss_mib']:.2f}x.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--make", nargs=2, metavar=("LAYERS", "DIR"),
                        help="only export the model with LAYERS layers to DIR (and keep it; one --weights)")
    parser.add_argument("--step", metavar="OUTDIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_model(int(args.make[0]), Path(args.make[1]), args.weights[0])
        return
    if args.step:
        out_dir = Path(args.step)
        (out_dir / "step.json").write_text(json.dumps(run_one_step(out_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="kvcompile-scale-") as tmp:
        rows = scale_rows(Path(tmp), tuple(args.layers), tuple(args.weights))
    print(json.dumps(rows, indent=2))
    print(scale_table(rows))


if __name__ == "__main__":
    main()
