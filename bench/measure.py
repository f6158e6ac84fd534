"""Wall time and peak RSS of a command, run as the only child of a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

# The measuring process does nothing but wait, so RUSAGE_CHILDREN's ru_maxrss is the largest
# resident set of the command and of every process it started (e.g. the ORT-format converter).
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"returncode": result.returncode, "seconds": time.perf_counter() - started,
                  "rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stdout": result.stdout[-20000:], "stderr": result.stderr[-4000:]}))
"""


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    rss_mib: float
    stdout: str
    stderr: str


def run_measured(command: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run `command` and return its exit code, wall time, peak RSS (MiB) and output."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env,
                            check=True)
    data = json.loads(result.stdout)
    return Measured(data["returncode"], data["seconds"], data["rss_kib"] / 1024, data["stdout"], data["stderr"])


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `command`; raises CalledProcessError with its stderr."""
    measured = run_measured(command)
    if measured.returncode:
        sys.stderr.write(measured.stderr[-2000:])
        raise subprocess.CalledProcessError(measured.returncode, command, measured.stdout, measured.stderr)
    return measured.seconds, measured.rss_mib
