"""The FrameStore index under a full disk and hostile entries (issue 24 items 10, 13): a short write never leaves a
torn record (the disk fills mid-line: RLIMIT_FSIZE in a child makes the write short, as ENOSPC does), readers skip
and report a torn record and keep the complete ones glued after it, the next writer repairs the index, and an
entry whose ``file`` points outside ``frames/`` is refused without being read."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from sal_ros.core.types import Frame
from sal_ros.data.framestore import FrameStore


def tiny_frame(i: int) -> Frame:
    return Frame(stamp_ns=(i + 1) * 10**8, frame_id="lidar", points=np.full((4, 3), i, np.float32), key=f"f{i:03d}")


FULL_DISK = """
import os, resource, signal, sys
import numpy as np
from sal_ros.core.types import Frame
from sal_ros.data.framestore import FrameStore
root = sys.argv[1]
frame = lambda i: Frame(stamp_ns=(i + 1) * 10**8, frame_id="lidar", points=np.full((4, 3), i, np.float32), key=f"f{i:03d}")
store = FrameStore(root)
for i in range(30):
    store.append(frame(i))
index = os.path.join(root, "index.jsonl")
size = os.path.getsize(index)
assert max(os.path.getsize(os.path.join(root, "frames", f)) for f in os.listdir(os.path.join(root, "frames"))) < size
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then short / EFBIG, as on a full disk
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 60, hard))  # room for 60 bytes of the next ~200-byte line
try:
    store.append(frame(30))
    print("no error")
except OSError as exc:
    print("refused:", exc)
with open(index, "rb") as f:
    print("ends with newline:", f.read().endswith(b"\\n"))
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
print("appended:", store.append(frame(31)))
"""


def test_a_short_index_write_on_a_full_disk_leaves_no_torn_record(tmp_path):
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "store")], capture_output=True, text=True,
                         check=True).stdout
    assert "refused:" in out and "short write" in out, out
    assert "ends with newline: True" in out and "appended: f031" in out, out
    store = FrameStore(tmp_path / "store")
    keys = store.keys()
    assert store.index_problems == [] and keys[-1] == "f031" and "f030" not in keys
    assert len(keys) == 31 and store.load("f031").points[0, 0] == 31  # readable; f030 lost only its line
    with FrameStore(tmp_path / "store") as writer:  # the next writer indexes the frame file written before the line
        writer.append(tiny_frame(32))
        assert "f030" in writer.keys()


def plant(root, lines: list[bytes]) -> None:
    with open(root / "index.jsonl", "ab") as f:
        f.write(b"".join(lines))


def test_readers_skip_and_report_a_torn_record_and_resume_repairs_it(tmp_path, caplog):
    root = tmp_path / "store"
    with FrameStore(root) as store:
        for i in range(3):
            store.append(tiny_frame(i))
    lines = (root / "index.jsonl").read_bytes().splitlines(keepends=True)
    # the old failure: a short write left half of f001's line, and f002's line was appended right after it
    (root / "index.jsonl").write_bytes(lines[0] + lines[1][:40] + lines[2])
    with caplog.at_level(logging.WARNING, logger="sal_ros.data.framestore"):
        reader = FrameStore(root)
        assert reader.keys() == ["f000", "f002"]
    assert reader.index_problems == ["line 2: 40 bytes of a torn record before a complete one"]
    assert "index.jsonl: 1 index line(s) skipped" in caplog.text and "2 frames readable" in caplog.text
    with FrameStore(root) as writer:  # resuming rewrites the index, and the orphaned f001 file is indexed again
        writer.append(tiny_frame(3))
    text = (root / "index.jsonl").read_bytes()
    assert all(json.loads(line) for line in text.splitlines())
    assert FrameStore(root).keys() == ["f000", "f002", "f001", "f003"] and FrameStore(root).index_problems == []


@pytest.mark.parametrize("file", ["/etc/hostname", "../outside.npz", "frames/../../outside.npz", "frames/sub/x.npz"])
def test_an_index_entry_pointing_outside_the_store_is_refused_unread(tmp_path, file):
    root = tmp_path / "store"
    with FrameStore(root) as store:
        store.append(tiny_frame(0))
    np.savez(tmp_path / "outside.npz", points=np.zeros((1, 3), np.float32))
    entry = {**json.loads((root / "index.jsonl").read_text()), "key": "evil", "file": file}
    plant(root, [json.dumps(entry).encode() + b"\n"])
    reader = FrameStore(root)
    assert reader.keys() == ["f000"]
    assert len(reader.index_problems) == 1 and "outside the store" in reader.index_problems[0]
    with pytest.raises(KeyError, match="evil"):
        reader.load("evil")
