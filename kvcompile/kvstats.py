"""Calibration statistics of the KV cache: the value calibration produces and the planner reads.

Kept here (not in runtimes/) so the planner, the report and the targets use it without importing
a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TensorStats:
    held_samples: np.ndarray | None  # [N, H, D] float32, tokens in calibration order (strided if many)
    absmax: np.ndarray  # [H, D] over all calibration tokens
    minimum: np.ndarray  # [H, D]
    maximum: np.ndarray  # [H, D]
    tokens: int
    samples_file: Path | None = None  # the samples as raw float32 when calibration wrote them to disk

    @property
    def samples(self) -> np.ndarray:
        """The samples: held, or read from `samples_file` (calibration of a large model streams
        them there: held through the compile they cost their size, SmolLM2's 377 MB)."""
        if self.samples_file is None:
            return self.held_samples
        return np.fromfile(self.samples_file, dtype=np.float32).reshape(-1, *self.absmax.shape)


@dataclass
class KVStats:
    tensors: dict[str, TensorStats]  # keyed by the cache's past input name
    tokens: int  # calibration tokens fed per sequence position count
