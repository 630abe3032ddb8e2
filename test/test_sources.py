"""The frame-source registry: every kind opens the real sample data, unknown kinds are named, and one
registration makes a new kind usable by pseudo-labeling and evaluation."""
import argparse
from pathlib import Path

import pytest
from conftest import require_data

from sal_ros.core.errors import SensorDataError
from sal_ros.data.convert import convert
from sal_ros.data.datasets import iter_kitti_object
from sal_ros.data.framestore import FrameStore
from sal_ros.data.sources import SOURCES, SourceKind, detect_source, get_source, iter_source_frames, register_source
from sal_ros.data.sources import FrameSource
from sal_ros.eval.model import iter_frames as eval_frames
from sal_ros.pseudolabel.engine import EngineConfig, run


def _sample_per_kind(tmp_path: Path) -> dict[str, Path]:
    seq = require_data("semantickitti", "sequences", "00")
    store = tmp_path / "frames"
    with FrameStore(store) as writer:
        for frame in iter_source_frames(require_data("kitti_object")):
            writer.append(frame)
    convert(seq, tmp_path / "bag", progress=False)
    return {"framestore": store, "bag": tmp_path / "bag", "semantickitti": seq,
            "kitti_object": require_data("kitti_object"), "nuscenes": require_data("nuscenes_mini"),
            "kitti_frustum": require_data("kitti_frustum_000008")}


def test_every_registered_kind_opens_its_sample_through_the_registry(tmp_path):
    samples = _sample_per_kind(tmp_path)
    assert set(samples) == set(SOURCES)  # a new registration needs a sample here
    for kind, path in samples.items():
        assert detect_source(path).name == kind, path
        frames = list(iter_source_frames(path))
        assert frames and all(f.num_points > 0 for f in frames), kind
        source = FrameSource(path)
        keys = source.keys()
        assert keys == [f.key for f in frames], kind
        assert source.load(keys[-1]).num_points == frames[-1].num_points, kind


def test_an_unknown_kind_or_layout_is_a_clear_error(tmp_path):
    with pytest.raises(SensorDataError, match="unknown frame source kind 'lidar9'; known: framestore, bag, "):
        get_source("lidar9")
    with pytest.raises(SensorDataError, match="known kinds: framestore .*kitti_frustum"):
        detect_source(tmp_path)
    with pytest.raises(SensorDataError, match="bag_config does not apply to kitti_object"):
        iter_source_frames(require_data("kitti_object"), bag_config=tmp_path / "params.yaml")


@pytest.fixture
def toy_kind():
    """A kind that exists only in this test: a marker file naming a KITTI object folder, keys prefixed."""
    def frames(path):
        for frame in iter_kitti_object((path / "toy.txt").read_text().strip()):
            frame.key = f"toy_{frame.key}"
            yield frame

    kind = register_source(SourceKind("toy", lambda p: (p / "toy.txt").is_file(), frames, "toy.txt"))
    try:
        yield kind
    finally:
        del SOURCES[kind.name]


def test_a_kind_registered_once_is_used_by_pseudolabel_and_eval(toy_kind, tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.txt").write_text(str(require_data("kitti_object")))
    with pytest.raises(ValueError, match="register"):
        register_source(toy_kind)
    args = argparse.Namespace(dataset=folder, bag=None, config=None)
    assert [f.key for f in eval_frames(args)] == ["toy_000000", "toy_000001"]
    summary = run(folder, EngineConfig(masks="slic", mask_options={"n_segments": 30}, tokens=False),
                  tmp_path / "pl", progress=False)
    assert summary.done == 2 and not summary.failed
    assert sorted(p.stem for p in (tmp_path / "pl").glob("*.npz")) == ["toy_000000", "toy_000001"]
