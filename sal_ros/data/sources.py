"""One way to open any frame source by path: a dataset folder, a recorder FrameStore or a rosbag2."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from sal_ros.core.errors import SensorDataError
from sal_ros.core.types import Frame


def source_kind(path: str | os.PathLike) -> str:
    """``"framestore"``, ``"bag"`` or the dataset kind of sal_ros.data.datasets (SensorDataError otherwise)."""
    from sal_ros.data.datasets import find_dataset
    from sal_ros.data.framestore import INDEX_FILE

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / INDEX_FILE).exists():
        return "framestore"
    if path.suffix in (".mcap", ".db3") or (path / "metadata.yaml").exists():
        return "bag"
    try:
        return find_dataset(path)
    except SensorDataError as exc:
        raise SensorDataError(f"{exc}, nor a recorder FrameStore ({INDEX_FILE}) or a rosbag2 (metadata.yaml, "
                              ".mcap, .db3)") from None


def iter_source_frames(path: str | os.PathLike, bag_config: str | os.PathLike | None = None) -> Iterator[Frame]:
    """Frames of ``path`` in recording order; bags go through the node's synchronizer (``bag_config``: the
    node params YAML whose topics, cameras and sync settings to use)."""
    kind = source_kind(path)
    if kind == "framestore":
        from sal_ros.data.framestore import FrameStore

        return iter(FrameStore(path))
    if kind == "bag":
        from sal_ros.data.bag import iter_bag_frames

        return iter_bag_frames(path, config=bag_config) if bag_config else iter_bag_frames(path)
    if bag_config:
        raise SensorDataError(f"{path}: a bag_config only applies to rosbag2 sources, this is a {kind} folder")
    from sal_ros.data.datasets import iter_frames

    return iter_frames(path)
