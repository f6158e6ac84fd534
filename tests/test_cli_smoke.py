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


def test_a_full_disk_is_one_line_not_a_bug(monkeypatch, capsys):
    """A compile that runs out of disk (SmolLM2's outputs and work files are a few GB) is told so:
    the machine's problem, not kvcompile's."""
    import errno

    from kvcompile import cli

    def full_disk(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/ort-cpu/model.onnx.data")

    monkeypatch.setattr(cli.cli, "main", full_disk)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no space left on the device (/out/ort-cpu/model.onnx.data)" in lines[0]
    assert "bug" not in lines[0] and "TMPDIR" in lines[0]
