"""The CLI compiles in a child process and runs the ORT-format converter after it has exited
(kvcompile.compile_process): the process tree holds the small CLI process and one large one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DYNAMO
from kvcompile.compile_process import CompileProcessError, _described, _rebuilt
from kvcompile.errors import BadInputError

# Runs the real CLI in this fresh process, and records, when the converter starts: this process's
# peak RSS so far, and which of its children are still alive.
_WATCH = """
import json, os, sys
import kvcompile.finish

watched = sys.argv[1]

def run_converter(pending, converter=kvcompile.finish.run_converter):
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = [c for t in os.listdir("/proc/self/task")
                for c in open(f"/proc/self/task/{t}/children").read().split()]
    with open(watched, "w") as f:
        json.dump({"cli_peak_mib": peak_kib / 1024, "children_alive": children}, f)
    return converter(pending)

kvcompile.finish.run_converter = run_converter
from kvcompile.cli import main
sys.argv = ["kvcompile", *sys.argv[2:]]
main()
"""


def test_the_converter_runs_after_the_compile_process_and_the_cli_stays_small(tmp_path):
    watched = tmp_path / "watched.json"
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", _WATCH, str(watched), str(DYNAMO), "--kv-bits", "4", "-o", str(out),
                    "--calib-tokens", "2048", "--eval-tokens", "2048"], check=True, capture_output=True)
    seen = json.loads(watched.read_text())
    report = json.loads((out / "report.json").read_text())
    peaks = report["timings"]["peak_rss_mib"]
    assert seen["children_alive"] == [], "the compile process has exited before the converter starts"
    # The CLI process never held the compile's memory (the fixture's compile peaks near 300 MiB).
    assert seen["cli_peak_mib"] < 40 and seen["cli_peak_mib"] < peaks["verify"] / 3, (seen, peaks)
    assert peaks["ort_format_converter"] > 0 and report["timings"]["ort_format_s"] > 0
    assert (out / "ort-cpu" / "model.ort").stat().st_size > 0
    assert not (out / "ort-cpu" / ".ort-format").exists()


class _Unpicklable(Exception):
    def __init__(self, message: str, extra: int):
        super().__init__(message)
        self.handle = lambda: extra  # a lambda does not pickle


def test_an_error_the_compile_process_raises_comes_back_as_itself_or_by_name():
    back = _rebuilt(*_described(BadInputError("model file 'x.onnx' does not exist")))
    assert type(back) is BadInputError and str(back) == "model file 'x.onnx' does not exist"
    try:
        raise _Unpicklable("the session failed", 3)
    except _Unpicklable as exc:
        back = _rebuilt(*_described(exc))
    assert isinstance(back, CompileProcessError) and back.type_name == "_Unpicklable"
    assert str(back) == "the session failed"
    assert any("in the compile process" in note and "_Unpicklable" in note for note in back.__notes__)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device", "x.data")])
def test_interrupts_and_os_errors_keep_what_the_cli_reads(error):
    back = _rebuilt(*_described(error))
    assert type(back) is type(error)
    if isinstance(error, OSError):
        assert (back.errno, back.filename) == (28, "x.data")


def test_the_cli_writes_byte_identical_artifacts_whatever_the_folder_is_called(tmp_path):
    """The CLI's converter starts from its small parent process, not from the compile's: the ORT
    file must still not depend on anything but the model (test_compile checks compile_model's)."""
    folders = ("a", "a-longer-output-folder-name")
    for name in folders:
        subprocess.run([sys.executable, "-m", "kvcompile.cli", str(DYNAMO), "--kv-bits", "4", "-o", str(tmp_path / name),
                        "--calib-tokens", "2048", "--eval-tokens", "2048"], check=True, capture_output=True)
    for relative in ("ort-cpu/model.ort", "ort-cpu/model.onnx", "kvcompile.json", "report.md", "report.png"):
        first, second = ((tmp_path / name / relative).read_bytes() for name in folders)
        assert first == second, relative
