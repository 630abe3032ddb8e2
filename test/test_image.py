"""Image decoding against direct numpy references (every encoding, step padding, big-endian), compressed round
trips (png exact, jpeg close), real KITTI/nuScenes camera files, and clear errors for bad messages."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from conftest import require_data, require_rclpy
from PIL import Image as PILImage

from sal_ros.core.errors import MalformedMessageError
from sal_ros.core.image import (
    decode_compressed_image,
    decode_image,
    encode_compressed_image,
    encode_image,
    read_image,
    to_rgb,
)
from sal_ros.core.msgtypes import rosbags_types, stamp_to_ns
from sal_ros.nodes.messages import rclpy_types


@pytest.fixture(params=["rclpy", "rosbags"])
def types(request):
    if request.param == "rclpy":
        require_rclpy()
        return rclpy_types()
    return rosbags_types()


def cdr_round_trip(msg, types, typename: str):
    """Serialize with the message's library, read back with the other one (rosbags <-> rclpy)."""
    require_rclpy()
    from rclpy.serialization import deserialize_message, serialize_message

    if types.backend == "rclpy":
        return rosbags_types().typestore.deserialize_cdr(serialize_message(msg), typename)
    raw = bytes(types.typestore.serialize_cdr(msg, msg.__msgtype__))
    return deserialize_message(raw, getattr(rclpy_types(), typename.rsplit("/", 1)[1]))


H, W = 5, 7
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)
MONO8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
MONO16 = RNG.integers(0, 2**16, (H, W), dtype=np.uint16)
DEPTH = RNG.normal(size=(H, W)).astype(np.float32)
DEPTH[0, 0] = np.nan

# encoding -> (bytes of one row of pixels as the sensor lays them out, in the given byte order; expected decode)
CASES = {
    "mono8": (lambda bo: MONO8, MONO8),
    "8UC1": (lambda bo: MONO8, MONO8),
    "mono16": (lambda bo: MONO16.astype(bo + "u2"), MONO16),
    "16UC1": (lambda bo: MONO16.astype(bo + "u2"), MONO16),
    "32FC1": (lambda bo: DEPTH.astype(bo + "f4"), DEPTH),
    "rgb8": (lambda bo: RGB, RGB),
    "bgr8": (lambda bo: RGB[:, :, ::-1], RGB),
    "8UC3": (lambda bo: RGB[:, :, ::-1], RGB),
    "rgba8": (lambda bo: np.concatenate([RGB, ALPHA], 2), RGB),
    "bgra8": (lambda bo: np.concatenate([RGB[:, :, ::-1], ALPHA], 2), RGB),
}


def raw_image(types, encoding, *, bigendian=False, pad=0):
    """Image message with rows of ``pad`` garbage bytes appended (step > width*bytes_per_pixel)."""
    layout, expected = CASES[encoding]
    pixels = np.ascontiguousarray(layout(">" if bigendian else "<"))
    rows = pixels.reshape(H, -1).view(np.uint8).reshape(H, -1)
    data = np.concatenate([rows, np.full((H, pad), 0xEE, np.uint8)], axis=1)
    msg = types.Image(height=H, width=W, encoding=encoding, is_bigendian=bigendian, step=data.shape[1],
                      data=types.as_data(data.tobytes()))
    return msg, expected


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("encoding", sorted(CASES))
def test_decode_matches_numpy_reference(types, encoding, bigendian, pad):
    msg, expected = raw_image(types, encoding, bigendian=bigendian, pad=pad)
    got = read_image(msg)
    assert got.dtype == expected.dtype and got.dtype.isnative and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


def test_decode_after_cdr_between_libraries(types):
    msg, expected = raw_image(types, "bgra8", pad=3)
    np.testing.assert_array_equal(decode_image(cdr_round_trip(msg, types, "sensor_msgs/msg/Image")), expected)


@pytest.mark.parametrize("encoding, array", [("mono8", MONO8), ("mono16", MONO16), ("rgb8", RGB), ("32FC1", DEPTH)])
def test_encode_image_round_trip(types, encoding, array):
    msg = encode_image(array, encoding, "cam_optical", 123_000_000_456, types)
    assert (msg.height, msg.width, msg.encoding, msg.step) == (H, W, encoding, array[0].nbytes)
    for decoded in (msg, cdr_round_trip(msg, types, "sensor_msgs/msg/Image")):
        np.testing.assert_array_equal(decode_image(decoded).view(np.uint8), array.view(np.uint8))  # NaN bits too
        assert stamp_to_ns(decoded.header.stamp) == 123_000_000_456 and decoded.header.frame_id == "cam_optical"


def test_encode_image_rejects_wrong_dtype_or_shape(types):
    with pytest.raises(ValueError, match="dtype"):
        encode_image(MONO16, "mono8", "c", 0, types)
    with pytest.raises(ValueError, match="shape"):
        encode_image(MONO8, "rgb8", "c", 0, types)
    with pytest.raises(ValueError, match="not supported"):
        encode_image(MONO8, "yuv422", "c", 0, types)


def test_empty_image_decodes_empty(types):
    msg = types.Image(height=0, width=0, encoding="rgb8", step=0)
    assert decode_image(msg).shape == (0, 0, 3)


# --------------------------------------------------------------------------- compressed


@pytest.mark.parametrize("array", [MONO8, RGB, MONO16], ids=["mono8", "rgb8", "mono16"])
def test_png_round_trip_is_exact(types, array):
    msg = encode_compressed_image(array, "png", "cam", 7, types)
    assert msg.format.split(";")[0] == {np.dtype(np.uint16): "mono16"}.get(array.dtype, "rgb8" if array.ndim == 3
                                                                            else "mono8")
    for decoded in (msg, cdr_round_trip(msg, types, "sensor_msgs/msg/CompressedImage")):
        got = read_image(decoded)
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def smooth_rgb(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("array", [smooth_rgb(), smooth_rgb()[:, :, 0]], ids=["rgb", "mono"])
def test_jpeg_round_trip_is_close_and_keeps_colour_order(types, array):
    msg = encode_compressed_image(array, "jpeg", "cam", 7, types, quality=95)
    assert msg.format == ("rgb8; jpeg compressed bgr8" if array.ndim == 3 else "mono8; jpeg compressed mono8")
    got = decode_compressed_image(msg)
    assert got.shape == array.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - array).mean() < 2.0


def test_bare_format_strings_and_compressed_depth(types):
    buf = io.BytesIO()
    PILImage.fromarray(MONO16).save(buf, format="PNG")
    png = buf.getvalue()
    bare = types.CompressedImage(format="png", data=types.as_data(png))
    np.testing.assert_array_equal(read_image(bare), MONO16)
    header = struct.pack("<iff", 0, 0.0, 0.0)  # compressed_depth_image_transport config header
    depth = types.CompressedImage(format="16UC1; compressedDepth png", data=types.as_data(header + png))
    np.testing.assert_array_equal(read_image(depth), MONO16)
    with pytest.raises(MalformedMessageError, match="16-bit compressedDepth"):
        read_image(types.CompressedImage(format="32FC1; compressedDepth png", data=types.as_data(header + png)))


def test_real_camera_files_decode(types):
    kitti = require_data("semantickitti", "sequences", "00", "image_0", "000000.png")
    msg = types.CompressedImage(format="png", data=types.as_data(kitti.read_bytes()))
    reference = np.asarray(PILImage.open(kitti))
    got = read_image(msg)
    assert got.ndim == 2 and got.dtype == np.uint8
    np.testing.assert_array_equal(got, reference)
    jpg = next(require_data("nuscenes_mini").glob("*CAM_FRONT__*.jpg"))
    msg = types.CompressedImage(format="rgb8; jpeg compressed bgr8", data=types.as_data(jpg.read_bytes()))
    got = read_image(msg)
    assert got.shape == (900, 1600, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(PILImage.open(jpg).convert("RGB")))


# --------------------------------------------------------------------------- malformed


def test_unsupported_encoding_names_it(types):
    msg = types.Image(height=2, width=2, encoding="yuv422", step=4, data=types.as_data(bytes(8)))
    with pytest.raises(MalformedMessageError, match="'yuv422' is not supported"):
        read_image(msg)


def test_step_smaller_than_row(types):
    msg, _ = raw_image(types, "rgb8")
    msg.step = W * 3 - 1
    with pytest.raises(MalformedMessageError, match="step 20 is smaller"):
        read_image(msg)


def test_data_shorter_than_height_times_step(types):
    msg, _ = raw_image(types, "mono16", pad=2)
    msg.data = types.as_data(bytes(msg.data)[:-1])
    with pytest.raises(MalformedMessageError, match="height\\*step"):
        read_image(msg)


@pytest.mark.parametrize("payload", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_corrupt_compressed_data(types, payload):
    msg = types.CompressedImage(format="jpeg", data=types.as_data(payload))
    with pytest.raises(MalformedMessageError, match="could not be decoded"):
        read_image(msg)


def test_truncated_jpeg(types):
    msg = encode_compressed_image(smooth_rgb(), "jpeg", "cam", 0, types)
    msg.data = types.as_data(bytes(msg.data)[: len(msg.data) // 2])
    with pytest.raises(MalformedMessageError, match="could not be decoded"):
        read_image(msg)


# --------------------------------------------------------------------------- overlays


def test_to_rgb():
    np.testing.assert_array_equal(to_rgb(MONO8), np.repeat(MONO8[:, :, None], 3, 2))
    assert to_rgb(RGB) is RGB or np.array_equal(to_rgb(RGB), RGB)
    ramp = np.array([[100, 150, 200]], np.uint16)
    np.testing.assert_array_equal(to_rgb(ramp)[0, :, 0], [0, 128, 255])
    depth = np.array([[np.nan, 1.0, 3.0, np.inf]], np.float32)
    np.testing.assert_array_equal(to_rgb(depth)[0, :, 1], [0, 0, 255, 0])
    assert to_rgb(np.full((2, 2), 7, np.uint16)).max() == 0
