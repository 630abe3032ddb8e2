"""The pseudo-label files: one ``.npz`` per lidar frame, written by ``sal-ros pseudolabel``, read by training.

Instance pseudo-labels (``PseudoLabels``: SAL's masks and CLIP tokens); all per frame, arrays indexed per point
keep the frame's point order:

- ``instance`` (N,) uint32: 0 = no pseudo-label, i >= 1 = pseudo-instance i;
- ``tokens`` (K, D) float16: the CLIP token of instance i is row i - 1 (L2-normalized, CLIP joint space);
- ``scores`` (K,) float32: mask confidence (the 2D mask generator's score, averaged over cameras);
- ``cameras`` (K,) uint32: bit j set = camera ``meta["camera_names"][j]`` saw the instance;
- ``in_frustum`` (N,) bool: the point projects into at least one camera image; training crops the rest
  (SAL's frustum crop, class-agnostic PQ 22.2 -> 59.3);
- ``meta``: a JSON dict (mask source, CLIP model, engine settings, ``config_hash``, ``camera_names``).

Semantic pseudo-labels (``SemanticLabels``, ``sal-ros pseudolabel --semantic``): per point ``label`` (after
filtering), ``raw_label`` (before), ``confidence``, ``margin``, ``filtered`` (bits: why a seen point lost its
label) and ``in_frustum``, with ``meta`` (``class_names``, ``config_hash``).

Files are written atomically (``sal_ros.core.files``: temporary file in the same folder, then ``os.replace``), so a
reader never sees a half-written file, and an interrupted run leaves either the old state or the whole new file.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import atomic_write

FORMAT_VERSION = 1
SUFFIX = ".npz"


@dataclass
class PseudoLabels:
    instance: np.ndarray  # (N,) uint32
    tokens: np.ndarray  # (K, D) float16
    scores: np.ndarray  # (K,) float32
    cameras: np.ndarray  # (K,) uint32 bitmask over meta["camera_names"]
    in_frustum: np.ndarray  # (N,) bool
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.instance = np.asarray(self.instance, np.uint32).reshape(-1)
        self.tokens = np.asarray(self.tokens, np.float16)
        if self.tokens.ndim == 1 and self.tokens.size == 0:
            self.tokens = self.tokens.reshape(0, 0)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.cameras = np.asarray(self.cameras, np.uint32).reshape(-1)
        self.in_frustum = np.asarray(self.in_frustum, bool).reshape(-1)
        self.meta = dict(self.meta)
        self.validate()

    @property
    def num_points(self) -> int:
        return int(self.instance.size)

    @property
    def num_instances(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def camera_names(self) -> list[str]:
        return list(self.meta.get("camera_names", []))

    def instance_cameras(self, i: int) -> list[str]:
        """Names of the cameras that saw instance ``i`` (1-based)."""
        bits = int(self.cameras[i - 1])
        return [name for j, name in enumerate(self.camera_names) if bits >> j & 1]

    @property
    def coverage(self) -> float:
        """Fraction of in-frustum points that carry a pseudo-label."""
        n = int(self.in_frustum.sum())
        return float((self.instance[self.in_frustum] > 0).sum() / n) if n else 0.0

    def validate(self, where: str = "pseudo-labels") -> None:
        n, k = self.instance.size, self.tokens.shape[0] if self.tokens.ndim == 2 else -1
        if self.tokens.ndim != 2:
            raise SensorDataError(f"{where}: tokens must be (K, D), got shape {self.tokens.shape}")
        if self.scores.size != k or self.cameras.size != k:
            raise SensorDataError(f"{where}: {k} tokens but {self.scores.size} scores and {self.cameras.size} "
                                  "camera masks")
        if self.in_frustum.size != n:
            raise SensorDataError(f"{where}: in_frustum has {self.in_frustum.size} entries for {n} points")
        top = int(self.instance.max(initial=0))
        if top > k:
            raise SensorDataError(f"{where}: instance id {top} but only {k} tokens")
        if n and np.any((self.instance > 0) & ~self.in_frustum):
            raise SensorDataError(f"{where}: labelled points outside every camera frustum")
        if k and not np.all(np.isfinite(self.tokens)):
            raise SensorDataError(f"{where}: tokens hold NaN or inf")


def empty_pseudolabels(num_points: int, dim: int, meta: dict | None = None) -> PseudoLabels:
    return PseudoLabels(np.zeros(num_points, np.uint32), np.zeros((0, dim), np.float16), np.zeros(0, np.float32),
                        np.zeros(0, np.uint32), np.zeros(num_points, bool), meta or {})


def pseudolabel_path(out_dir: str | Path, key: str) -> Path:
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"frame key {key!r} cannot name a file")
    return Path(out_dir) / f"{key}{SUFFIX}"


def save_pseudolabels(path: str | Path, pl: PseudoLabels) -> Path:
    """Write ``pl`` to ``path`` atomically (``sal_ros.core.files.atomic_write``)."""
    pl.validate(str(path))
    path = Path(path)
    meta = {**pl.meta, "format_version": FORMAT_VERSION}
    arrays = dict(instance=pl.instance, tokens=pl.tokens, scores=pl.scores, cameras=pl.cameras,
                  in_frustum=pl.in_frustum, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


_ARRAYS = ("instance", "tokens", "scores", "cameras", "in_frustum", "meta")


def load_pseudolabels(path: str | Path, num_points: int | None = None) -> PseudoLabels:
    """Read and validate a pseudo-label file; ``num_points`` (the frame's) is checked when given."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in _ARRAYS if a not in z.files]
            if missing:
                raise SensorDataError(f"{path}: not a pseudo-label file (missing {', '.join(missing)})")
            arrays = {a: z[a] for a in _ARRAYS}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise SensorDataError(f"{path}: unreadable pseudo-label file ({exc})") from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as exc:
        raise SensorDataError(f"{path}: meta is not JSON ({exc})") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SensorDataError(f"{path}: pseudo-label format version {version}, this reader knows {FORMAT_VERSION}")
    for name, kinds in (("instance", "u"), ("cameras", "u"), ("in_frustum", "b"), ("tokens", "f"), ("scores", "f")):
        if arrays[name].dtype.kind not in kinds:
            raise SensorDataError(f"{path}: {name} has dtype {arrays[name].dtype}")
    try:
        pl = PseudoLabels(meta=meta, **arrays)
    except SensorDataError as exc:
        raise SensorDataError(f"{path}: {exc}") from exc
    if num_points is not None and pl.num_points != num_points:
        raise SensorDataError(f"{path}: {pl.num_points} points, the frame has {num_points}")
    return pl


# --- semantic pseudo-labels -------------------------------------------------------------------------------------------

SEMANTIC_FORMAT = "sal_ros.semantic_pseudolabels"
SEMANTIC_FORMAT_VERSION = 1
# bits of SemanticLabels.filtered: why a point that a camera saw lost its label
LOW_SCORE, LOW_MARGIN, CAMERA_DISAGREE, FRAME_DISAGREE = 1, 2, 4, 8
REASONS = {LOW_SCORE: "score", LOW_MARGIN: "margin", CAMERA_DISAGREE: "cameras", FRAME_DISAGREE: "frames"}


@dataclass
class SemanticLabels:
    """Per point of one frame: ``label`` 0 = none or filtered, k >= 1 = ``class_names[k - 1]``."""

    label: np.ndarray  # (N,) uint16, after filtering
    raw_label: np.ndarray  # (N,) uint16, before filtering (0 = no camera saw the point)
    confidence: np.ndarray  # (N,) float16, fused top-1 probability
    margin: np.ndarray  # (N,) float16, top-1 minus top-2
    filtered: np.ndarray  # (N,) uint8, REASONS bits
    in_frustum: np.ndarray  # (N,) bool, projects into some image (occluded or not)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label = np.asarray(self.label, np.uint16)
        self.raw_label = np.asarray(self.raw_label, np.uint16)
        self.confidence = np.asarray(self.confidence, np.float16)
        self.margin = np.asarray(self.margin, np.float16)
        self.filtered = np.asarray(self.filtered, np.uint8)
        self.in_frustum = np.asarray(self.in_frustum, bool)
        n = self.label.size
        for name in ("raw_label", "confidence", "margin", "filtered", "in_frustum"):
            if getattr(self, name).shape != (n,):
                raise SensorDataError(f"semantic pseudo-labels: {name} has shape {getattr(self, name).shape}, "
                                      f"label has {n} points")
        top = int(self.raw_label.max(initial=0))
        if top > len(self.class_names):
            raise SensorDataError(f"semantic pseudo-labels: class {top} but {len(self.class_names)} class names")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", []))

    @property
    def seen(self) -> np.ndarray:
        return self.raw_label > 0

    @property
    def kept_share(self) -> float:
        seen = int(self.seen.sum())
        return float((self.label > 0).sum() / seen) if seen else 0.0


_SEMANTIC_ARRAYS = ("label", "raw_label", "confidence", "margin", "filtered", "in_frustum")


def save_semantic(path: str | Path, labels: SemanticLabels) -> Path:
    meta = {**labels.meta, "format": SEMANTIC_FORMAT, "format_version": SEMANTIC_FORMAT_VERSION}
    arrays = {a: getattr(labels, a) for a in _SEMANTIC_ARRAYS}
    return atomic_write(Path(path), lambda f: np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays))


def load_semantic(path: str | Path, num_points: int | None = None) -> SemanticLabels:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in (*_SEMANTIC_ARRAYS, "meta") if a not in z.files]
            if missing:
                raise SensorDataError(f"{path}: not a semantic pseudo-label file (missing {', '.join(missing)})")
            arrays = {a: z[a] for a in _SEMANTIC_ARRAYS}
            meta = json.loads(str(z["meta"]))
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise SensorDataError(f"{path}: unreadable semantic pseudo-label file ({exc})") from exc
    if meta.get("format") != SEMANTIC_FORMAT or meta.get("format_version") != SEMANTIC_FORMAT_VERSION:
        raise SensorDataError(f"{path}: not a version {SEMANTIC_FORMAT_VERSION} {SEMANTIC_FORMAT} file")
    try:
        labels = SemanticLabels(meta=meta, **arrays)
    except SensorDataError as exc:
        raise SensorDataError(f"{path}: {exc}") from exc
    if num_points is not None and labels.label.size != num_points:
        raise SensorDataError(f"{path}: {labels.label.size} points, the frame has {num_points}")
    return labels
