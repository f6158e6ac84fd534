"""The errors kvcompile reports to users.

Every error a user can cause or fix is a `KvCompileError` with a one-line message that says what
is wrong and what to do. The CLI prints the message and exits with `exit_code`; anything else
that escapes is a bug in kvcompile.
"""

from __future__ import annotations

import os
import signal


class KvCompileError(Exception):
    """A problem with the user's input or environment (exit code 2)."""

    exit_code = 2


class BadInputError(KvCompileError):
    """The model, a data file or an option cannot be used as given."""


class UnsupportedModelError(KvCompileError):
    """The model is valid ONNX but kvcompile cannot find or rewrite its KV cache."""


class TargetError(KvCompileError):
    """A target cannot be built here or cannot hold what the plan asks for."""


class QualityGateError(KvCompileError):
    """The compiled model lost more quality than the gate allows (exit code 3).

    The artifacts and report are written (marked failed) before this is raised; `result`
    carries them.
    """

    exit_code = 3

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result


def how_process_ended(status: int) -> str:
    """How a child process ended, from its wait status, for an error line: "was killed by signal 9
    (SIGKILL) (most likely by the out-of-memory killer: ...)" or "exited with status 1"."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        likely = (" (most likely by the out-of-memory killer: free memory or compile a smaller model)"
                  if number == signal.SIGKILL else "")
        return f"was killed by signal {number} ({signal.Signals(number).name}){likely}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
