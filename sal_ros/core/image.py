"""sensor_msgs/Image and CompressedImage <-> numpy, without cv_bridge.

Decoded images follow :class:`sal_ros.core.types.CameraView`: mono encodings give ``(H, W)`` in their own dtype
(uint8, uint16, float32), colour encodings give ``(H, W, 3)`` uint8 **RGB** (BGR is swapped, alpha dropped).
Row padding (``step``) and ``is_bigendian`` are honoured. Compressed images (jpeg/png, as image_transport writes
them, and 16-bit ``compressedDepth`` png) are decoded with Pillow. Bad input raises
:class:`~sal_ros.core.errors.MalformedMessageError` naming the problem.

A compressed image's size is read from its header before anything is decoded (``compressed_image_size``), so a
0.5 MB PNG that inflates to 13000 x 13000 is refused in microseconds: over ``max_pixels``, or (the node and the
bag reader, ``image_dimensions``) not the size its calibration describes. Pillow's parsed header is checked
against ``max_pixels`` again before ``load`` (formats the header reader does not know), and Pillow's own
decompression-bomb limit stays on behind both.
"""
from __future__ import annotations

import io
import struct
from typing import Any, NamedTuple

import numpy as np

from sal_ros.core.errors import MalformedMessageError
from sal_ros.core.msgtypes import MessageTypes, make_header


class Encoding(NamedTuple):
    dtype: str  # numpy base type; byte order comes from the message
    channels: int
    order: str  # how channels map to RGB: "mono", "rgb", "bgr", "rgba", "bgra"


ENCODINGS: dict[str, Encoding] = {
    "mono8": Encoding("u1", 1, "mono"),
    "8UC1": Encoding("u1", 1, "mono"),
    "mono16": Encoding("u2", 1, "mono"),
    "16UC1": Encoding("u2", 1, "mono"),
    "32FC1": Encoding("f4", 1, "mono"),
    "rgb8": Encoding("u1", 3, "rgb"),
    "bgr8": Encoding("u1", 3, "bgr"),
    "8UC3": Encoding("u1", 3, "bgr"),  # no colour order in the name: OpenCV's (BGR), as its producers use
    "rgba8": Encoding("u1", 4, "rgba"),
    "bgra8": Encoding("u1", 4, "bgra"),
}

# What encode_image writes: array dtype and channels per encoding.
ENCODABLE = ("mono8", "mono16", "rgb8", "32FC1")

_COMPRESSED_DEPTH_HEADER = 12  # compressed_depth_image_transport: int32 format + float32 depthParam[2]
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 64 << 20  # 67 MP: above any camera a robot carries (8K is 33 MP), far below a bomb
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC share the range
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# ----------------------------------------------------------------------------------------------------- decoding


def read_image(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an Image or a CompressedImage (told apart by their fields)."""
    if hasattr(msg, "encoding"):
        return decode_image(msg)
    return decode_compressed_image(msg, max_pixels)


def image_dimensions(msg: Any) -> tuple[int, int] | None:
    """``(width, height)`` of an Image (its fields) or a CompressedImage (its PNG / JPEG header), without
    decoding; None when a compressed header is not one this reader knows (Pillow then reads it)."""
    if hasattr(msg, "encoding"):
        return int(msg.width), int(msg.height)
    return compressed_image_size(_compressed_bytes(msg)[1])


def compressed_image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR or a JPEG's start-of-frame segment; None for anything else."""
    if data.startswith(_PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):  # walk the segments: marker, then a big-endian length that includes itself
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        pos += 2 + length
    return None


def decode_image(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> ``(H, W)`` mono (uint8/uint16/float32) or ``(H, W, 3)`` uint8 RGB, contiguous."""
    enc = ENCODINGS.get(str(msg.encoding))
    if enc is None:
        raise MalformedMessageError(
            f"Image encoding {msg.encoding!r} is not supported (supported: {', '.join(ENCODINGS)})"
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    dtype = np.dtype(enc.dtype).newbyteorder(">" if msg.is_bigendian else "<")
    pixel = dtype.itemsize * enc.channels
    if height * width == 0:
        return np.zeros((height, width) + ((3,) if enc.channels > 1 else ()), dtype.newbyteorder("="))
    if step < width * pixel:
        raise MalformedMessageError(
            f"Image step {step} is smaller than width*bytes_per_pixel = {width}*{pixel} ({msg.encoding})"
        )
    buf = _buffer(msg.data)
    if buf.nbytes < height * step:
        raise MalformedMessageError(
            f"Image data has {buf.nbytes} bytes, height*step needs {height}*{step} = {height * step}"
        )
    pixels = np.ndarray(
        (height, width, enc.channels), dtype, buffer=buf, strides=(step, pixel, dtype.itemsize)
    )
    return _to_canonical(pixels, enc.order)


def _to_canonical(pixels: np.ndarray, order: str) -> np.ndarray:
    if order == "mono":
        image = pixels[:, :, 0]
    elif order.startswith("rgb"):
        image = pixels[:, :, :3]
    else:  # bgr, bgra
        image = pixels[:, :, 2::-1]
    return np.ascontiguousarray(image, image.dtype.newbyteorder("="))


def _buffer(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, np.uint8)
    except (TypeError, ValueError):
        return np.asarray(data, np.uint8)


def _compressed_bytes(msg: Any) -> tuple[str, bytes]:
    """(format, the PNG / JPEG bytes): a compressedDepth message's 12-byte header taken off."""
    fmt = str(msg.format)
    raw = _buffer(msg.data).tobytes()
    if "compresseddepth" in fmt.lower():
        if not fmt.startswith("16UC1") and not fmt.startswith("mono16"):
            raise MalformedMessageError(f"CompressedImage format {fmt!r}: only 16-bit compressedDepth is supported")
        if not raw.startswith(_PNG_MAGIC):
            raw = raw[_COMPRESSED_DEPTH_HEADER:]
    return fmt, raw


def check_pixels(size: tuple[int, int] | None, max_pixels: int, what: str) -> None:
    """MalformedMessageError when a header's ``(width, height)`` is over ``max_pixels`` (a decompression bomb)."""
    if size is not None and size[0] * size[1] > max_pixels:
        raise MalformedMessageError(f"{what} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than the limit "
                                    f"of {max_pixels}; not decoded")


def decode_compressed_image(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png, 16-bit compressedDepth png) -> same conventions as decode_image.
    A header over ``max_pixels`` is refused before decoding."""
    from PIL import Image as PILImage

    fmt, raw = _compressed_bytes(msg)
    what = f"CompressedImage (format {fmt!r}, {len(raw)} bytes)"
    check_pixels(compressed_image_size(raw), max_pixels, what)
    try:
        with PILImage.open(io.BytesIO(raw)) as pil:
            check_pixels(pil.size, max_pixels, what)  # the second wall: Pillow's header, any format
            pil.load()
            return _from_pil(pil)
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as err:  # truncated/unknown/huge
        if isinstance(err, MalformedMessageError):
            raise
        raise MalformedMessageError(f"{what} could not be decoded: {err}")


def _from_pil(pil: Any) -> np.ndarray:
    if pil.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(pil, dtype=np.uint16).copy()
    if pil.mode == "I":  # 16-bit greyscale PNGs often open as 32-bit int
        return np.asarray(pil).astype(np.uint16)
    if pil.mode == "F":
        return np.asarray(pil, dtype=np.float32).copy()
    if pil.mode in ("L", "LA", "1"):
        return np.asarray(pil.convert("L"), dtype=np.uint8).copy()
    return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> ``(H, W, 3)`` uint8 RGB for overlays; 16-bit/float mono is min-max scaled over
    its finite values (NaN/inf become black)."""
    image = np.asarray(image)
    if image.ndim == 3:
        return image[:, :, :3].astype(np.uint8, copy=False)
    if image.dtype != np.uint8:
        image = _scale_to_uint8(image)
    return np.repeat(image[:, :, None], 3, axis=2)


def _scale_to_uint8(image: np.ndarray) -> np.ndarray:
    values = image.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(image.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    scaled = (values - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return np.where(finite, np.clip(np.rint(scaled), 0, 255), 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------- encoding


def encode_image(array: np.ndarray, encoding: str, frame_id: str, stamp_ns: int, types: MessageTypes) -> Any:
    """numpy -> sensor_msgs/Image (little-endian, no row padding): mono8/mono16/32FC1 ``(H, W)``, rgb8 ``(H, W, 3)``."""
    if encoding not in ENCODABLE:
        raise ValueError(f"encode_image: encoding {encoding!r} not supported (use one of {ENCODABLE})")
    enc = ENCODINGS[encoding]
    array = np.asarray(array)
    expected_ndim = 2 if enc.channels == 1 else 3
    if array.ndim != expected_ndim or (enc.channels > 1 and array.shape[2] != enc.channels):
        raise ValueError(f"encode_image: {encoding} needs shape {'(H, W)' if expected_ndim == 2 else '(H, W, 3)'}, "
                         f"got {array.shape}")
    if array.dtype != np.dtype(enc.dtype):
        raise ValueError(f"encode_image: {encoding} needs dtype {np.dtype(enc.dtype)}, got {array.dtype}")
    height, width = array.shape[:2]
    data, raw = types.byte_buffer(array.nbytes)
    raw.view(np.dtype(enc.dtype).newbyteorder("<"))[:] = array.reshape(-1)
    msg = types.Image(
        header=make_header(frame_id, stamp_ns, types),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=False,
        step=width * enc.channels * array.dtype.itemsize,
    )
    msg.data = data  # after construction: rclpy's constructor would copy the buffer, its setter keeps it
    return msg


def encode_compressed_image(
    array: np.ndarray, fmt: str, frame_id: str, stamp_ns: int, types: MessageTypes, quality: int = 90
) -> Any:
    """numpy (uint8 mono/RGB, or uint16 mono for png) -> sensor_msgs/CompressedImage, format strings as
    image_transport's compressed plugin writes them (e.g. ``"rgb8; jpeg compressed bgr8"``)."""
    from PIL import Image as PILImage

    if fmt not in ("jpeg", "png"):
        raise ValueError(f"encode_compressed_image: format must be 'jpeg' or 'png', got {fmt!r}")
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16 and array.ndim == 2 and fmt == "png":
        pil, encoding, compressed = PILImage.fromarray(array), "mono16", "mono16"
    elif array.dtype == np.uint8 and array.ndim == 2:
        pil, encoding, compressed = PILImage.fromarray(array), "mono8", "mono8"
    elif array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        pil, encoding, compressed = PILImage.fromarray(array), "rgb8", "bgr8"
    else:
        raise ValueError(f"encode_compressed_image: cannot write {array.dtype} {array.shape} as {fmt}")
    out = io.BytesIO()
    pil.save(out, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": quality} if fmt == "jpeg" else {}))
    return types.CompressedImage(
        header=make_header(frame_id, stamp_ns, types),
        format=f"{encoding}; {fmt} compressed {compressed}",
        data=types.as_data(out.getbuffer()),
    )
