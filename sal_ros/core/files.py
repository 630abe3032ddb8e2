"""Atomic file writes: the one way sal_ros writes a file that someone else may read.

``atomic_write(path, data)`` (bytes, str, or a function that writes to an open file) and ``atomic_open(path)``
(a context manager yielding that file) write a temporary file in the destination folder, flush and fsync it, then
``os.replace`` it over ``path`` and fsync the folder. A reader sees the old file or the whole new one, never half a
file; a failure (an exception in the writer, a full disk) leaves the old file untouched and removes the temporary
file. A killed process can leave a temporary file behind: its name starts with ``TMP_PREFIX`` (``.tmp-``), and
``remove_temp_files(folder)`` cleans them up on the next run.

The file gets the mode ``open(path, "w")`` would give it, 0666 minus the umask (0644 under the usual 022), not
``tempfile.mkstemp``'s 0600: reports, calibration files and datasets are read by other users and tools.

Reading a file someone hands us (a config, a vocabulary, a calibration) goes through ``read_regular_file``: a FIFO,
a device or a folder is refused before ``open`` (opening a FIFO blocks until a writer comes; ``/dev/zero`` never
ends), and so is a file over a size bound, with a :class:`FileRefusedError` whose ``reason`` names why.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

TMP_PREFIX = ".tmp-"
DEFAULT_MAX_READ_BYTES = 16 << 20  # configs, vocabularies and calibration files are kilobytes


class FileRefusedError(ValueError):
    """A file we were asked to read is not a regular file or is too large; ``reason`` is a name to count
    (``not_regular_file``, ``file_too_large``), the message names the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

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


def check_regular_file(path: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
                       what: str = "file") -> os.stat_result:
    """``stat`` ``path`` (following links) and refuse it unless it is a regular file of at most ``max_bytes``
    (None: any size). Never opens it, so a FIFO or a device cannot block or stream. OSError if it is missing."""
    st = os.stat(path)
    _check_stat(st, path, max_bytes, what)
    return st


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
                      what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is refused before it is opened
    (:class:`FileRefusedError`). Opened non-blocking and checked again on the open descriptor, so a file swapped
    for a FIFO in between cannot block either; a file that grows past the bound while read is refused too."""
    check_regular_file(path, max_bytes, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        _check_stat(os.fstat(fd), path, max_bytes, what)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileRefusedError("file_too_large", f"{what} {path}: larger than {max_bytes} bytes")
    return data


def read_text_file(path: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
                   what: str = "file") -> str:
    """``read_regular_file`` decoded as UTF-8 (ValueError naming the file and the byte otherwise)."""
    data = read_regular_file(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _check_stat(st: os.stat_result, path: str | os.PathLike, max_bytes: int | None, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
        raise FileRefusedError("not_regular_file", f"{what} {path}: is {kind}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise FileRefusedError("file_too_large",
                               f"{what} {path}: {st.st_size} bytes, more than the limit of {max_bytes}")


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / inf float (a score of nothing: 0/0) as None, numpy scalars as Python numbers and
    tuples as lists, so that it is valid JSON (``null``); ``json.dumps`` would write the invalid ``NaN``."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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
