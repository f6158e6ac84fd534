"""Wall time and peak RSS of a command, run as the only child of a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

# The measuring process does nothing but wait and sample. The peak RSS is the larger of two lower
# bounds of the process tree's peak: RUSAGE_CHILDREN's ru_maxrss (the largest single process,
# exact) and the summed RSS of the command and all its descendants sampled every 0.2 s (a child
# such as the ORT-format converter runs beside the compile that holds its own memory).
_MEASURE = """
import json, os, resource, subprocess, sys, threading, time

def tree_rss_kib(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total

started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
output = {}
threads = [threading.Thread(target=lambda name, stream: output.__setitem__(name, stream.read()), args=pair)
           for pair in (("stdout", process.stdout), ("stderr", process.stderr))]
for thread in threads:
    thread.start()
peak_tree = 0
while process.poll() is None:
    peak_tree = max(peak_tree, tree_rss_kib(process.pid))
    time.sleep(0.2)
for thread in threads:
    thread.join()
print(json.dumps({"returncode": process.returncode, "seconds": time.perf_counter() - started,
                  "rss_kib": max(peak_tree, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
                  "stdout": output["stdout"][-20000:], "stderr": output["stderr"][-4000:]}))
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
