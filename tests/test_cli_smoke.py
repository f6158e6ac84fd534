"""CLI smoke tests: help, version, and a one-line error for a missing model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvcompile import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [["--help"], ["compile", "--help"], ["inspect", "--help"]])
def test_help(args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize("args", [["missing.onnx", "--kv-bits", "4"], ["compile", "missing.onnx"],
                                  ["inspect", "missing.onnx"]])
def test_missing_model_is_one_line_exit_2(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "missing.onnx" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written for bad input"
