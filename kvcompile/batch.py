"""`kvcompile compile --config FILE`: compile a list of models and targets (the CI job).

The config is TOML. `[defaults]` holds compile options for every model; each `[[models]]` entry
names a `path` (and optionally `out`) and may override any option. Option names are the CLI's
with underscores: kv_bits, scheme, targets, socs, max_context, quality_gate, calib, eval, ...
Paths are relative to the config file. Every model is compiled even if an earlier one fails;
the exit code is then the worst: 2 (bad input) over 3 (quality gate) over 0.

    [defaults]
    kv_bits = 4
    targets = ["ort-cpu", "tflite"]

    [[models]]
    path = "models/fixture/onnx-dynamo/model.onnx"
    out = "build/fixture"
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from kvcompile.errors import BadInputError, KvCompileError, QualityGateError
from kvcompile.pipeline import CompileOptions, Progress, compile_model

# config key -> CompileOptions field (where the CLI name differs)
_RENAMED = {"quality_gate": "quality_gate_pct", "eval": "eval_text", "out": "out_dir", "path": "model"}
_PATHS = {"model", "out_dir", "calib", "eval_text", "tokenizer", "kv_map"}
_TUPLES = {"targets", "socs"}


def _options(entry: dict[str, Any], base: Path, where: str) -> CompileOptions:
    fields = {f.name for f in dataclasses.fields(CompileOptions)}
    values = {}
    for key, value in entry.items():
        name = _RENAMED.get(key, key)
        if name not in fields:
            raise BadInputError(f"{where}: unknown option {key!r}")
        if name in _PATHS:
            value = (base / value).resolve()
        elif name in _TUPLES:
            value = tuple([value] if isinstance(value, str) else value)
        values[name] = value
    if "model" not in values:
        raise BadInputError(f"{where}: needs a 'path'")
    return CompileOptions(**values)


def load_config(path: Path) -> list[CompileOptions]:
    try:
        config = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"--config {str(path)!r} is not a readable TOML file ({exc})") from None
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise BadInputError(f"--config {str(path)!r} lists no [[models]]")
    defaults = config.get("defaults", {})
    base = Path(path).resolve().parent
    return [_options({**defaults, **entry}, base, f"--config {path} model {i + 1}") for i, entry in enumerate(models)]


def compile_all(jobs: list[CompileOptions], progress: Progress | None = None) -> tuple[list[dict], int]:
    """Compile every job; returns one summary per job and the exit code."""
    summaries, exit_code = [], 0
    for options in jobs:
        summary: dict[str, Any] = {"model": str(options.model)}
        try:
            result = compile_model(options, progress)
            summary.update(status="passed", out_dir=str(result.out_dir), report=result.report.to_dict())
        except QualityGateError as exc:
            summary.update(status="failed-quality-gate", error=str(exc))
            if exc.result is not None:
                summary.update(out_dir=str(exc.result.out_dir), report=exc.result.report.to_dict())
            exit_code = max(exit_code, 3) if exit_code != 2 else 2
        except KvCompileError as exc:
            summary.update(status="bad-input", error=str(exc))
            exit_code = 2
        summary["exit_code"] = {"passed": 0, "failed-quality-gate": 3, "bad-input": 2}[summary["status"]]
        summaries.append(summary)
    return summaries, exit_code
