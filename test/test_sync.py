"""LidarAnchoredSynchronizer: matching rules, waits, bounds and bad stamps, driven by message stamps only."""
import json
import random
import re

import pytest

from conftest import require_data
from sal_ros.core.sync import LidarAnchoredSynchronizer, SyncedSet

MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000  # a realistic epoch stamp


def drain(sync, events):
    """Feed ("cloud", stamp) / (camera, stamp) events in order; the payload is the (stream, stamp) pair."""
    out: list[SyncedSet] = []
    for stream, stamp in events:
        if stream == "cloud":
            out += sync.add_cloud(stamp, ("cloud", stamp))
        else:
            out += sync.add_camera(stream, stamp, (stream, stamp))
    return out


def image_stamps(s: SyncedSet) -> dict[str, int]:
    for cam, (stamp, payload) in s.images.items():
        assert payload == (cam, stamp)
    return {cam: stamp for cam, (stamp, _) in s.images.items()}


def test_jitter_picks_the_nearest_image_and_emits_as_soon_as_decided():
    sync = LidarAnchoredSynchronizer(["cam"])
    rng = random.Random(1)
    events = [("cam", T0 + k * 33 * MS + rng.randint(-4, 4) * MS) for k in range(31)]  # ~30 Hz camera
    events += [("cloud", T0 + k * 100 * MS + rng.randint(-3, 3) * MS) for k in range(1, 10)]  # ~10 Hz lidar
    events.sort(key=lambda e: e[1])
    cams = sorted(s for n, s in events if n == "cam")
    out = drain(sync, events)
    assert [s.stamp_ns for s in out] == sorted(s for n, s in events if n == "cloud")
    for s in out:
        assert not s.missing
        assert image_stamps(s)["cam"] == min(cams, key=lambda c: (abs(c - s.stamp_ns), c))
    assert sync.stats.matched == 9 and sync.stats.partial == 0


def test_decided_without_waiting_once_no_later_image_can_be_nearer():
    sync = LidarAnchoredSynchronizer(["cam"], timeout_ns=10_000 * MS)  # the timeout plays no part here
    assert sync.add_cloud(T0, "c") == []
    assert sync.add_camera("cam", T0 - 5 * MS, "a") == []  # a later image may still be nearer
    assert sync.add_camera("cam", T0 - 3 * MS, "b") == []  # nearer, and still one at T0 + 1 ms could come
    out = sync.add_camera("cam", T0 + 4 * MS, "c")  # every later image is >= 4 ms away: b is final
    assert [(s.stamp_ns, s.images["cam"]) for s in out] == [(T0, (T0 - 3 * MS, "b"))]


def nuscenes_stamps():
    """Camera stamps relative to the LIDAR_TOP stamp, in ns, from the sample's file names (microseconds)."""
    root = require_data("nuscenes_mini")
    calib = json.loads((root / "calib.json").read_text())
    stamp_us = lambda name: int(re.search(r"__(\d+)\.", name).group(1))  # noqa: E731
    lidar = stamp_us(calib["lidar_path"])
    cams = {cam: stamp_us(c["img_path"]) for cam, c in calib["cams"].items()}
    assert all(abs(cams[c] - calib["cams"][c]["timestamp"] * 1e6) < 2 for c in cams)  # file names agree with json
    return lidar * 1000, {cam: (us - lidar) * 1000 for cam, us in cams.items()}


def test_nuscenes_per_camera_offsets():
    lidar, offsets = nuscenes_stamps()
    assert min(offsets.values()) < -30 * MS  # the front-left camera fires > 30 ms before the lidar stamp
    period = 1_000_000_000 // 12  # cameras at 12 Hz: the neighbouring frames are 83 ms away
    events = [("cloud", lidar)]
    for cam, off in offsets.items():
        events += [(cam, lidar + off + k * period) for k in (-1, 0, 1)]
    events.sort(key=lambda e: e[1])
    # nominal offsets (rounded to ms, as a user would configure them) put every camera in the window
    nominal = {cam: round(off / MS) * MS for cam, off in offsets.items()}
    out = drain(LidarAnchoredSynchronizer(list(offsets), nominal), events)
    assert len(out) == 1 and out[0].missing == ()
    assert image_stamps(out[0]) == {cam: lidar + off for cam, off in offsets.items()}
    # without offsets the cameras that fire more than 30 ms early are missing
    sync = LidarAnchoredSynchronizer(list(offsets))
    out = drain(sync, events) + sync.flush()
    late = tuple(cam for cam in offsets if abs(offsets[cam]) > 30 * MS)
    assert set(late) == {"CAM_FRONT", "CAM_FRONT_LEFT"}
    assert len(out) == 1 and out[0].missing == late
    assert image_stamps(out[0]) == {cam: lidar + off for cam, off in offsets.items() if cam not in late}


def test_dead_camera_gives_partial_sets_after_the_timeout():
    sync = LidarAnchoredSynchronizer(["a", "b"], match_threshold_ns=30 * MS, timeout_ns=50 * MS)
    out = []
    for k in range(5):
        t = T0 + k * 100 * MS
        out += sync.add_cloud(t, k)
        out += sync.add_camera("a", t + 2 * MS, k)
        out += sync.add_camera("a", t + 40 * MS, k)
    # clouds 0..3 timed out on the stamp clock (newest stamp >= stamp + 30 ms + 50 ms); cloud 4 still waits
    assert [s.cloud for s in out] == [0, 1, 2, 3]
    assert all(s.missing == ("b",) and s.images["a"][0] == s.stamp_ns + 2 * MS for s in out)
    assert sync.pending == 1 and sync.stats.partial == 4 and sync.stats.missing == {"b": 4}
    # an image 79 ms later does not end the wait yet, 80 ms does
    assert sync.add_camera("a", T0 + 479 * MS, None) == []
    assert [s.cloud for s in sync.add_camera("a", T0 + 480 * MS, None)] == [4]


def test_receive_clock_poll_flushes_a_dead_camera():
    sync = LidarAnchoredSynchronizer(["a", "b"], {"a": 0, "b": 20 * MS}, match_threshold_ns=30 * MS,
                                     timeout_ns=50 * MS)
    rx = 5_000 * MS  # e.g. time.monotonic_ns(), unrelated to the stamps
    assert sync.add_cloud(T0, "c", received_ns=rx) == []
    assert sync.add_camera("a", T0 + 31 * MS, "late a") == []  # outside the window: a is decided missing
    assert sync.poll(rx + 99 * MS) == []  # b's window ends 20 + 30 ms after the cloud, then 50 ms of waiting
    (s,) = sync.poll(rx + 100 * MS)
    assert s.missing == ("a", "b") and s.images == {}


def test_late_and_out_of_order_messages():
    sync = LidarAnchoredSynchronizer(["cam"], match_threshold_ns=30 * MS, timeout_ns=50 * MS)
    assert sync.add_cloud(T0 + 60 * MS, "c1") == []
    assert sync.add_cloud(T0, "c0") == []  # arrives after c1 but is older: still comes out first
    assert sync.add_camera("cam", T0 - 10 * MS, "a") == []
    out = sync.add_camera("cam", T0 + 55 * MS, "b")
    out += sync.add_camera("cam", T0 + 70 * MS, "c")
    assert [(s.cloud, s.images["cam"][1]) for s in out] == [("c0", "a"), ("c1", "b")]
    # a cloud not newer than one already emitted would break the order: dropped and counted
    assert sync.add_cloud(T0 + 30 * MS, "too late") == []
    assert sync.add_cloud(T0 + 60 * MS, "duplicate") == []
    assert sync.stats.dropped_late_cloud == 2
    # an image that can only match clouds already emitted is counted, not kept
    assert sync.add_camera("cam", T0 + 20 * MS, "stale") == []
    assert sync.stats.dropped_late_image == 1
    # a camera lagging behind the lidar is waited for (stamp clock below the timeout) ...
    assert sync.add_cloud(T0 + 160 * MS, "c2") == []
    assert sync.add_cloud(T0 + 230 * MS, "c3") == []
    (s,) = sync.add_camera("cam", T0 + 165 * MS, "late")
    assert (s.cloud, s.images["cam"]) == ("c2", (T0 + 165 * MS, "late"))
    # ... but not beyond it: once a stamp 30 + 50 ms past c3 is seen, c3 goes out without the camera
    (s,) = sync.add_cloud(T0 + 310 * MS, "c4")
    assert (s.cloud, s.missing) == ("c3", ("cam",))
    # streams are taken to arrive in stamp order: an image after the target decides at once, and an
    # out-of-order one arriving later does not change a cloud already sent
    (s,) = sync.add_camera("cam", T0 + 318 * MS, "d")
    assert (s.cloud, s.images["cam"]) == ("c4", (T0 + 318 * MS, "d"))
    assert sync.add_camera("cam", T0 + 311 * MS, "nearer but too late") == []


def test_backwards_time_jump_resets_and_matching_resumes():
    sync = LidarAnchoredSynchronizer(["cam"], jump_threshold_ns=50 * MS)
    loop = [("cam", T0 - MS), ("cloud", T0), ("cam", T0 + 99 * MS), ("cloud", T0 + 100 * MS)]
    first = drain(sync, loop)
    assert [s.stamp_ns for s in first] == [T0]  # the last cloud waits for a later image
    second = drain(sync, loop + [("cam", T0 + 150 * MS)])  # the bag starts over
    assert [s.stamp_ns for s in second] == [T0, T0 + 100 * MS]
    assert all(not s.missing for s in second)
    assert sync.stats.time_jumps == 1 and sync.stats.dropped_time_jump == 1
    assert sync.stats.dropped_late_cloud == 0


def test_zero_stamps_are_rejected_and_counted():
    sync = LidarAnchoredSynchronizer(["cam"])
    assert sync.add_cloud(0, "unset") == [] and sync.add_camera("cam", 0, "unset") == []
    assert sync.add_cloud(-5, "negative") == []
    assert sync.pending == 0 and sync.stats.dropped_zero_stamp == 3
    (s,) = drain(sync, [("cloud", T0), ("cam", T0 + MS)])
    assert s.stamp_ns == T0 and not s.missing
    with pytest.raises(ValueError, match="unknown camera 'other'"):
        sync.add_camera("other", T0, None)


def test_buffers_stay_bounded():
    sync = LidarAnchoredSynchronizer(["a", "b"], timeout_ns=10**15, buffer_size=8)
    for k in range(100):
        sync.add_camera("a", T0 + k * MS, k)
    assert len(sync._images["a"].stamps) == 8 and sync._images["a"].stamps[0] == T0 + 92 * MS
    assert sync.stats.dropped_image_overflow == 92
    for k in range(20):  # camera b is dead and the timeout huge: clouds pile up to the bound only
        sync.add_cloud(T0 + (80 + k) * MS, k)
    assert sync.pending == 8 and sync.stats.dropped_cloud_overflow == 12
    out = sync.flush()
    assert [s.cloud for s in out] == list(range(12, 20)) and all(s.missing == ("b",) for s in out)
    assert [s.images["a"][0] for s in out] == [T0 + (80 + k) * MS for k in range(12, 20)]
    # emitting a cloud prunes the images no later cloud can match
    sync.add_cloud(T0 + 200 * MS, "last")
    sync.flush()
    assert sync._images["a"].stamps == []


@pytest.mark.parametrize("delta_ms, matches", [(30, True), (-30, True), (31, False), (-31, False)])
def test_threshold_edges(delta_ms, matches):
    sync = LidarAnchoredSynchronizer(["cam"], {"cam": 7 * MS}, match_threshold_ns=30 * MS)
    out = drain(sync, [("cloud", T0), ("cam", T0 + 7 * MS + delta_ms * MS)]) + sync.flush()
    assert len(out) == 1 and (out[0].missing == ()) == matches


def test_ties_go_to_the_earlier_image():
    sync = LidarAnchoredSynchronizer(["cam"])
    (s,) = drain(sync, [("cam", T0 - 10 * MS), ("cloud", T0), ("cam", T0 + 10 * MS)])
    assert s.images["cam"][0] == T0 - 10 * MS


@pytest.mark.parametrize("seed", range(30))
def test_random_streams_choose_the_nearest_image_within_threshold(seed):
    """Random rates, jitter, offsets and in-stream-ordered delivery delays below the timeout."""
    rng = random.Random(seed)
    thr, timeout = rng.choice([10, 30, 50]) * MS, rng.choice([20, 50, 100]) * MS
    cams = [f"cam{i}" for i in range(rng.randint(1, 4))]
    offsets = {c: rng.randint(-60, 60) * MS for c in cams}
    dead = rng.choice(cams + [None])
    lidar_period = rng.choice([50, 100]) * MS
    streams = {"cloud": [T0 + k * lidar_period + rng.randint(-5 * MS, 5 * MS) for k in range(30)]}
    for c in cams:
        period = rng.choice([33, 50, 83, 100]) * MS
        start = T0 - 200 * MS + rng.randint(0, period)
        streams[c] = [] if c == dead else sorted(
            {start + k * period + rng.randint(-8 * MS, 8 * MS) for k in range(int(4e9 // period))})
    arrivals = []  # per stream in order, each message delayed by less than the timeout
    for name, stamps in streams.items():
        last = 0
        for s in stamps:
            last = max(last, s + rng.randint(0, timeout - 1))
            arrivals.append((last, name, s))
    arrivals.sort()
    sync = LidarAnchoredSynchronizer(cams, offsets, match_threshold_ns=thr, timeout_ns=timeout)
    out = drain(sync, [(name, s) for _, name, s in arrivals]) + sync.flush()
    assert [s.stamp_ns for s in out] == sorted(streams["cloud"])
    for s in out:
        chosen = image_stamps(s)
        for c in cams:
            target = s.stamp_ns + offsets[c]
            inside = [x for x in streams[c] if abs(x - target) <= thr]
            expected = min(inside, key=lambda x: (abs(x - target), x)) if inside else None
            assert chosen.get(c) == expected, (c, s.stamp_ns)
            assert (c in s.missing) == (expected is None)
    assert sync.stats.matched + sync.stats.partial == len(out)
