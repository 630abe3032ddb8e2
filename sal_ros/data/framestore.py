"""FrameStore: the dataset folder the recorder node writes and the pseudo-label engine reads.

Layout::

    ROOT/frames/<key>.npz   one Frame: points, intensity, ground truth, each camera's image, intrinsics, T, stamps,
                            and the lidar's pose in a fixed frame when the recorder had one (``pose``, 4x4)
    ROOT/index.jsonl        one JSON line per stored frame, in recording order (the list readers see); ``pose``
                            (16 numbers, row-major) and ``pose_frame`` repeat the frame file's pose, so readers of
                            poses (Seal's temporal term) need not open the frames

Stores written before poses existed have neither member and still load (their frames have no pose).

Crash safety (``kill -9`` at any moment): a frame file is written under a temporary name, fsynced and renamed
into place; only then its index line is appended (one write, flushed and fsynced). Readers list frames from the
index, so they never see a partial file, and a completed frame is never lost: on the next ``append`` (a resumed
recording) a frame file without an index line is indexed, temporary files are removed and a torn last index line
is cut off. Readers skip a torn last line. One writer at a time (an advisory lock on ``ROOT/.lock``).

Full disk: an index line is written whole or not at all. A short or failed write is cut back to where the line
began (and the write fails with OSError naming the file); a line is read back after its fsync and compared. Should
a torn record remain anyway (the cut failed too), the next append cuts it before writing, readers skip it and the
records glued after it are salvaged (``index_problems`` says which lines, a warning names the file), and the next
writer rewrites the index without it. An index line whose ``file`` is not a plain path under ``frames/`` (absolute,
``..``) is skipped the same way: a store never reads outside its folder.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import atomic_write, remove_temp_files
from sal_ros.core.types import CameraView, Frame

FORMAT_VERSION = 1
INDEX_FILE = "index.jsonl"
FRAMES_DIR = "frames"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_RECORD_START = b'{"key":'  # every index line starts so (json.dumps keeps the entry's key order)

log = logging.getLogger(__name__)


class FrameStore:
    """``append(frame)`` writes a frame; ``keys()``, ``load(key)``, ``len()`` and iteration read them.

    Limits (writer side): ``every_nth`` keeps one frame in N appends; ``max_frames`` and ``max_bytes`` (frame
    files in total) stop the store, after which ``append`` returns False.
    """

    def __init__(self, root: str | os.PathLike, every_nth: int = 1, max_frames: int | None = None,
                 max_bytes: int | None = None, compress: bool = False) -> None:
        if every_nth < 1:
            raise ValueError(f"every_nth must be >= 1, got {every_nth}")
        self.root = Path(root)
        self.every_nth, self.max_frames, self.max_bytes, self.compress = every_nth, max_frames, max_bytes, compress
        self._entries: list[dict] = []
        self._by_key: dict[str, dict] = {}
        self._index_size = -1  # bytes of index.jsonl already parsed
        self._appends = 0
        self._lock_fd: int | None = None
        self.index_problems: list[str] = []  # index lines skipped by the last read: torn, not JSON, unsafe path

    # ----------------------------------------------------------------------------------------------- reading

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def keys(self) -> list[str]:
        """Stored frame keys in recording order (re-reads the index when another process appended)."""
        self._refresh()
        return [e["key"] for e in self._entries]

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: str) -> bool:
        self._refresh()
        return key in self._by_key

    def __iter__(self) -> Iterator[Frame]:
        for key in self.keys():
            yield self.load(key)

    def entry(self, key: str) -> dict:
        """The index line of ``key`` (stamp, points, cameras, bytes, ...)."""
        self._refresh()
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"{self.root}: no frame {key!r}") from None

    def load(self, key: str) -> Frame:
        path = self.root / self.entry(key)["file"]
        try:
            with np.load(path, allow_pickle=False) as data:
                return _frame_from_arrays(data)
        except (OSError, ValueError, KeyError) as exc:
            raise SensorDataError(f"{path}: unreadable frame file ({exc})") from exc

    @property
    def total_bytes(self) -> int:
        self._refresh()
        return sum(int(e["bytes"]) for e in self._entries)

    def _refresh(self) -> None:
        try:
            size = self.index_path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size == self._index_size:
            return
        self._entries, self._by_key = [], {}
        entries, problems = _read_index(self.index_path)
        if problems and problems != self.index_problems:
            log.warning("%s: %d index line(s) skipped (%s); %d frames readable", self.index_path, len(problems),
                        "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""), len(entries))
        self.index_problems = problems
        for entry in entries:
            if entry["key"] not in self._by_key:
                self._entries.append(entry)
                self._by_key[entry["key"]] = entry
        self._index_size = size

    # ----------------------------------------------------------------------------------------------- writing

    def pose(self, key: str) -> tuple[np.ndarray, str] | None:
        """The lidar's pose stored with ``key`` (T_fixed_lidar, 4x4) and its fixed frame, or None."""
        entry = self.entry(key)
        if entry.get("pose") is None:
            return None
        return np.array(entry["pose"], np.float64).reshape(4, 4), entry["pose_frame"]

    def append(self, frame: Frame, pose: tuple[np.ndarray, str] | None = None) -> str | None | bool:
        """Store ``frame`` with the lidar's ``pose`` (T_fixed_lidar, the fixed frame's name) when known; returns
        its key, None when ``every_nth`` skips it, False when a limit is reached.

        A frame whose key is already stored (a replayed bag, a resumed run) is not written again; its key is
        returned.
        """
        self._open_for_writing()
        self._appends += 1
        if (self._appends - 1) % self.every_nth:
            return None
        key = frame_key(frame)
        if key in self._by_key:
            return key
        if self._full(0):
            return False
        buf = io.BytesIO()  # encoded first: the byte limit is checked before anything is written
        (np.savez_compressed if self.compress else np.savez)(buf, **_frame_arrays(frame, pose))
        size = buf.getbuffer().nbytes
        if self._full(size):
            return False
        final = atomic_write(self.root / FRAMES_DIR / f"{key}.npz", buf.getbuffer())
        self._append_index(_index_entry(frame, key, final.relative_to(self.root).as_posix(), size, pose))
        return key

    def _full(self, incoming_bytes: int) -> bool:
        if self.max_frames is not None and len(self._entries) >= self.max_frames:
            return True
        return self.max_bytes is not None and self.total_bytes + incoming_bytes > self.max_bytes

    def _append_index(self, entry: dict) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        _append_record(self.index_path, line)
        self._entries.append(entry)
        self._by_key[entry["key"]] = entry
        self._index_size = self.index_path.stat().st_size

    def _open_for_writing(self) -> None:
        """First append of this process: lock, then repair what a killed writer left (see the module docstring)."""
        if self._lock_fd is not None:
            return
        import fcntl

        (self.root / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.root}: another process is writing to this FrameStore") from None
        self._lock_fd = fd
        _cut_torn_line(self.index_path)
        self._index_size = -1
        self._refresh()
        if self.index_problems:  # rewrite the index without the lines readers skip
            atomic_write(self.index_path, b"".join((json.dumps(e, separators=(",", ":")) + "\n").encode()
                                                   for e in self._entries))
            log.warning("%s: rewritten without %d skipped line(s)", self.index_path, len(self.index_problems))
            self._index_size = -1
            self._refresh()
        remove_temp_files(self.root / FRAMES_DIR)
        indexed = {e["file"] for e in self._entries}
        for path in sorted((self.root / FRAMES_DIR).glob("*.npz"), key=lambda p: p.stat().st_mtime_ns):
            rel = path.relative_to(self.root).as_posix()
            if rel not in indexed:  # renamed into place, killed before its index line: complete, index it
                with np.load(path, allow_pickle=False) as data:
                    frame, pose = _frame_from_arrays(data), _pose_from_arrays(data)
                self._append_index(_index_entry(frame, path.stem, rel, path.stat().st_size, pose))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def frame_key(frame: Frame) -> str:
    """The file-safe key of a frame: its ``key``, else its stamp."""
    key = _UNSAFE.sub("_", frame.key or str(frame.stamp_ns))
    if key.startswith("."):
        key = "_" + key[1:]
    return key


# -------------------------------------------------------------------------------------------------- format


def _frame_arrays(frame: Frame, pose: tuple[np.ndarray, str] | None = None) -> dict[str, np.ndarray]:
    """The npz members of a frame; names and strings live in a JSON ``meta`` (no pickled objects)."""
    arrays = {"points": np.asarray(frame.points, np.float32)}
    if pose is not None:
        arrays["pose"] = _checked_pose(pose[0])
    if frame.intensity is not None:
        arrays["intensity"] = np.asarray(frame.intensity, np.float32)
    if frame.gt_labels is not None:
        arrays["gt_labels"] = np.asarray(frame.gt_labels, np.uint32)
    cameras = []
    for i, view in enumerate(frame.cameras.values()):
        model = view.camera
        arrays[f"cam{i}_image"] = np.asarray(view.image)
        arrays[f"cam{i}_K"] = np.asarray(model.K, np.float64)
        arrays[f"cam{i}_D"] = np.asarray(model.D, np.float64)
        arrays[f"cam{i}_T"] = np.asarray(view.T_cam_lidar, np.float64)
        cameras.append({"name": view.name, "frame_id": view.frame_id, "stamp_ns": int(view.stamp_ns),
                        "width": model.width, "height": model.height, "distortion_model": model.distortion_model})
    meta = {"format": FORMAT_VERSION, "stamp_ns": int(frame.stamp_ns), "frame_id": frame.frame_id, "key": frame.key,
            "missing_cameras": list(frame.missing_cameras), "cameras": cameras}
    if pose is not None:
        meta["pose_frame"] = pose[1]
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def _frame_from_arrays(data: Any) -> Frame:
    from sal_ros.core.camera import CameraModel

    meta = json.loads(str(data["meta"]))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"frame format {meta.get('format')} (this sal_ros reads {FORMAT_VERSION})")
    frame = Frame(stamp_ns=int(meta["stamp_ns"]), frame_id=meta["frame_id"], points=data["points"],
                  intensity=data["intensity"] if "intensity" in data else None,
                  missing_cameras=tuple(meta["missing_cameras"]), key=meta["key"],
                  gt_labels=data["gt_labels"] if "gt_labels" in data else None)
    for i, cam in enumerate(meta["cameras"]):
        model = CameraModel(K=data[f"cam{i}_K"], width=cam["width"], height=cam["height"], D=data[f"cam{i}_D"],
                            distortion_model=cam["distortion_model"])
        frame.cameras[cam["name"]] = CameraView(name=cam["name"], image=data[f"cam{i}_image"], camera=model,
                                                T_cam_lidar=data[f"cam{i}_T"], stamp_ns=int(cam["stamp_ns"]),
                                                frame_id=cam["frame_id"])
    return frame


def _pose_from_arrays(data: Any) -> tuple[np.ndarray, str] | None:
    if "pose" not in data:
        return None
    return np.array(data["pose"], np.float64), json.loads(str(data["meta"]))["pose_frame"]


def _checked_pose(T: np.ndarray) -> np.ndarray:
    T = np.asarray(T, np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"a pose is a finite 4x4 transform, got shape {T.shape}")
    return T


def _index_entry(frame: Frame, key: str, rel_file: str, size: int,
                 pose: tuple[np.ndarray, str] | None = None) -> dict:
    entry = {"key": key, "file": rel_file, "stamp_ns": int(frame.stamp_ns), "num_points": frame.num_points,
             "cameras": list(frame.cameras), "missing_cameras": list(frame.missing_cameras),
             "has_gt": frame.gt_labels is not None, "bytes": int(size)}
    if pose is not None:  # floats through JSON round-trip exactly (repr)
        entry.update(pose=_checked_pose(pose[0]).ravel().tolist(), pose_frame=pose[1])
    return entry


def framestore_poses(root: str | os.PathLike, fixed_frame: str) -> tuple[dict[str, np.ndarray], str | None]:
    """The lidar's pose in ``fixed_frame`` (T_fixed_lidar, 4x4) per frame key, as the recorder stored them
    (its ``pose_frame``), the counterpart of sal_ros.data.bag.bag_poses. Returns (poses, None) or (the poses
    found, why the other frames have none)."""
    store = FrameStore(root)
    keys = store.keys()
    stored = {key: store.pose(key) for key in keys}
    poses = {key: p[0] for key, p in stored.items() if p is not None and p[1] == fixed_frame}
    if len(poses) == len(keys):
        return poses, None
    others = sorted({p[1] for p in stored.values() if p is not None and p[1] != fixed_frame})
    why = (f"poses in {', '.join(map(repr, others))} only (set seal.pose_frame to match)" if others else
           "the recorder had none (pose_frame empty, or no transform to the cloud frame at their stamps)")
    return poses, f"{len(keys) - len(poses)} of {len(keys)} frames have no pose in {fixed_frame!r}: {why}"


def _append_record(path: Path, line: bytes) -> None:
    """Append ``line`` whole or not at all: a short or failed write (full disk) is cut back to where it began and
    raises OSError; after the fsync the line is read back and compared. A torn tail an earlier failure could not
    cut is cut first, so a record never starts in the middle of a line."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            _cut_torn_line(path)
            start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"{path}: short write ({written} of {len(line)} bytes; disk full?)")
            os.fsync(fd)
            if os.pread(fd, len(line), start) != line:
                raise OSError(f"{path}: the index line read back differs from the one written")
        except OSError:
            os.ftruncate(fd, start)  # no torn record left behind; raises too where even that fails
            os.fsync(fd)
            raise
    finally:
        os.close(fd)


def _read_index(path: Path) -> tuple[list[dict], list[str]]:
    """(valid entries, why each skipped line was skipped): a torn last line (a writer killed mid-write), a line
    that is not a record (a torn record glued to the next: the record after it is kept), an unsafe ``file``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], []
    lines = raw.split(b"\n")
    entries, problems = [], []
    if lines[-1]:  # the part after the last newline is unfinished
        problems.append(f"line {len(lines)}: torn ({len(lines[-1])} bytes without an end)")
    for i, line in enumerate(lines[:-1]):
        start = line.rfind(_RECORD_START)
        if start > 0:
            problems.append(f"line {i + 1}: {start} bytes of a torn record before a complete one")
        try:
            entry = json.loads(line[max(start, 0):])
        except ValueError:
            problems.append(f"line {i + 1}: not a JSON record")
            continue
        why = _entry_problem(entry)
        if why:
            problems.append(f"line {i + 1}: {why}")
            continue
        entries.append(entry)
    return entries, problems


def _entry_problem(entry: Any) -> str:
    """Why an index entry cannot be used ("" if it can): not a record, or a ``file`` outside ``frames/``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not isinstance(entry.get("file"), str):
        return "not a frame record"
    file = PurePosixPath(entry["file"])
    if file.is_absolute() or ".." in file.parts or len(file.parts) != 2 or file.parts[0] != FRAMES_DIR \
            or "\\" in entry["file"]:
        return f"file {entry['file']!r} is not a path under {FRAMES_DIR}/ (refused: outside the store)"
    return ""


def _cut_torn_line(path: Path) -> None:
    """Drop an unfinished last line, so the next line starts on its own."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    if raw and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())
