"""The CLI's compile in a child process, so that the ORT-format converter never runs beside it.

The converter needs about twice the weights in its own process (987 MiB for SmolLM2's 517 MiB:
its peak comes while onnxruntime initializes the session, before it writes the FlatBuffer
that holds every weight inline). Started by the compiling process,
it ran beside that process's own memory (Python, onnxruntime and the compile's results, about
230 MiB), and SmolLM2's process tree reached 2.3x its weights for a few seconds, though each
process alone stayed below 2x.

So the CLI's own process, which has imported click and rich and little else (about 20 MiB), forks
a child that compiles (`pipeline.compile_into`: everything but the conversion and the report
files). When the child has read and checked the input it asks for the staging folder, which this
process creates and holds (with the output's lock: `output_dir.StagedOutput`). The child sends its
progress and then its result, or its error, through a socket pair, and exits. Only then does this
process run `finish.finish_compile` (the converter, then the report files) and rename the folder
into place: the tree holds this small process and one large one at a time.

The child is forked before the progress display starts its thread. It ignores Ctrl-C, which the
terminal sends to both processes: this process passes it on as SIGTERM, which the child turns
into KeyboardInterrupt so that its temporary files are removed, and it gets SIGTERM too if this
process dies (PR_SET_PDEATHSIG), so that no orphan keeps compiling or holds the lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from kvcompile.errors import KvCompileError, QualityGateError, how_process_ended
from kvcompile.finish import CompileResult, Progress, StagedCompile, finish_compile
from kvcompile.output_dir import StagedOutput, choose_output_dir

# compile_into(out_dir, open_stage, progress): the compile, run in the child (it imports the pipeline
# there); open_stage() returns the staging folder, created by the parent when first asked
CompileInto = Callable[[Path, Callable[[], Path], Progress], StagedCompile]
_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60  # how long an interrupted child may take to clean up before it is killed


class CompileProcessDied(KvCompileError):
    """The compile's process ended without a result: killed (the out-of-memory killer) or crashed."""

    exit_code = 1


class CompileProcessError(Exception):
    """An error of the child's that cannot be rebuilt here (its type does not pickle): its type's
    name and message, and the child's traceback as a note."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


def compile_in_child(model: Path, requested_out_dir: Path | None, compile_into: CompileInto,
                     progress: Progress, display: contextlib.AbstractContextManager[Any]) -> CompileResult:
    """Compile `model` into its output folder as described above; raises what the child raised,
    QualityGateError after writing, or CompileProcessDied. `display` (the progress bar) is entered
    once the child is running, and left once the report is written."""
    out_dir = choose_output_dir(model, requested_out_dir)
    with StagedOutput(out_dir) as output, contextlib.ExitStack() as shown:
        staged = _run_child(lambda open_stage, report: compile_into(out_dir, open_stage, report), output.folder,
                            progress, lambda: shown.enter_context(display))
        result = finish_compile(output.folder(), staged, progress)
    if staged.gate_failure is not None:
        raise QualityGateError(staged.gate_failure, result=result)
    return result


def _run_child(work: Callable[[Callable[[], Path], Progress], StagedCompile], open_stage: Callable[[], Path],
               progress: Progress, show: Callable[[], object]) -> StagedCompile:
    ours, theirs = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        ours.close()
        _child(work, theirs.makefile("rwb"))
    theirs.close()
    with ours, ours.makefile("rwb") as channel:
        try:
            show()  # the progress display's thread starts only now, after the fork
            outcome = _serve(channel, progress, open_stage)
        except BaseException:  # interrupted, or the staging folder could not be made: the child stops
            ours.shutdown(socket.SHUT_RDWR)  # a child still sending gets a broken pipe, not a full one
            _stop(pid)
            raise
    _, status, _ = os.wait4(pid, 0)  # the child's memory is gone before the converter starts
    if outcome is None:
        raise CompileProcessDied(f"the compile process {how_process_ended(status)}; previous output left untouched")
    kind, value = outcome
    if kind == "error":
        raise _rebuilt(*value)
    return value


def _serve(channel: BinaryIO, progress: Progress, open_stage: Callable[[], Path]) -> tuple[str, Any] | None:
    """Show the child's progress and give it the staging folder, until it sends its result or
    error (None: it ended without)."""
    advances: list[Callable[[int], None]] = []
    while True:
        try:
            message = pickle.load(channel)
        except EOFError:
            return None
        kind = message[0]
        if kind == "progress":
            advances.append(progress(message[1], message[2]))
        elif kind == "advance":
            advances[message[1]](message[2])
        elif kind == "stage":
            pickle.dump(open_stage(), channel)
            channel.flush()
        else:
            return kind, message[1]


def _child(work: Callable[[Callable[[], Path], Progress], StagedCompile], channel: BinaryIO) -> None:
    """Run the compile, send its outcome, and leave without running the parent's exit handlers."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _interrupted)
        prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        tasks = itertools.count()

        def send(message: tuple) -> None:
            pickle.dump(message, channel)
            channel.flush()

        def forwarded(description: str, total: int) -> Callable[[int], None]:
            index = next(tasks)
            send(("progress", description, total))
            return lambda units: send(("advance", index, units))

        def open_stage() -> Path:
            send(("stage",))
            return pickle.load(channel)

        try:
            send(("done", work(open_stage, forwarded)))
        except BaseException as exc:  # every error goes to the parent, which reports it
            send(("error", _described(exc)))
    except BaseException:  # the parent is gone (broken pipe) or interrupted us while sending
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _interrupted(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _described(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """The exception pickled when it pickles, its type's name, message and traceback."""
    try:
        pickled: bytes | None = pickle.dumps(exc)
    except Exception:
        pickled = None
    return pickled, type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))


def _rebuilt(pickled: bytes | None, type_name: str, message: str, trace: str) -> BaseException:
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if exc is None:
        exc = CompileProcessError(type_name, message)
    exc.add_note(f"in the compile process:\n{trace}")
    return exc


def _stop(pid: int) -> None:
    """Ask the child to stop (it cleans up), and kill it if it has not within STOP_GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
