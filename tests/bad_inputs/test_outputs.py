"""Outputs under stress: Ctrl-C, a killed compile, two compiles into one folder, the input untouched.

Every test drives the real CLI in child processes and checks the folders byte for byte.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DYNAMO
from test_bad_inputs import assert_refused, copy_fixture, tree_digest, with_external_data

pytestmark = pytest.mark.slow
FAST = ["--calib-tokens", "2048", "--eval-tokens", "2048"]


def command(model: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "kvcompile.cli", str(model), "--kv-bits", "4", "-o", str(out), *FAST, *flags]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


def wait_for(condition, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the compile to reach the point under test")
        time.sleep(0.05)


@pytest.fixture()
def previous(tmp_path) -> tuple[Path, dict[str, str]]:
    """A finished compile in tmp_path/out, and the digest of every file in it."""
    out = tmp_path / "out"
    subprocess.run(command(DYNAMO, out), check=True, capture_output=True)
    return out, tree_digest(out)


@pytest.mark.parametrize("stage", ["calibrating", "writing"])
def test_ctrl_c_leaves_the_previous_output_intact(previous, stage):
    out, digest = previous
    child = subprocess.Popen(command(DYNAMO, out, "--scheme", "per-token"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    if stage == "writing":  # interrupt while the new output is being written under a temporary name
        wait_for(lambda: bool(leftovers(out.parent)) or child.poll() is not None)
    else:  # once the compile says it is calibrating (a fixed sleep raced a slow start on a busy machine)
        for line in child.stderr:
            if "calibrating" in line:
                break
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "kvcompile: interrupted; previous output left untouched"
    assert tree_digest(out) == digest
    assert leftovers(out.parent) == []


def test_a_killed_compile_leaves_the_previous_output_and_its_debris_is_cleaned(previous):
    out, digest = previous
    child = subprocess.Popen(command(DYNAMO, out, "--scheme", "per-token"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_for(lambda: bool(leftovers(out.parent)) or child.poll() is not None)
    child.kill()  # SIGKILL: no cleanup can run
    child.wait()
    assert tree_digest(out) == digest, "the previous output is whole"
    debris = leftovers(out.parent)
    subprocess.run(command(DYNAMO, out), check=True, capture_output=True)
    assert leftovers(out.parent) == [], f"the next compile removed {debris}"


def compile_process(cli: subprocess.Popen) -> int:
    """The pid of the child the CLI compiles in (kvcompile.compile_process), once it is calibrating."""
    for line in cli.stderr:
        if "calibrating" in line:
            break
    children = Path(f"/proc/{cli.pid}/task/{cli.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_a_compile_process_killed_by_the_system_is_one_line_and_leaves_the_previous_output(previous):
    """What the out-of-memory killer does: the CLI says so, in one line, exit 1, and nothing changed."""
    out, digest = previous
    cli = subprocess.Popen(command(DYNAMO, out, "--scheme", "per-token"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    os.kill(compile_process(cli), signal.SIGKILL)
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        "kvcompile: error: the compile process was killed by signal 9 (SIGKILL) (most likely by the "
        "out-of-memory killer: free memory or compile a smaller model); previous output left untouched")
    assert tree_digest(out) == digest
    assert leftovers(out.parent) == []


def test_a_killed_cli_takes_its_compile_process_with_it(previous):
    out, digest = previous
    cli = subprocess.Popen(command(DYNAMO, out, "--scheme", "per-token"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    child = compile_process(cli)
    cli.kill()
    cli.wait()
    wait_for(lambda: not running(child), seconds=60)  # PR_SET_PDEATHSIG: it does not compile on, orphaned
    assert tree_digest(out) == digest


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_compile_holding_the_lock_makes_another_refuse(previous):
    out, digest = previous
    lock_path = out.parent / f".{out.name}.kvcompile.lock"
    with open(lock_path, "w") as lock:  # what a running compile holds while it writes
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = tree_digest(out.parent)
        result = subprocess.run(command(DYNAMO, out), capture_output=True, text=True)
        assert_refused(result, "another kvcompile is writing", out.parent, before)
    assert tree_digest(out) == digest


def test_two_compiles_racing_into_one_folder_leave_one_whole_output(tmp_path):
    out = tmp_path / "out"
    children = [subprocess.Popen(command(DYNAMO, out, "--scheme", scheme), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for scheme in ("per-token", "per-channel")]
    results = [(child.wait(timeout=600), child.stderr.read()) for child in children]
    for code, stderr in results:
        assert code == 0 or (code == 2 and "another kvcompile is writing" in stderr), stderr
    assert any(code == 0 for code, _ in results)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "kvcompile.json").read_text())
    assert report["plan"]["scheme"] in ("per-token", "per-channel")
    stored = {entry["granularity"] for entry in manifest["targets"]["ort-cpu"]["kv"]}
    assert stored == {report["plan"]["scheme"]}, "report and manifest come from the same compile"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("form", ["self-contained", "external-data"])
def test_the_input_model_is_never_modified(tmp_path, form):
    """Not by the in-memory rewrites (rotation is applied to the loaded graph), not by staging."""
    model = copy_fixture(tmp_path / "in") if form == "self-contained" else with_external_data(tmp_path / "in")
    digest = tree_digest(model.parent)
    stats = {p.name: p.stat().st_mtime_ns for p in model.parent.iterdir()}
    subprocess.run(command(model, tmp_path / "out", "--rotate", "hadamard", "--fuse-attention", "off"),
                   check=True, capture_output=True)
    assert tree_digest(model.parent) == digest
    assert {p.name: p.stat().st_mtime_ns for p in model.parent.iterdir()} == stats
