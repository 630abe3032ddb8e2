"""The recorder on a full disk (issue 24): every frame whose write fails is counted, and the error is logged at most
once per 5 s instead of once per frame. The disk is "full" for the recorder process only: RLIMIT_FSIZE below one
frame file (the write fails with EFBIG, as with ENOSPC), SIGXFSZ ignored."""
import os
import resource
import signal
import subprocess
import sys
import time

import yaml

from conftest import Sensors, require_rclpy, wait_for
from test_nodes_recorder import REPO, T0, publisher  # noqa: F401 - the fixture

require_rclpy()


def _full_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_full_disk_is_counted_and_its_error_log_throttled(tmp_path, publisher):  # noqa: F811
    sensors = Sensors(tmp_path)
    params = tmp_path / "record.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "cloud_topic": "/rec/points", "cameras": ["image_0"],
        "camera": {"image_0": {"image_topic": "/rec/image", "info_topic": "/rec/info"}},
        "sync": {"timeout": 0.2}, "calibration": {"source": "static", "file": str(sensors.calib_file)}}}}))
    log_path = tmp_path / "recorder.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sal_ros.cli", "run", "--no-segmenter", "--params",
                                 str(params), "--record", str(tmp_path / "frames")], cwd=REPO, env=dict(os.environ),
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_full_disk)
        try:
            wait_for(lambda: all(p.get_subscription_count() > 0 for p in publisher.values()), timeout=120,
                     what="recorder up")
            wait_for(lambda: "recording /rec/points" in log_path.read_text(), timeout=120, what="recorder log")
            start = time.monotonic()
            for i in range(30):  # 30 frames, each one a failed write
                stamp = T0 + i * 100_000_000
                publisher["info"].publish(sensors.info(stamp))
                publisher["image"].publish(sensors.image_msg(stamp))
                publisher["cloud"].publish(sensors.cloud(stamp))
                time.sleep(0.1)
            wait_for(lambda: "File too large" in log_path.read_text(), timeout=120, what="a failed write")
            elapsed = time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = log_path.read_text()
    logged = text.count("File too large")
    assert logged >= 1, text[-3000:]
    assert logged <= 2 + elapsed / 5, f"{logged} error lines in {elapsed:.1f} s for 30 frames:\n{text[-3000:]}"
    assert not (tmp_path / "frames" / "index.jsonl").exists() or not (tmp_path / "frames" / "index.jsonl").read_text()

