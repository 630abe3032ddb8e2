"""Decompression bombs and broken image files (issue 24 items 3 and 4): a PNG that inflates to 13000 x 13000 is
refused from its header before any pixel is decoded (node / bag reader: not the camera's size; anywhere: over the
pixel limit), and a zero-byte first PNG of a dataset costs its own frame only: `convert` writes the rest,
`eval pseudolabels` blames the right file, exits with the status it prints and writes valid JSON."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import require_data
from PIL import Image as PILImage

from sal_ros.cli import main as cli_main
from sal_ros.core.errors import MalformedMessageError
from sal_ros.core.image import decode_compressed_image, encode_compressed_image
from sal_ros.core.msgtypes import rosbags_types

BOMB_SIDE = 13000


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid greyscale PNG of ``side`` x ``side`` zeros, compressed row by row (never held decoded here)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row * 100) for _ in range(side // 100)) + z.compress(row * (side % 100)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb()
    assert len(data) < 1 << 20  # under a megabyte on the wire
    return data


def test_header_sizes_of_png_and_jpeg_without_decoding(bomb):
    from sal_ros.core.image import compressed_image_size

    assert compressed_image_size(bomb) == (BOMB_SIDE, BOMB_SIDE)
    types = rosbags_types()
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    for fmt in ("jpeg", "png"):
        data = bytes(encode_compressed_image(image, fmt, "cam", 1, types).data)
        assert compressed_image_size(data) == (53, 37), fmt
    exif = io.BytesIO()  # APP segments (EXIF, ICC) before the frame header are walked over
    PILImage.fromarray(image).save(exif, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 300, progressive=True)
    assert compressed_image_size(exif.getvalue()) == (53, 37)
    assert compressed_image_size(b"\xff\xd8\xff\xe0\x00") is None  # truncated before the frame header
    assert compressed_image_size(b"GIF89a") is None


def test_a_png_bomb_is_refused_before_decoding(bomb):
    types = rosbags_types()
    msg = types.CompressedImage(header=encode_compressed_image(np.zeros((2, 2), np.uint8), "png", "c", 1, types).header,
                                format="mono8; png compressed mono8", data=np.frombuffer(bomb, np.uint8))
    with pytest.raises(MalformedMessageError, match=r"13000x13000 = 169000000 pixels, more than the limit.*not decoded"):
        decode_compressed_image(msg)


# Decoding the bomb costs 169 MB as uint8 and ~3 GB inside Pillow's conversion; a child process that only refuses
# it stays near its start. The figure is memory, not time: it holds under any load.
CHILD = """
import sys
import numpy as np
from sal_ros.core.camera import CameraModel
from sal_ros.core.calibration import CameraCalibration
from sal_ros.core.frame_builder import FrameBuilder
from sal_ros.core.msgtypes import rosbags_types, make_header
from sal_ros.core.tf import StaticExtrinsics
from sal_ros.core.types import Frame
types = rosbags_types()
data = open(sys.argv[1], "rb").read()
camera = CameraModel(K=np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]), width=640, height=480)
calib = CameraCalibration(name="cam", camera=camera, T_cam_lidar=np.eye(4), frame_id="cam", lidar_frame_id="lidar")
builder = FrameBuilder({"cam": None}, StaticExtrinsics([calib]))
frame = Frame(stamp_ns=1, frame_id="lidar", points=np.zeros((1, 3), np.float32))
msg = types.CompressedImage(header=make_header("cam", 1, types), format="mono8; png compressed mono8",
                            data=np.frombuffer(data, np.uint8))
def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
with open("/proc/self/clear_refs", "w") as f:  # the peak so far (imports) is forgotten: the load's own counts
    f.write("5")
before = peak_kb()
view, reason, text = builder.camera_view("cam", msg, frame)
print(reason, (peak_kb() - before) // 1024, text, sep="|")
"""


def test_the_node_and_bag_reader_refuse_a_bomb_from_its_header_with_memory_flat(bomb, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "bomb.png")], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()[-1]
    reason, grown_mb, text = out.split("|")
    assert reason == "image_size_mismatch", out
    assert "13000x13000" in text and "640x480" in text
    assert int(grown_mb) < 50, f"memory grew by {grown_mb} MB: the bomb was decoded"


def test_an_image_file_bomb_is_refused_naming_the_file(bomb, tmp_path):
    from sal_ros.core.errors import SensorDataError
    from sal_ros.data.datasets import read_image

    (tmp_path / "000000.png").write_bytes(bomb)
    with pytest.raises(SensorDataError, match=r"000000\.png: the image is 13000x13000.*not decoded"):
        read_image(tmp_path / "000000.png")


@pytest.fixture
def zero_byte_first_png(tmp_path):
    """A linked copy of the real sequence whose first image is an empty file (as a copy cut short)."""
    real = require_data("semantickitti", "sequences", "00")
    seq = tmp_path / "seq"
    seq.mkdir()
    for entry in real.iterdir():
        if entry.name != "image_0":
            os.symlink(entry, seq / entry.name)
    (seq / "image_0").mkdir()
    for png in sorted((real / "image_0").glob("*.png"))[1:]:
        os.symlink(png, seq / "image_0" / png.name)
    (seq / "image_0" / "000000.png").write_bytes(b"")
    return seq


def test_convert_keeps_going_after_a_zero_byte_first_png(zero_byte_first_png, tmp_path, capsys):
    assert cli_main(["convert", str(zero_byte_first_png), str(tmp_path / "bag")]) == 3
    out, err = capsys.readouterr()
    assert "2 frames" in out and "1 with a camera left out" in out, out
    assert "frame seq_000000: camera image_0 left out: cannot read image" in err and "000000.png" in err
    assert "seq_000001" not in err


def test_eval_pseudolabels_blames_the_empty_file_and_writes_valid_json(zero_byte_first_png, tmp_path, capsys):
    args = ["eval", "pseudolabels", str(zero_byte_first_png), "--masks", "oracle", "--variants", "naive",
            "--no-progress", "--out", str(tmp_path / "eval")]
    assert cli_main(args) == 3
    err = capsys.readouterr().err
    assert "frame seq_000000 not scored: camera image_0 left out: cannot read image" in err
    assert "000000.png" in err and "000001.png" not in err and "1 scored; exit status 3" in err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]["frames"] == 1
    (zero_byte_first_png / "image_0" / "000001.png").unlink()
    (zero_byte_first_png / "image_0" / "000001.png").write_bytes(b"")  # now no frame can be scored
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "0 scored; exit status 1" in err and "000001.png" in err
    text = (tmp_path / "eval" / "metrics.json").read_text()
    assert "NaN" not in text
    row = json.loads(text)["rows"][0]  # strict JSON; a score over nothing is null
    assert row["pq_all"] is None and row["scans"] == 0
