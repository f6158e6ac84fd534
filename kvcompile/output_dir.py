"""The output folder: where a compile may write, and writing it whole or not at all.

- `check_output_dir` refuses folders that would clobber the input or an unrelated folder.
- `staged_output_dir` builds an output folder under a temporary name and renames it into place
  only when everything succeeded, so an interrupted compile leaves the previous output intact
  and no partial one, and two compiles into the same folder cannot interleave.

It imports nothing heavy (no onnx, no numpy): the CLI's own process holds the staging folder
and its lock while a child process compiles into it (`kvcompile.compile_process`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvcompile.errors import BadInputError

MANIFEST_NAME = "kvcompile.json"


def default_out_dir(model: Path) -> Path:
    return Path(model).parent / f"{Path(model).stem}.kvcompiled"


def choose_output_dir(model: Path, requested: Path | None) -> Path:
    """Where a compile of `model` writes (-o, else next to the model), refused if it would clobber
    the input or an unrelated folder."""
    out_dir = Path(requested) if requested is not None else default_out_dir(Path(model))
    check_output_dir(out_dir, Path(model))
    return out_dir


def _is_kvcompile_output(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def check_output_dir(out_dir: Path, model_path: Path) -> None:
    """Refuse output folders that would clobber the input or an unrelated folder."""
    out = out_dir.resolve()
    model = model_path.resolve()
    if out == model or model.is_relative_to(out):
        raise BadInputError(
            f"output folder {str(out_dir)!r} holds the input model; choose another -o folder"
        )
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output path {str(out_dir)!r} is a file; pass a folder to -o")
    if out.is_dir() and any(out.iterdir()) and not _is_kvcompile_output(out):
        raise BadInputError(
            f"output folder {str(out_dir)!r} is not empty and is not a kvcompile output; "
            "choose another -o folder or empty it"
        )
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _can_create_in(existing):
        raise BadInputError(f"cannot create {str(out_dir)!r}: {str(existing)!r} is not a writable folder")
    if _locked_by_another(_lock_path(out)):
        raise BadInputError(f"another kvcompile is writing {str(out_dir)!r}; wait for it or choose another -o")


def _can_create_in(folder: Path) -> bool:
    """Try it: permission bits do not tell (root ignores them; /proc, read-only mounts refuse)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kvcompile-probe.", dir=folder))
        return True
    except OSError:
        return False


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.kvcompile.lock"


def _locked_by_another(lock_path: Path) -> bool:
    """Whether a running compile holds this output's lock (checked without creating anything)."""
    try:
        with open(lock_path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15)
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two folders (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(second))


def _replace_blocking_signals(staging: Path, out: Path) -> None:
    """Two renames with Ctrl-C/SIGTERM held back between them, for file systems without exchange."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, retired / "previous")
        os.rename(staging, out)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir` by rename, else it is removed."""
    out = out_dir.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(out), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(
                f"another kvcompile is writing {str(out_dir)!r}; wait for it or choose another -o"
            ) from None
        # Holding the lock, nothing else writes here: folders left by a compile that was killed
        # (SIGKILL, power loss: no chance to clean up) are removed now.
        for stale in [*out.parent.glob(f".{out.name}.*.partial"), *out.parent.glob(f".{out.name}.*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
            yield staging
            if not out.exists():
                os.rename(staging, out)
            elif _exchange(staging, out):  # one syscall: Ctrl-C or a kill sees old or new, never neither
                shutil.rmtree(staging, ignore_errors=True)  # now holds the previous output
            else:
                _replace_blocking_signals(staging, out)
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        # The (empty) lock file stays: unlinking it would let a waiting compile lock a new inode.


class StagedOutput:
    """`staged_output_dir`, entered when the compile first asks for its folder (`folder()`): once
    the input has been read and checked, so that a refused input writes nothing, not even the
    lock file. On leaving, the folder is renamed into place if the block succeeded."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._stack = contextlib.ExitStack()
        self._folder: Path | None = None

    def folder(self) -> Path:
        if self._folder is None:
            self._folder = self._stack.enter_context(staged_output_dir(self.out_dir))
        return self._folder

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc_info: object) -> bool:
        return self._stack.__exit__(*exc_info)
