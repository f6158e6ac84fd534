"""`make bench`: compile the fixtures with each scheme and record memory, quality and time.

Every figure in bench/results.json is measured by this script in one run on this machine; the
README table is printed from it (`python -m bench.run --table` reprints it without rerunning).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from kvcompile.errors import QualityGateError
from kvcompile.pipeline import CompileOptions, compile_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"
FIXTURES = {
    "fixture": REPO / "models/fixture/onnx-dynamo/model.onnx",
    "fixture-fp16": REPO / "models/fixture/onnx-fp16/model.onnx",
    "fixture-outliers": REPO / "models/fixture-outliers/onnx-dynamo/model.onnx",
}
CASES = [
    ("fixture", "per-channel"),
    ("fixture", "per-tensor"),
    ("fixture-fp16", "per-channel"),
    ("fixture-outliers", "per-channel"),
    ("fixture-outliers", "per-tensor"),
]


def compile_case(fixture: str, scheme: str, work: Path) -> dict:
    options = CompileOptions(model=FIXTURES[fixture], out_dir=work / f"{fixture}-{scheme}", scheme=scheme)
    started = time.perf_counter()
    try:
        report = compile_model(options).report
    except QualityGateError as exc:
        report = exc.result.report
    seconds = time.perf_counter() - started
    return {
        "fixture": fixture,
        "scheme": scheme,
        "command": f"kvcompile {options.model.relative_to(REPO)} --kv-bits 4 --scheme {scheme}",
        "compile_seconds": round(seconds, 2),
        "ratio_vs_fp16": report["memory"]["ratio_vs_fp16"],
        "bytes_per_token_fp16": report["memory"]["fp16_bytes_per_token"],
        "bytes_per_token": report["memory"]["quantized_bytes_per_token"],
        "float_ppl": report["quality"]["float_ppl"],
        "ppl": report["quality"]["quantized_ppl"],
        "ppl_delta_pct": report["quality"]["ppl_delta_pct"],
        "top1_agreement": report["quality"]["top1_agreement"],
        "gate": "pass" if report["quality"]["passed"] else "FAIL",
    }


def table(results: dict) -> str:
    lines = [
        "| model | scheme | KV bytes/token fp16 -> 4-bit | ratio | float PPL | 4-bit PPL | delta | top-1 agree | gate | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["quality"]:
        lines.append(
            f"| {r['fixture']} | {r['scheme']} | {r['bytes_per_token_fp16']} -> {r['bytes_per_token']:.0f} | "
            f"{r['ratio_vs_fp16']:.2f}x | {r['float_ppl']:.3f} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | "
            f"{100 * r['top1_agreement']:.1f}% | {r['gate']} | {r['compile_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="reprint the table from results.json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    with tempfile.TemporaryDirectory() as work:
        quality = []
        for fixture, scheme in CASES:
            print(f"compiling {fixture} {scheme} ...", file=sys.stderr, flush=True)
            quality.append(compile_case(fixture, scheme, Path(work)))
    results = {
        "machine": {"python": platform.python_version(), "processor": platform.machine(),
                    "cpus": __import__("os").cpu_count()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "quality": quality,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
