"""FrameStore: exact round trip of real frames, limits, resume, and no lost or partial frame after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO, require_data
from sal_ros.data.datasets import load_nuscenes, load_semantickitti
from sal_ros.data.framestore import FRAMES_DIR, FrameStore

# Writes synthetic frames (deterministic per index) forever, printing each key once append() has returned.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from sal_ros.core.camera import CameraModel
    from sal_ros.core.types import CameraView, Frame
    from sal_ros.data.framestore import FrameStore

    def make(i):
        rng = np.random.default_rng(i)
        cam = CameraView("front", rng.integers(0, 255, (900, 1600, 3), dtype=np.uint8),
                         CameraModel(K=[[1000.0, 0, 800], [0, 1000, 450], [0, 0, 1]], width=1600, height=900),
                         np.eye(4), stamp_ns=i + 7, frame_id="front_optical")
        return Frame(stamp_ns=1_000 + i, frame_id="lidar", points=rng.normal(size=(300_000, 3)),
                     intensity=rng.random(300_000, np.float32), cameras={"front": cam}, key=f"f{i:05d}")

    if __name__ == "__main__":
        store = FrameStore(sys.argv[1])
        i = len(store)
        while True:
            print(store.append(make(i)), flush=True)
            i += 1
""")


def assert_same(a, b):
    assert (a.stamp_ns, a.frame_id, a.key, a.missing_cameras) == (b.stamp_ns, b.frame_id, b.key, b.missing_cameras)
    np.testing.assert_array_equal(a.points, b.points)
    for x, y in ((a.intensity, b.intensity), (a.gt_labels, b.gt_labels)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert list(a.cameras) == list(b.cameras)
    for name, v in a.cameras.items():
        w = b.cameras[name]
        assert (v.stamp_ns, v.frame_id, v.image.dtype) == (w.stamp_ns, w.frame_id, w.image.dtype)
        np.testing.assert_array_equal(v.image, w.image)
        np.testing.assert_array_equal(v.T_cam_lidar, w.T_cam_lidar)
        np.testing.assert_array_equal(v.camera.K, w.camera.K)
        np.testing.assert_array_equal(v.camera.D, w.camera.D)
        assert (v.camera.width, v.camera.height, v.camera.distortion_model) == (
            w.camera.width, w.camera.height, w.camera.distortion_model)


@pytest.mark.parametrize("compress", [False, True])
def test_real_frames_round_trip(tmp_path, compress):
    src = load_semantickitti(require_data("semantickitti", "sequences", "00"))
    src += load_nuscenes(require_data("nuscenes_mini"))
    src[1].missing_cameras = ("image_1",)
    store = FrameStore(tmp_path / "store", compress=compress)
    keys = [store.append(f) for f in src]
    assert keys == ["00_000000", "00_000001", src[2].key] and store.keys() == keys and len(store) == 3
    reader = FrameStore(tmp_path / "store")  # another process's view
    for frame, key in zip(src, keys):
        assert_same(reader.load(key), frame)
    assert [f.key for f in reader] == keys
    assert reader.entry(src[2].key)["cameras"] == list(src[2].cameras) and reader.entry(keys[0])["has_gt"]
    assert sorted(p.name for p in (tmp_path / "store" / FRAMES_DIR).iterdir()) == sorted(f"{k}.npz" for k in keys)


def small_frame(i, n=1000):
    from sal_ros.core.types import Frame

    rng = np.random.default_rng(i)
    return Frame(stamp_ns=10 + i, frame_id="lidar", points=rng.normal(size=(n, 3)), intensity=None)


def test_limits_and_resume(tmp_path):
    store = FrameStore(tmp_path, every_nth=2, max_frames=3)
    results = [store.append(small_frame(i)) for i in range(8)]
    assert results == ["10", None, "12", None, "14", None, False, None]
    store.close()
    again = FrameStore(tmp_path)  # resumed: no limit now, keys already stored are not written twice
    assert again.append(small_frame(2)) == "12" and len(again) == 3
    assert again.append(small_frame(9)) == "19" and again.keys() == ["10", "12", "14", "19"]
    again.close()
    size = FrameStore(tmp_path).entry("10")["bytes"]
    capped = FrameStore(tmp_path / "capped", max_bytes=int(2.5 * size))
    assert [capped.append(small_frame(i)) for i in range(4)] == ["10", "11", False, False]
    assert capped.total_bytes <= 2.5 * size
    assert not [p for p in (tmp_path / "capped" / FRAMES_DIR).iterdir() if p.name.startswith(".")]


def test_one_writer_at_a_time(tmp_path):
    first = FrameStore(tmp_path)
    first.append(small_frame(0))
    with pytest.raises(RuntimeError, match="another process is writing"):
        FrameStore(tmp_path).append(small_frame(1))
    first.close()
    assert FrameStore(tmp_path).append(small_frame(1)) == "11"


def test_torn_index_line_orphan_and_temp_files(tmp_path):
    with FrameStore(tmp_path) as store:
        store.append(small_frame(0))
        store.append(small_frame(1))
    frames = tmp_path / FRAMES_DIR
    # a writer killed after renaming frame 2 into place, another killed while writing an index line / a temp file
    with FrameStore(tmp_path / "other") as other:
        other.append(small_frame(2))
    os.replace(tmp_path / "other" / FRAMES_DIR / "12.npz", frames / "12.npz")
    with open(tmp_path / "index.jsonl", "ab") as f:
        f.write(b'{"key":"13","file":"frames/1')
    (frames / ".tmp-13.npz").write_bytes(b"PK\x03\x04 partial")
    reader = FrameStore(tmp_path)
    assert reader.keys() == ["10", "11"]  # torn line skipped, orphan and temp file invisible
    with FrameStore(tmp_path) as writer:
        assert writer.append(small_frame(4)) == "14"
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["10", "11", "12", "14"]
    assert sorted(p.name for p in frames.iterdir()) == ["10.npz", "11.npz", "12.npz", "14.npz"]
    np.testing.assert_array_equal(reader.load("12").points, small_frame(2).points)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_mid_write_loses_no_completed_frame(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    sys.path.insert(0, str(tmp_path))
    import writer  # the same frame generator as the child

    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rng = np.random.default_rng(0)
    acknowledged: list[str] = []
    for round_ in range(6):  # about one kill in three lands inside a write
        child = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(int(rng.integers(1, 4))):
            acknowledged.append(child.stdout.readline().strip())
        time.sleep(float(rng.uniform(0, 0.05)))  # somewhere inside the next frame's write
        child.send_signal(signal.SIGKILL)
        child.wait()
        acknowledged += [line.strip() for line in child.stdout.read().splitlines() if line.strip()]
        child.stdout.close()
        reader = FrameStore(root)
        keys = reader.keys()
        assert set(acknowledged) <= set(keys), f"round {round_}: lost {set(acknowledged) - set(keys)}"
        for key in keys:  # everything a reader sees is complete and exact
            assert_same(reader.load(key), writer.make(int(key[1:])))
        visible = [p for p in (root / FRAMES_DIR).iterdir() if not p.name.startswith(".")]
        for path in visible:  # even unindexed files under a final name are complete
            with np.load(path) as data:
                assert data["points"].shape == (300_000, 3)
    assert len(acknowledged) >= 4
    with FrameStore(root) as resumed:  # repair on resume: every complete file indexed, temp files gone
        n = len(resumed)
        assert resumed.append(writer.make(n)) == f"f{n:05d}"
        files = sorted(p.name for p in (root / FRAMES_DIR).iterdir())
        assert files == sorted(f"{k}.npz" for k in resumed.keys())
        assert resumed.keys() == [f"f{i:05d}" for i in range(n + 1)]
