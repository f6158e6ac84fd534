"""Back ends. Each module lowers the rewritten model for one target, writes its artifacts and
verifies them (the `Target` protocol in `targets/base.py`); this registry is the one list of them.
Adding a target is one module and one line here."""

from __future__ import annotations

from kvcompile.targets import nnapi, ort_cpu, qnn_htp, tflite
from kvcompile.targets.base import Target

# ort-cpu first: every compile builds and verifies it, and its quality is the compile's gate.
TARGETS: dict[str, Target] = {target.name: target for target in (
    ort_cpu.TARGET,
    qnn_htp.TARGET,
    nnapi.TARGET,
    tflite.TARGET,
)}
