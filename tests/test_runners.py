"""kvcompile run / eval, the copyable onnxruntime runner, and compile --config (the CI job)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import DYNAMO, OUTLIERS, REPO
from kvcompile.errors import QualityGateError
from kvcompile.pipeline import CompileOptions, compile_model

pytestmark = pytest.mark.slow
CONTEXT = 48
PROMPT = "The GNU General Public License"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def every_target(tmp_path_factory):
    out = tmp_path_factory.mktemp("runners") / "out"
    compile_model(CompileOptions(model=DYNAMO, out_dir=out, targets=("all",), max_context=CONTEXT,
                                 calib_tokens=2048, eval_tokens=2048))
    return out


@pytest.mark.parametrize("target", ["ort-cpu", "nnapi"])
def test_copyable_runner_generates_what_kvcompile_run_does(every_target, target):
    ours = run("-m", "kvcompile.cli", "run", str(every_target), "--prompt", PROMPT, "--max-new-tokens", "24",
               "--target", target)
    theirs = run("examples/ort_runner.py", str(every_target), "--prompt", PROMPT, "--max-new-tokens", "24",
                 "--target", target)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout and len(ours.stdout) > len(PROMPT) + 20
    assert "tokens/s" in ours.stderr and "KV cache" in ours.stderr and "KV cache" in theirs.stderr


def test_copyable_runner_imports_nothing_from_kvcompile():
    tree = ast.parse((REPO / "examples" / "ort_runner.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "json", "sys", "time", "pathlib", "numpy", "onnxruntime",
                        "tokenizers"}, imported


@pytest.mark.parametrize("target", ["qnn-htp", "tflite", "nnapi"])
def test_run_every_static_target_past_max_context(every_target, target):
    """60 new tokens on a 48-token buffer: the sliding window keeps generating."""
    result = run("-m", "kvcompile.cli", "run", str(every_target), "--prompt", PROMPT, "--max-new-tokens", "60",
                 "--target", target)
    assert result.returncode == 0, result.stderr
    assert "60 tokens generated" in result.stderr and f"{target} on" in result.stderr
    assert "time to first token" in result.stderr and "59 steps in" in result.stderr
    fed = f"prefill graph, {CONTEXT // 2} tokens a call" if target == "qnn-htp" else "one token a call"
    assert f"({fed})" in result.stderr
    assert len(result.stdout.strip()) > len(PROMPT) + 60


def test_sampling_is_seeded(every_target):
    args = ["-m", "kvcompile.cli", "run", str(every_target), "--prompt", PROMPT, "--max-new-tokens", "16",
            "--temperature", "0.8", "--top-k", "20"]
    first, again, other = run(*args, "--seed", "1"), run(*args, "--seed", "1"), run(*args, "--seed", "2")
    assert first.stdout == again.stdout and first.stdout != other.stdout


def test_eval_uses_the_verifiers_measurement(every_target):
    result = run("-m", "kvcompile.cli", "eval", str(every_target), "--tokens", "2048", "--json")
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    # Windows of the context the compile verified at (--max-context 48), cut as its verifier cuts them.
    assert measured["target"] == "ort-cpu" and measured["window"] == CONTEXT and measured["prefill"] == CONTEXT // 4
    assert measured["tokens"] == 2048 // CONTEXT * (CONTEXT - CONTEXT // 4 - 1)
    assert 20 < measured["ppl"] < 80
    report = json.loads((every_target / "report.json").read_text())
    assert set(report["targets"]) == {"ort-cpu", "qnn-htp", "nnapi", "tflite"}


def test_compile_config_compiles_all_and_exits_with_the_worst(tmp_path):
    config = tmp_path / "models.toml"
    config.write_text(f'''
[defaults]
kv_bits = 4
calib_tokens = 1024
eval_tokens = 1024

[[models]]
path = "{DYNAMO}"
out = "good"

[[models]]
path = "{OUTLIERS}"
out = "naive"
scheme = "per-tensor"
fuse_attention = "off"
''')
    result = run("-m", "kvcompile.cli", "compile", "--config", str(config), "--json")
    assert result.returncode == 3, result.stderr
    summaries = json.loads(result.stdout)
    assert [s["status"] for s in summaries] == ["passed", "failed-quality-gate"]
    assert (tmp_path / "good" / "report.json").is_file() and (tmp_path / "naive" / "report.md").is_file()
    config.write_text(config.read_text() + '\n[[models]]\npath = "missing.onnx"\n')
    result = run("-m", "kvcompile.cli", "compile", "--config", str(config), "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)[2]["status"] == "bad-input"


def test_ci_example_config_is_valid():
    from kvcompile.batch import load_config

    jobs = load_config(REPO / "examples" / "ci" / "models.toml")
    assert [job.model.name for job in jobs] == ["model.onnx", "model.onnx"] and all(job.model.is_file() for job in jobs)
    assert (REPO / "examples" / "ci" / "kvcompile.yml").read_text().count("kvcompile compile --config") == 1


def test_python_api_example_compiles_and_generates(tmp_path):
    result = run("examples/compile_and_run.py", str(DYNAMO), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary, text = result.stdout.split("\n", 1)
    ratio = json.loads((tmp_path / "out" / "report.json").read_text())["memory"]["ratio_vs_fp16"]
    assert 3.9 < ratio < 4.0, "4-bit codes plus a few KB of static scales and key centers"
    assert f"{ratio:.2f}x smaller than float16" in summary and text.startswith("The GNU General Public License")
    assert len(text) > 60


@pytest.fixture(scope="module")
def slotted(tmp_path_factory):
    """Every target with float slots: a gate no 4-bit cache passes makes the compile add them
    (2 sinks + 8 recent on a 48-token buffer, so the ring turns over and tokens leave it)."""
    out = tmp_path_factory.mktemp("runners") / "slotted"
    with pytest.raises(QualityGateError):
        compile_model(CompileOptions(model=DYNAMO, out_dir=out, targets=("all",), max_context=CONTEXT,
                                     calib_tokens=2048, eval_tokens=2048, float_slots=(2, 8),
                                     quality_gate_pct=-100.0))
    return out


def test_static_targets_take_the_float_slots(slotted):
    manifest = json.loads((slotted / "kvcompile.json").read_text())
    for target in ("qnn-htp", "nnapi", "tflite"):
        io = manifest["targets"][target]
        assert io["options"]["float_slots"] == [2, 8]
        assert all([p["kind"] for p in kv["params"]] == ["float_slots"] for kv in io["kv"])


def test_copyable_runner_keeps_the_float_slots_as_kvcompile_run_does(slotted):
    ours = run("-m", "kvcompile.cli", "run", str(slotted), "--prompt", PROMPT, "--max-new-tokens", "60",
               "--target", "nnapi")
    theirs = run("examples/ort_runner.py", str(slotted), "--prompt", PROMPT, "--max-new-tokens", "60",
                 "--target", "nnapi")
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout and len(ours.stdout) > len(PROMPT) + 60


@pytest.mark.parametrize("target", ["qnn-htp", "tflite"])
def test_run_static_targets_with_float_slots_past_max_context(slotted, target):
    result = run("-m", "kvcompile.cli", "run", str(slotted), "--prompt", PROMPT, "--max-new-tokens", "60",
                 "--target", target)
    assert result.returncode == 0, result.stderr
    assert "60 tokens generated" in result.stderr and len(result.stdout.strip()) > len(PROMPT) + 60
