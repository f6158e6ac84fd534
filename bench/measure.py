"""Wall time and peak RSS of a command, run as the only child of a fresh process."""

from __future__ import annotations

import subprocess
import sys

# The measuring process does nothing but wait, so RUSAGE_CHILDREN's ru_maxrss is the largest
# resident set of the command and of every process it started (e.g. the ORT-format converter).
_MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if result.returncode:
    sys.stderr.write(result.stderr[-2000:])
    sys.exit(result.returncode)
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `command`; raises CalledProcessError with its stderr."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True)
    if result.returncode:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    seconds, rss_kib = result.stdout.split()
    return float(seconds), int(rss_kib) / 1024
