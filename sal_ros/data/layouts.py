"""Which dataset layout a folder holds, and which sequences and scans of a SemanticKITTI root to read.

sal_ros.data.sources registers each layout (``is_*``) as a frame-source kind; sal_ros.data.datasets reads the
files of the folders recognised here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sal_ros.core.calibration import load_calibration_json
from sal_ros.core.errors import SensorDataError


# ----------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """Which sequences and scans of a SemanticKITTI root to read, from text such as ``00,05:0-4``.

    Groups are separated by ``;``; a group is ``SEQUENCES[:SCANS]``: sequence names separated by commas (``*`` =
    every sequence) and, after the colon, scan numbers and inclusive ranges separated by commas (``0-4,7``).
    ``00,05:0-4`` = scans 0 to 4 of sequences 00 and 05; ``00;05:0-4`` = all of 00 and scans 0-4 of 05;
    ``*:0-1`` = the first two scans of every sequence. Sequence names compare as numbers when both are numbers
    (``5`` = ``05``). A scan matches when some group names both its sequence and its number.
    """

    groups: tuple[tuple[tuple[str, ...] | None, tuple[tuple[int, int], ...] | None], ...]
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "Selection":
        groups = []
        for group in (g.strip() for g in str(text).split(";")):
            if not group:
                continue
            seqs, _, ranges = group.partition(":")
            names = tuple(s.strip() for s in seqs.split(",") if s.strip())
            if not names:
                raise ValueError(f"selection {text!r}: group {group!r} names no sequence (use * for all)")
            groups.append((None if names == ("*",) else names, _parse_ranges(ranges, text) if ranges.strip() else None))
        if not groups:
            raise ValueError(f"selection {text!r} selects nothing; e.g. 00,05:0-4")
        return cls(tuple(groups), str(text))

    def names_sequence(self, seq: str) -> bool:
        return any(names is None or any(_same_sequence(n, seq) for n in names) for names, _ in self.groups)

    def matches(self, seq: str, scan: int) -> bool:
        return any((names is None or any(_same_sequence(n, seq) for n in names))
                   and (ranges is None or any(lo <= scan <= hi for lo, hi in ranges)) for names, ranges in self.groups)

    def named_sequences(self) -> list[str]:
        return [n for names, _ in self.groups if names is not None for n in names]


def _parse_ranges(text: str, whole: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            pair = (int(lo), int(hi) if dash else int(lo))
        except ValueError:
            raise ValueError(f"selection {whole!r}: {part!r} is not a scan number or range a-b") from None
        if pair[0] < 0 or pair[1] < pair[0]:
            raise ValueError(f"selection {whole!r}: empty or negative scan range {part!r}")
        out.append(pair)
    return tuple(out)


def _same_sequence(a: str, b: str) -> bool:
    return a == b or (a.isdigit() and b.isdigit() and int(a) == int(b))


def selected_sequences(root: Path, selection: "Selection | None") -> list[Path]:
    """The sequence folders of ``root`` the selection names; a named sequence that is not there is an error."""
    seqs = semantickitti_sequences(root)
    if selection is None:
        return seqs
    missing = [n for n in selection.named_sequences() if not any(_same_sequence(n, s.name) for s in seqs)]
    if missing:
        raise SensorDataError(f"{root}: no sequence(s) {missing} (has {[s.name for s in seqs]})")
    return [s for s in seqs if selection.names_sequence(s.name)]


# ------------------------------------------------------------------------------------------------ layouts
# How each layout is recognised; sal_ros.data.sources registers them as frame-source kinds.


def semantickitti_sequences(path: Path) -> list[Path]:
    """A SemanticKITTI sequence folder itself, or the sequences under its sequences/ folder."""
    if (path / "velodyne").is_dir():
        return [path]
    return sorted(p for p in (path / "sequences").iterdir() if (p / "velodyne").is_dir())


def is_semantickitti_sequence(path: Path) -> bool:
    return (path / "velodyne").is_dir() and (path / "calib.txt").is_file()


def is_semantickitti(path: Path) -> bool:
    """One sequence folder, or a dataset root holding sequences."""
    return is_semantickitti_sequence(path) or ((path / "sequences").is_dir() and bool(semantickitti_sequences(path)))


def is_kitti_object(path: Path) -> bool:
    return any((base / "velodyne").is_dir() and (base / "calib").is_dir() for base in (path, path / "training"))


def _calib_json_has(path: Path, *names: str) -> bool:
    calib = path / "calib.json"
    return calib.is_file() and all(name in load_calibration_json(calib) for name in names)


def is_nuscenes(path: Path) -> bool:
    return _calib_json_has(path, "cams", "lidar_path")


def is_kitti_frustum(path: Path) -> bool:
    return _calib_json_has(path, "lidar2img", "P2")
