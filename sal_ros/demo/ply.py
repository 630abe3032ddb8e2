"""Labeled clouds as binary PLY (CloudCompare, Open3D, MeshLab open it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sal_ros.core.files import atomic_write

PLY_FIELDS = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("label", "<u2"),
                       ("instance", "<u4"), ("score", "<f4")])
PLY_TYPES = {"<f4": "float", "<u2": "ushort", "<u4": "uint"}


def write_ply(path: Path, points: np.ndarray, intensity: np.ndarray | None, label: np.ndarray,
              instance: np.ndarray, score: np.ndarray) -> Path:
    """x y z intensity label instance score per point, little-endian, written atomically. ``intensity`` None is
    written as zeros, so the layout never changes."""
    rows = np.empty(len(points), PLY_FIELDS)
    rows["x"], rows["y"], rows["z"] = np.asarray(points, np.float32).T
    rows["intensity"] = 0 if intensity is None else intensity
    rows["label"], rows["instance"], rows["score"] = label, instance, score
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
    header += [f"property {PLY_TYPES[PLY_FIELDS[n].str]} {n}" for n in PLY_FIELDS.names] + ["end_header", ""]
    return atomic_write(path, "\n".join(header).encode() + rows.tobytes())


def read_ply(path: Path) -> np.ndarray:
    """The structured rows of a binary little-endian PLY with one vertex element (what write_ply writes)."""
    raw = Path(path).read_bytes()
    head, sep, body = raw.partition(b"end_header\n")
    lines = head.decode("ascii").splitlines()
    if not sep or lines[:2] != ["ply", "format binary_little_endian 1.0"]:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    count = int(next(line for line in lines if line.startswith("element vertex")).split()[-1])
    kinds = {v: k for k, v in PLY_TYPES.items()}
    dtype = np.dtype([(line.split()[2], kinds[line.split()[1]]) for line in lines if line.startswith("property")])
    return np.frombuffer(body, dtype, count=count)
