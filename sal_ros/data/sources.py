"""The registry of frame sources: each kind (a recorder FrameStore, a rosbag2, a dataset layout) is registered once
with how it is recognised and read, and every tool that takes frames (pseudo-labeling, training, pretraining,
evaluation) opens them here. Adding a dataset = one ``register_source`` call."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from sal_ros.core.errors import SensorDataError
from sal_ros.core.types import Frame
from sal_ros.data import datasets
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


SOURCES: dict[str, SourceKind] = {}  # in detection order


def register_source(kind: SourceKind) -> SourceKind:
    if kind.name in SOURCES:
        raise ValueError(f"frame source kind {kind.name!r} is registered already")
    SOURCES[kind.name] = kind
    return kind


def get_source(name: str) -> SourceKind:
    try:
        return SOURCES[name]
    except KeyError:
        raise SensorDataError(f"unknown frame source kind {name!r}; known: {', '.join(SOURCES)}") from None


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
    sequences and scans of a dataset with sequences (``00,05:0-4``, sal_ros.data.datasets.Selection)."""
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
register_source(SourceKind("semantickitti", datasets.is_semantickitti, datasets.iter_semantickitti,
                           "sequences/<seq>/velodyne, calib.txt", keyed=datasets.SemanticKittiScans,
                           options=("select",)))
register_source(SourceKind("kitti_object", datasets.is_kitti_object, datasets.iter_kitti_object,
                           "[training/]velodyne, calib"))
register_source(SourceKind("nuscenes", datasets.is_nuscenes, datasets.iter_nuscenes,
                           "calib.json with cams, lidar_path"))
register_source(SourceKind("kitti_frustum", datasets.is_kitti_frustum, datasets.iter_kitti_frustum,
                           "calib.json with lidar2img, P2"))
