"""The conformance run: every corpus family (models/families.py) through every exporter form
(models/exporters.py), and the real SmolLM2 exports, compiled by the real `kvcompile` command.

For each model x form it records what happened:
  - `exporter-refused`: the exporter does not take this family (its own message), so there is
    no model to compile;
  - the exporter's own fidelity: max |logit difference| of the float export against transformers
    through the decode path (a 32-token prefill, then one token per step, 256 tokens): an
    exporter that computes something else is the exporter's bug, but it is worth knowing;
  - kvcompile's exit code and outcome: `passed` (0), `failed-quality-gate` (3, honest report
    written), `refused` (2, one line naming the construct), `internal-error` (1: a bug, never
    acceptable), with the perplexity change, memory ratio, attention form, time and peak RSS.

    python -m bench.corpus [--families F ...] [--forms F ...] [--smollm2] [--workers N]   # -> build/corpus.json
    python -m bench.corpus --table                                                        # README table

Corpus models are compiled with CORPUS_FLAGS (shorter texts than the defaults). SmolLM2's dynamo
export, what most users bring, is compiled with the default flags; its other exports with
SMOLLM2_FLAGS (one scheme, short texts: `auto` measures 60 candidates on a 30-layer model,
minutes each compile). Exports are built first, then cases run `--workers` at a time (each in its
own process; two workers on two cores finish the corpus about 1.6x sooner).
The tests (`tests/corpus/`) run the same cases and compare each outcome with what is expected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.measure import run_measured

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "build" / "corpus.json"
# Shorter calibration and verification than the default (8192 / 12288 tokens), so the whole
# corpus fits in CI: 16 evaluation windows of 256 tokens, longer than every sliding window. The
# families are trained on 256-token windows (models/families.py SEQ_LEN), so they are compiled for
# that context (--max-context 256), as a user compiles for the context they deploy.
CORPUS_FLAGS = ("--calib-tokens", "2048", "--eval-tokens", "4096", "--max-context", "256")
SMOLLM2_FLAGS = ("--scheme", "per-channel", "--calib-tokens", "1024", "--eval-tokens", "1024")
# CI's share of SmolLM2 (time: CI ran 85.6 of its 90 minutes with four forms): the torch.onnx
# export users bring, with the default flags, and the onnxruntime-genai int4 export (fused
# attention, MatMulNBits weights). The other forms (TorchScript, genai float32, float16,
# opset 23) are covered on the 14 corpus families in CI; `make corpus` runs every SmolLM2 form.
SMOLLM2_CI_FORMS = ("dynamo", "genai-int4")
# CI compiles SmolLM2's dynamo export with SMOLLM2_FLAGS too: `auto` builds a whole model per
# candidate (60 on 30 layers), which costs 15+ minutes here even on short texts (issue 16). The
# corpus exercises `auto` in CI on 14 families; `make bench` and `make corpus` run SmolLM2's
# default compile whole.
SMOLLM2_CI_DYNAMO_FLAGS = SMOLLM2_FLAGS
SMOLLM2 = "smollm2"
FIDELITY_TOKENS, FIDELITY_PREFILL = 256, 32


@dataclass(frozen=True)
class Case:
    model: str  # a corpus family or "smollm2"
    form: str  # an exporter form (models/exporters.py FORMS)
    flags: tuple[str, ...] = CORPUS_FLAGS  # kvcompile flags besides the model and -o

    @property
    def key(self) -> str:
        return f"{self.model}/{self.form}"


@dataclass
class CaseResult:
    model: str
    form: str
    outcome: str  # exporter-refused | passed | failed-quality-gate | refused | internal-error
    exit_code: int | None = None
    message: str = ""  # the exporter's or kvcompile's one-line reason when not passed
    export_max_error: float | None = None  # float export vs transformers, max |logit difference|
    attention: str = ""  # what the compiled artifact runs: fused GroupQueryAttention / Q/DQ
    ppl_delta_pct: float | None = None
    ratio_vs_fp16: float | None = None
    limits: str = ""
    seconds: float | None = None
    rss_mib: float | None = None
    flags: str = ""


OUTCOMES = {0: "passed", 2: "refused", 3: "failed-quality-gate"}


def model_path(model: str, form: str) -> Path:
    """Build (once, cached outside git) and return the export; raises ExportRefused."""
    if model == SMOLLM2:
        from models.real import build_form

        return build_form(form)
    from models.families import build_export

    return build_export(model, form)


def export_fidelity(model: str, path: Path) -> float:
    """Max |logit difference| of the float export against transformers, through the decode path."""
    import numpy as np
    import torch

    from kvcompile.manifest import float_model_io
    from kvcompile.model_io import load_model
    from kvcompile.passes.normalize import normalize_export
    from kvcompile.pipeline import analyze
    from kvcompile.runtimes.decoder import Decoder
    from kvcompile.runtimes.session import cpu_session
    from kvcompile.tokens import bundled_text, load_token_ids

    ir_model = load_model(path)
    normalize_export(ir_model)
    kv = analyze(ir_model, None)
    ids = load_token_ids(bundled_text("heldout.txt"), path.parent / "tokenizer.json")[:FIDELITY_TOKENS]
    decoder = Decoder(cpu_session(path), float_model_io(kv, str(path)))
    cache = decoder.new_cache(1)
    logits = [decoder.step(cache, ids[None, :FIDELITY_PREFILL])[0]]
    logits += [decoder.step(cache, ids[None, t : t + 1])[0] for t in range(FIDELITY_PREFILL, ids.size)]
    onnx_logits = np.concatenate(logits, axis=1)[0]
    if model == SMOLLM2:
        from models.real import build_hf, load_float32
        reference_model = load_float32(build_hf())
    else:
        from models.families import load_float32
        reference_model = load_float32(model)
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(ids[None])).logits[0].float().numpy()
    return float(np.abs(onnx_logits - reference).max())


def run_case(case: Case, work: Path, fidelity: bool = True) -> CaseResult:
    """Export (cached), check the export, compile with the real CLI in a fresh process."""
    from models.exporters import ExportRefused

    model, form = case.model, case.form
    try:
        path = model_path(model, form)
    except ExportRefused as exc:
        return CaseResult(model, form, "exporter-refused", message=str(exc))
    result = CaseResult(model, form, "internal-error", flags=" ".join(case.flags) or "(defaults)")
    if fidelity:
        try:
            result.export_max_error = round(export_fidelity(model, path), 6)
        except Exception as exc:  # recorded, not fatal: kvcompile's own outcome is what is tested
            result.message = f"fidelity check failed: {type(exc).__name__}: {exc}"[:300]
    out = work / f"{model}-{form}"
    command = [sys.executable, "-m", "kvcompile.cli", str(path), "-o", str(out), "--json", *case.flags]
    measured = run_measured(command)
    result.exit_code = measured.returncode
    result.seconds, result.rss_mib = round(measured.seconds, 1), round(measured.rss_mib)
    result.outcome = OUTCOMES.get(measured.returncode, "internal-error")
    lines = [line for line in measured.stderr.strip().splitlines() if line.strip()]
    if measured.returncode != 0:
        result.message = lines[-1] if lines else f"exit {measured.returncode}"
    if measured.returncode in (0, 3):
        report = json.loads((out / "report.json").read_text())
        result.ppl_delta_pct = report["quality"]["ppl_delta_pct"]
        result.ratio_vs_fp16 = report["memory"]["ratio_vs_fp16"]
        result.attention = ("fused GroupQueryAttention" if report["fusion"]["fused"] or
                            "com.microsoft.GroupQueryAttention" in report["kv"]["attention_forms"] else "Q/DQ")
        limits = report.get("limits") or {}
        result.limits = ", ".join(part for part in (
            f"context {limits['max_context']}" if limits.get("max_context") else "",
            f"window {limits['sliding_window']}" if limits.get("sliding_window") else "") if part)
    return result


def corpus_cases(families: list[str] | None = None, forms: list[str] | None = None) -> list[Case]:
    from models.exporters import FORMS
    from models.families import FAMILIES

    names = families or [f.name for f in FAMILIES]
    return [Case(name, form) for name in names for form in (forms or FORMS)]


def smollm2_cases(forms: tuple[str, ...] | None = None, dynamo_flags: tuple[str, ...] = ()) -> list[Case]:
    """The dynamo export with the default flags (plus `dynamo_flags`); every other export with
    SMOLLM2_FLAGS."""
    from models.exporters import FORMS

    return [Case(SMOLLM2, form, dynamo_flags if form == "dynamo" else SMOLLM2_FLAGS) for form in (forms or FORMS)]


def build_exports(cases: list[Case], workers: int) -> None:
    """Build every case's export into the cache, `workers` exporter processes at a time
    (exporters are mostly single-threaded). SmolLM2's float32 checkpoint is made first: its
    exports all start from it."""
    families = sorted({case.model for case in cases if case.model != SMOLLM2})
    forms = {case.model: sorted({c.form for c in cases if c.model == case.model}) for case in cases}
    commands = [[sys.executable, "-m", "models.families", "export", name, "--forms", *forms[name]] for name in families]
    if SMOLLM2 in forms:
        from models.real import build_hf

        build_hf()
        commands += [[sys.executable, "-m", "models.real", "--forms", form] for form in forms[SMOLLM2]]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda command: subprocess.run(command, cwd=REPO, capture_output=True), commands))


def run_cases(cases: list[Case], work: Path, workers: int = 2, fidelity: bool = True) -> dict[str, CaseResult]:
    """Build the exports, then compile every case, `workers` at a time, longest first."""
    build_exports(cases, workers)
    order = sorted(cases, key=lambda case: (case.model != SMOLLM2, case.flags == SMOLLM2_FLAGS))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda case: run_case(case, work, fidelity), order))
    by_key = {case.key: result for case, result in zip(order, results)}
    return {case.key: by_key[case.key] for case in cases}


def _outcome(result: dict) -> str:
    """The outcome with the first clause of its reason (no paths, no advice)."""
    if result["outcome"] in ("passed", "failed-quality-gate") or not result["message"]:
        return result["outcome"]
    reason = result["message"].removeprefix("kvcompile: error: ").split(";")[0]
    return f"{result['outcome']}: {reason}"


def table(results: list[dict]) -> str:
    lines = ["| model | exporter form | outcome | attention | PPL delta | memory vs fp16 | limits | export vs "
             "transformers | time | peak RSS |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        outcome = _outcome(r)
        delta = "-" if r["ppl_delta_pct"] is None else f"{r['ppl_delta_pct']:+.2f}%"
        ratio = "-" if r["ratio_vs_fp16"] is None else f"{r['ratio_vs_fp16']:.2f}x"
        error = "-" if r["export_max_error"] is None else f"{r['export_max_error']:.1e}"
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        rss = "-" if r["rss_mib"] is None else f"{r['rss_mib']:,.0f} MiB"
        lines.append(f"| {r['model']} | {r['form']} | {outcome} | {r['attention'] or '-'} | {delta} | {ratio} | "
                     f"{r['limits'] or '-'} | {error} | {seconds} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=None)
    parser.add_argument("--forms", nargs="*", default=None)
    parser.add_argument("--smollm2", action="store_true", help="run SmolLM2's exports too")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the README table from build/corpus.json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())["cases"]))
        return
    import tempfile

    started = time.time()
    cases = corpus_cases(args.families, args.forms) + (smollm2_cases() if args.smollm2 else [])
    with tempfile.TemporaryDirectory(prefix="kvcompile-corpus-") as tmp:
        results = [asdict(result) for result in run_cases(cases, Path(tmp), args.workers).values()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"seconds": round(time.time() - started), "workers": args.workers,
                                   "corpus_flags": list(CORPUS_FLAGS), "cases": results}, indent=2) + "\n")
    print(table(results))
    print(f"{len(results)} cases in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
