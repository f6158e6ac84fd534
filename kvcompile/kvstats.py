"""Calibration statistics of the KV cache: the value calibration produces and the planner reads.

Kept here (not in runtimes/) so the planner, the report and the targets use it without importing
a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TensorStats:
    samples: np.ndarray  # [N, H, D] float32, tokens in calibration order (strided if many)
    absmax: np.ndarray  # [H, D] over all calibration tokens
    minimum: np.ndarray  # [H, D]
    maximum: np.ndarray  # [H, D]
    tokens: int


@dataclass
class KVStats:
    tensors: dict[str, TensorStats]  # keyed by the cache's past input name
    tokens: int  # calibration tokens fed per sequence position count
