"""The registry of frame sources: each kind (a recorder FrameStore, a rosbag2, a dataset layout) is registered once
with how it is recognised and read, and every tool that takes frames (pseudo-labeling, training, pretraining,
evaluation) opens them here, through ``FrameSource`` (keys and frames of any registered kind). Adding a
dataset = one ``register_source`` call."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from sal_ros.core.errors import SensorDataError
from sal_ros.core.registry import Registry
from sal_ros.core.types import Frame
from sal_ros.data import datasets, layouts
from sal_ros.data.bag import iter_bag_frames
from sal_ros.data.framestore import INDEX_FILE, FrameStore


class KeyedFrames(Protocol):
    """Frames by key without reading the others."""

    def keys(self) -> list[str]: ...

    def load(self, key: str) -> Frame: ...


@dataclass(frozen=True)
class SourceKind:
    name: str
    detect: Callable[[Path], bool]
    frames: Callable[..., Iterator[Frame]]  # frames(path, **options) in recording order
    describe: str  # the layout, for the error that lists what sal_ros reads
    keyed: Callable[[Path], KeyedFrames] | None = None  # random access; otherwise streamed or read once
    streamed: bool = False  # too large to hold: read in order (keep the place) instead of caching
    writable: bool = False  # pseudo-labels go inside it by default (raw dataset folders stay untouched)
    recording: bool = False  # recorded by sal_ros (FrameStore, bag), not a raw dataset `sal-ros convert` reads
    options: tuple[str, ...] = ()  # keyword options ``frames`` takes (bag_config, select); ``keyed`` takes select


SOURCES: Registry = Registry("frame source kind", SensorDataError)  # in detection order


def register_source(kind: SourceKind) -> SourceKind:
    return SOURCES.register(kind.name, kind)


def get_source(name: str) -> SourceKind:
    return SOURCES.lookup(name)


def detect_source(path: str | os.PathLike) -> SourceKind:
    """The first registered kind that recognises ``path`` (FileNotFoundError / SensorDataError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    for kind in SOURCES.values():
        if kind.detect(path):
            return kind
    known = ", ".join(f"{k.name} ({k.describe})" for k in SOURCES.values())
    raise SensorDataError(f"{path}: not a dataset folder or recording sal_ros reads; known kinds: {known}")


def source_kind(path: str | os.PathLike) -> str:
    return detect_source(path).name


def iter_source_frames(path: str | os.PathLike, bag_config: str | os.PathLike | None = None,
                       kind: str | None = None, select: str | None = None) -> Iterator[Frame]:
    """Frames of ``path`` in recording order (``kind``: skip detection); bags go through the node's synchronizer
    (``bag_config``: the node params YAML whose topics, cameras and sync settings to use); ``select`` picks
    sequences and scans of a dataset with sequences (``00,05:0-4``, sal_ros.data.layouts.Selection)."""
    source = get_source(kind) if kind else detect_source(path)
    options = _options(source, path, bag_config=bag_config, select=select)
    return source.frames(Path(path), **options)


def keyed_frames(path: str | os.PathLike, select: str | None = None) -> KeyedFrames | None:
    """Random access to the frames of ``path`` (None for kinds read in order), limited to ``select``."""
    source = detect_source(path)
    options = _options(source, path, select=select)
    return source.keyed(Path(path), **options) if source.keyed else None


def _options(source: SourceKind, path, **given) -> dict:
    options = {k: v for k, v in given.items() if v}
    unknown = set(options) - set(source.options)
    if unknown:
        raise SensorDataError(f"{path}: {', '.join(sorted(unknown))} does not apply to {source.name} sources")
    return options


def _is_bag(path: Path) -> bool:
    return path.suffix in (".mcap", ".db3") or (path / "metadata.yaml").exists()


def _bag_frames(path: Path, bag_config: str | os.PathLike | None = None) -> Iterator[Frame]:
    return iter_bag_frames(path, config=bag_config) if bag_config else iter_bag_frames(path)


register_source(SourceKind("framestore", lambda p: (p / INDEX_FILE).exists(), lambda p: iter(FrameStore(p)),
                           f"a recorder FrameStore, {INDEX_FILE}", keyed=FrameStore, writable=True,
                           recording=True))
register_source(SourceKind("bag", _is_bag, _bag_frames, "a rosbag2: metadata.yaml, .mcap, .db3", streamed=True,
                           recording=True, options=("bag_config",)))
register_source(SourceKind("semantickitti", layouts.is_semantickitti, datasets.iter_semantickitti,
                           "sequences/<seq>/velodyne, calib.txt", keyed=datasets.SemanticKittiScans,
                           options=("select",)))
register_source(SourceKind("kitti_object", layouts.is_kitti_object, datasets.iter_kitti_object,
                           "[training/]velodyne, calib"))
register_source(SourceKind("nuscenes", layouts.is_nuscenes, datasets.iter_nuscenes,
                           "calib.json with cams, lidar_path"))
register_source(SourceKind("kitti_frustum", layouts.is_kitti_frustum, datasets.iter_kitti_frustum,
                           "calib.json with lidar2img, P2"))


class FrameSource:
    """Keys and frames of any kind this registry knows.

    Keyed kinds (a FrameStore, SemanticKITTI scans) are read one frame at a time by key (workers never load a
    whole sequence); streamed kinds (a bag) in recording order (each process keeps its place, so in-order keys
    read it once); the others (small sample layouts) are read once per process and cached.
    """

    def __init__(self, path: str | Path, select: str | None = None) -> None:
        self.path = Path(path)
        self.source = detect_source(self.path)  # FileNotFoundError / SensorDataError naming the kinds it knows
        self.kind = self.source.name
        self._index = keyed_frames(self.path, select)  # select: sequences and scans (``00,05:0-4``)
        self._frames: dict | None = None
        self._stream_keys: list[str] | None = None
        self._stream_cursor = None  # (iterator over the source's frames, keys it has passed, its finalizer)

    @property
    def default_out(self) -> Path | None:
        """Where pseudo-labels go without --out: inside a writable source; raw dataset folders stay untouched."""
        return self.path / "pseudolabels" if self.source.writable else None

    def keys(self) -> list[str]:
        if self._index is not None:
            return list(self._index.keys())
        if self.source.streamed:
            if self._stream_keys is None:
                self._stream_keys = [frame.key for frame in self.source.frames(self.path)]
            return list(self._stream_keys)
        return list(self._cached())

    def load(self, key: str):
        if self._index is not None:
            return self._index.load(key)
        if self.source.streamed:
            return self._load_streamed(key)
        try:
            return self._cached()[key]
        except KeyError:
            raise KeyError(f"{self.path}: no frame {key!r}") from None

    def _cached(self) -> dict:
        if self._frames is None:
            self._frames = {f.key: f for f in self.source.frames(self.path)}
        return self._frames

    def _load_streamed(self, key: str):
        if self._stream_cursor is None or key in self._stream_cursor[1]:  # first call, or a key behind us: rewind
            if self._stream_cursor is not None:
                self._stream_cursor[2]()
            frames = self.source.frames(self.path)
            # Closes the reader of an unfinished pass at the latest at exit, while imports still work.
            self._stream_cursor = (frames, set(), weakref.finalize(self, frames.close))
        frames, passed, _ = self._stream_cursor
        for frame in frames:
            passed.add(frame.key)
            if frame.key == key:
                return frame
        raise KeyError(f"{self.path}: no frame {key!r}")
