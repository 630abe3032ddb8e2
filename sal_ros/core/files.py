"""Atomic file writes: the one way sal_ros writes a file that someone else may read.

``atomic_write(path, data)`` (bytes, str, or a function that writes to an open file) and ``atomic_open(path)``
(a context manager yielding that file) write a temporary file in the destination folder, flush and fsync it, then
``os.replace`` it over ``path`` and fsync the folder. A reader sees the old file or the whole new one, never half a
file; a failure (an exception in the writer, a full disk) leaves the old file untouched and removes the temporary
file. A killed process can leave a temporary file behind: its name starts with ``TMP_PREFIX`` (``.tmp-``), and
``remove_temp_files(folder)`` cleans them up on the next run.

The file gets the mode ``open(path, "w")`` would give it, 0666 minus the umask (0644 under the usual 022), not
``tempfile.mkstemp``'s 0600: reports, calibration files and datasets are read by other users and tools.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

TMP_PREFIX = ".tmp-"

Data = Union[bytes, bytearray, memoryview, str, Callable[[IO], Any]]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing (``mode`` "wb" or "w"); on a clean exit of the block it
    replaces ``path``, on an exception it is removed and ``path`` keeps its old content."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: Data) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``. ``data``: bytes-like, str (UTF-8), or a function
    called with the open binary file (``lambda f: torch.save(obj, f)``, ``lambda f: fig.savefig(f, format="png")``)."""
    with atomic_open(path, "wb") as f:
        if callable(data):
            data(f)
        elif isinstance(data, str):
            f.write(data.encode("utf-8"))
        else:
            f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (2 spaces, a final newline; NaN and inf are refused), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Remove the temporary files interrupted writes left in ``folder`` (never a finished file); how many."""
    n = 0
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file ``.tmp-<name>.<random>`` beside ``path``, mode 0666 minus the umask (the kernel applies it)."""
    while True:
        tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (the directory entry); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
