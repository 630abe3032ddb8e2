"""Semantic pseudo-labels: per-pixel class scores of a 2D model -> per-point classes with confidence and filtering.

The indoor ScaLR study (METHODS.md, seed 004) projects 2D semantic predictions onto lidar points and keeps only
confident ones. Per frame (``SemanticLabeler.label_frame``):

1. per camera: class probabilities (C, h, w) from a score source (any resolution; read at each point's pixel);
2. per camera: the engine's projection and occlusion test (``lifting.point_pixels``): occluded points get nothing;
3. fuse cameras: mean of the probabilities of the cameras that see a point; each camera's top class is kept for
   the agreement test;
4. filter (``FilterConfig``): top-1 probability, margin between the top two, agreement across cameras, agreement
   with neighbouring frames aligned by their poses; a filtered point keeps its raw class in ``raw_label`` but
   gets label 0 (ignore) and a bit in ``filtered`` saying why.

Score sources (``build_score_source``): ``clip`` (open vocabulary: MaskCLIP dense features of the open_clip image
tower against the vocabulary's text embeddings), ``folder`` (precomputed maps of any closed-set segmenter),
``torchscript`` (a local TorchScript model file) and ``oracle`` (ground-truth classes rendered into the image,
degraded by Gaussian logit noise: the known-quality teacher of the tests and the measurements).

Files: one ``<key>.npz`` per frame (``save_semantic`` / ``load_semantic``), written atomically, with the run's
``config_hash`` so that a resumed run skips finished frames and refuses files of another configuration.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import atomic_write
from sal_ros.data.datasets import semantickitti_sequences
from sal_ros.eval.labels import get_label_set
from sal_ros.model.vocabulary import TextEncoder, Vocabulary
from sal_ros.pseudolabel.clip_tokens import ClipTokenEncoder
from sal_ros.pseudolabel.lifting import LiftConfig, point_pixels, project_view
from sal_ros.pseudolabel.masks import as_rgb

FORMAT = "sal_ros.semantic_pseudolabels"
FORMAT_VERSION = 1
# bits of SemanticLabels.filtered: why a point that a camera saw lost its label
LOW_SCORE, LOW_MARGIN, CAMERA_DISAGREE, FRAME_DISAGREE = 1, 2, 4, 8
REASONS = {LOW_SCORE: "score", LOW_MARGIN: "margin", CAMERA_DISAGREE: "cameras", FRAME_DISAGREE: "frames"}


@dataclass
class FilterConfig:
    min_score: float = 0.0  # fused top-1 probability below this: ignore
    min_margin: float = 0.0  # top-1 minus top-2 probability below this: ignore
    camera_agreement: bool = False  # seen by several cameras whose top classes differ: ignore
    frame_agreement: int = 0  # neighbouring frames each side that vote (0 = off; needs poses)
    frame_radius: float = 0.2  # metres: a neighbour frame's point this close (after alignment) votes
    frame_min_agree: float = 0.5  # share of the votes a point's class needs to be kept

    def __post_init__(self) -> None:
        for name in ("min_score", "min_margin", "frame_min_agree"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.frame_agreement < 0 or not self.frame_radius > 0:
            raise ValueError(f"frame_agreement must be >= 0 and frame_radius > 0, got {self.frame_agreement}, "
                             f"{self.frame_radius}")


@dataclass
class SemanticConfig:
    kind: str = "semantic"
    scores: str = "clip"  # clip | folder | torchscript | oracle
    score_options: dict = field(default_factory=dict)
    lift: LiftConfig = field(default_factory=LiftConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scores": self.scores, "score_options": dict(self.score_options),
                "lift": asdict(self.lift), "filter": asdict(self.filter), "device": self.device}

    @classmethod
    def from_dict(cls, d: dict) -> "SemanticConfig":
        d = dict(d)
        lift = dict(d.pop("lift", None) or {})
        if "lidar_spacing_deg" in lift:
            lift["lidar_spacing_deg"] = tuple(lift["lidar_spacing_deg"])
        return cls(**{**d, "lift": LiftConfig(**lift), "filter": FilterConfig(**(d.pop("filter", None) or {}))})

    def config_hash(self) -> str:
        d = self.to_dict()
        d.pop("device")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @staticmethod
    def read_config_hash(path: Path) -> str | None:
        return load_semantic(path).meta.get("config_hash")


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


_ARRAYS = ("label", "raw_label", "confidence", "margin", "filtered", "in_frustum")


def save_semantic(path: str | Path, labels: SemanticLabels) -> Path:
    meta = {**labels.meta, "format": FORMAT, "format_version": FORMAT_VERSION}
    arrays = {a: getattr(labels, a) for a in _ARRAYS}
    return atomic_write(Path(path), lambda f: np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays))


def load_semantic(path: str | Path, num_points: int | None = None) -> SemanticLabels:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in (*_ARRAYS, "meta") if a not in z.files]
            if missing:
                raise SensorDataError(f"{path}: not a semantic pseudo-label file (missing {', '.join(missing)})")
            arrays = {a: z[a] for a in _ARRAYS}
            meta = json.loads(str(z["meta"]))
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise SensorDataError(f"{path}: unreadable semantic pseudo-label file ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SensorDataError(f"{path}: not a version {FORMAT_VERSION} {FORMAT} file")
    try:
        labels = SemanticLabels(meta=meta, **arrays)
    except SensorDataError as exc:
        raise SensorDataError(f"{path}: {exc}") from exc
    if num_points is not None and labels.label.size != num_points:
        raise SensorDataError(f"{path}: {labels.label.size} points, the frame has {num_points}")
    return labels


# --- lifting and fusion ------------------------------------------------------------------------------------------

@dataclass
class CameraScores:
    """One camera's class probabilities at the points it sees (occlusion test passed)."""

    name: str
    index: np.ndarray  # (P,) point indices
    probs: np.ndarray  # (P, C) float32
    in_image: np.ndarray  # (P_all,) indices of every point projecting into the image


def sample_map(probs: np.ndarray, u: np.ndarray, v: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """(P, C) values of a (C, h, w) map at full-image pixels (u, v): nearest cell of a coarser map."""
    c, h, w = probs.shape
    rows = np.minimum((v * h) // image_shape[0], h - 1)
    cols = np.minimum((u * w) // image_shape[1], w - 1)
    return probs[:, rows, cols].T.astype(np.float32)


def lift_scores(frame, maps: dict[str, np.ndarray], lift: LiftConfig) -> list[CameraScores]:
    out = []
    for name, probs in maps.items():
        view = frame.cameras[name]
        px = point_pixels(frame.points, view, lift)
        keep = px.visible
        p = sample_map(np.asarray(probs), px.u[keep], px.v[keep], view.image.shape[:2])
        out.append(CameraScores(name, px.index[keep], p, px.index))
    return out


def fuse_scores(cams: list[CameraScores], n: int, num_classes: int):
    """(probs (N, C) mean over the cameras that see each point, seen (N,), cameras disagree (N,), in_frustum)."""
    total = np.zeros((n, num_classes), np.float32)
    count = np.zeros(n, np.int32)
    first_top = np.full(n, -1, np.int64)
    disagree = np.zeros(n, bool)
    in_frustum = np.zeros(n, bool)
    for cam in cams:
        total[cam.index] += cam.probs
        count[cam.index] += 1
        top = cam.probs.argmax(1) if len(cam.index) else np.zeros(0, np.int64)
        prev = first_top[cam.index]
        disagree[cam.index] |= (prev >= 0) & (prev != top)
        first_top[cam.index] = np.where(prev >= 0, prev, top)
        in_frustum[cam.in_image] = True
    seen = count > 0
    total[seen] /= count[seen, None]
    return total, seen, disagree, in_frustum


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class index, top-1 probability, margin to the second) per row."""
    if probs.shape[1] == 1:
        return np.zeros(len(probs), np.int64), probs[:, 0], probs[:, 0]
    part = np.partition(probs, -2, axis=1)
    return probs.argmax(1), part[:, -1], part[:, -1] - part[:, -2]


def label_from_scores(frame, maps: dict[str, np.ndarray], class_names: list[str], lift: LiftConfig = LiftConfig(),
                      filt: FilterConfig = FilterConfig(), meta: dict | None = None) -> SemanticLabels:
    """Steps 2-4 (frame agreement aside: ``apply_frame_agreement``) for given per-camera maps (C, h, w)."""
    n, c = frame.num_points, len(class_names)
    for name, m in maps.items():
        if np.ndim(m) != 3 or np.shape(m)[0] != c:
            raise SensorDataError(f"camera {name}: score map of shape {np.shape(m)}, expected ({c}, h, w)")
    probs, seen, disagree, in_frustum = fuse_scores(lift_scores(frame, maps, lift), n, c)
    cls, conf, margin = top2(probs)
    raw = np.where(seen, cls + 1, 0).astype(np.uint16)
    filtered = np.zeros(n, np.uint8)
    filtered[seen & (conf < filt.min_score)] |= LOW_SCORE
    filtered[seen & (margin < filt.min_margin)] |= LOW_MARGIN
    if filt.camera_agreement:
        filtered[seen & disagree] |= CAMERA_DISAGREE
    label = np.where(filtered == 0, raw, 0).astype(np.uint16)
    meta = {**(meta or {}), "class_names": list(class_names), "camera_names": list(maps), "key": frame.key}
    return SemanticLabels(label, raw, np.where(seen, conf, 0), np.where(seen, margin, 0), filtered, in_frustum, meta)


def apply_frame_agreement(labels: SemanticLabels, points: np.ndarray, neighbours: list[tuple[np.ndarray, np.ndarray]],
                          radius: float, min_agree: float) -> None:
    """Drop (in place) points whose class most aligned neighbour frames contradict.

    ``neighbours``: (points already in this frame's lidar coordinates, raw labels) of other frames. Each neighbour
    frame whose nearest labelled point lies within ``radius`` votes for its class; a point is kept when at least
    ``min_agree`` of its votes agree (no votes: kept)."""
    from scipy.spatial import cKDTree

    seen = np.flatnonzero(labels.raw_label > 0)
    agree = np.zeros(seen.size, np.int32)
    votes = np.zeros(seen.size, np.int32)
    for pts, raw in neighbours:
        has = raw > 0
        if not has.any() or seen.size == 0:
            continue
        dist, idx = cKDTree(pts[has]).query(points[seen], k=1, distance_upper_bound=radius)
        hit = np.isfinite(dist)
        votes += hit
        agree += hit & (raw[has][np.minimum(idx, has.sum() - 1)] == labels.raw_label[seen])
    bad = seen[(votes > 0) & (agree < min_agree * votes)]
    labels.filtered[bad] |= FRAME_DISAGREE
    labels.label[bad] = 0


# --- poses -------------------------------------------------------------------------------------------------------

def semantickitti_lidar_poses(seq_dir: str | Path) -> dict[str, np.ndarray]:
    """{frame key: (4, 4) velodyne-to-world} from a sequence's poses.txt (cam0-to-world) and calib.txt ``Tr``."""
    seq_dir = Path(seq_dir)
    poses_file, calib_file = seq_dir / "poses.txt", seq_dir / "calib.txt"
    if not poses_file.is_file():
        raise SensorDataError(f"{seq_dir}: frame agreement needs poses (poses.txt of a SemanticKITTI sequence)")
    tr = None
    for line in calib_file.read_text().splitlines():
        if line.startswith("Tr:"):
            tr = np.vstack([np.array(line.split()[1:], np.float64).reshape(3, 4), [0, 0, 0, 1]])
    if tr is None:
        raise SensorDataError(f"{calib_file}: no Tr line")
    out, inv_tr = {}, np.linalg.inv(tr)
    for i, line in enumerate(poses_file.read_text().splitlines()):
        if line.strip():
            pose = np.vstack([np.array(line.split(), np.float64).reshape(3, 4), [0, 0, 0, 1]])
            out[f"{seq_dir.name}_{i:06d}"] = inv_tr @ pose @ tr
    return out


def transform(points: np.ndarray, T: np.ndarray) -> np.ndarray:
    return (points.astype(np.float64) @ T[:3, :3].T + T[:3, 3]).astype(np.float32)


# --- score sources -----------------------------------------------------------------------------------------------

def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def render_point_values(points: np.ndarray, view, values: np.ndarray, min_depth: float = 1.0,
                        splat: tuple[int, int] = (2, 3)) -> np.ndarray:
    """(H, W) int64 image of per-point ``values``: each projected point paints a (2 sx + 1) x (2 sy + 1) splat and
    the nearest point wins a pixel (z-buffer), as a camera would show the scene; 0 where no point paints."""
    idx, uv, depth = project_view(points, view, min_depth)
    h, w = view.image.shape[:2]
    du, dv = np.meshgrid(np.arange(-splat[0], splat[0] + 1), np.arange(-splat[1], splat[1] + 1))
    u = (uv[:, 0].astype(np.int64)[:, None] + du.reshape(1, -1)).ravel()
    v = (uv[:, 1].astype(np.int64)[:, None] + dv.reshape(1, -1)).ravel()
    d, val = np.repeat(depth, du.size), np.repeat(np.asarray(values)[idx], du.size)
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    pix, d, val = v[ok] * w + u[ok], d[ok], val[ok]
    order = np.lexsort((d, pix))  # per pixel, nearest first
    pix, val = pix[order], val[order]
    first = np.r_[True, pix[1:] != pix[:-1]]
    image = np.zeros(h * w, np.int64)
    image[pix[first]] = val[first]
    return image.reshape(h, w)


class OracleScores:
    """Ground-truth classes rendered into the image (z-buffered splats, the nearest point wins a pixel: what the
    camera shows), as logits ``strength`` * one-hot + N(0, ``noise``) per pixel and class; unrendered pixels get
    noise only. A known-quality stand-in for a 2D segmenter (``noise`` 0: a perfect one)."""

    name = "oracle"

    def __init__(self, label_set: str = "semantickitti", noise: float = 1.0, strength: float = 2.0,
                 splat: tuple[int, int] = (2, 3), seed: int = 0, min_depth: float = 1.0) -> None:
        self.label_set = get_label_set(label_set)
        self.class_names = list(self.label_set.class_names)
        self.noise, self.strength, self.splat, self.seed, self.min_depth = noise, strength, tuple(splat), seed, min_depth

    def render(self, frame, view) -> np.ndarray:
        """(H, W) int class id per pixel (0 = none) of the nearest ground-truth point."""
        if frame.gt_labels is None:
            raise SensorDataError(f"frame {frame.key}: oracle scores need ground-truth labels")
        cls, _ = self.label_set.split(frame.gt_labels)
        return render_point_values(frame.points, view, cls, self.min_depth, self.splat)

    def scores(self, frame, view) -> np.ndarray:
        rendered = self.render(frame, view)
        c = len(self.class_names)
        seed = [self.seed, int(hashlib.sha1(f"{frame.key}/{view.name}".encode()).hexdigest()[:8], 16)]
        logits = np.random.default_rng(seed).normal(0.0, self.noise, (c, *rendered.shape)).astype(np.float32)
        rows, cols = np.nonzero(rendered > 0)
        logits[rendered[rows, cols] - 1, rows, cols] += self.strength
        return softmax(logits)


class FolderScores:
    """Precomputed maps of any 2D segmenter: ``<root>/<frame key>/<camera>.npy`` (C, h, w) probabilities or
    logits (``logits: true``), or (h, w) integer class maps (1..C, 0 = none); class names in
    ``<root>/classes.txt`` (one per line, class k on line k)."""

    name = "folder"

    def __init__(self, root: str, logits: bool = False) -> None:
        self.root, self.logits = Path(root), bool(logits)
        names = self.root / "classes.txt"
        if not names.is_file():
            raise FileNotFoundError(f"{names}: a score folder names its classes, one per line")
        self.class_names = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]

    def scores(self, frame, view) -> np.ndarray:
        path = self.root / frame.key / f"{view.name}.npy"
        if not path.is_file():
            raise SensorDataError(f"no score map {path}")
        m = np.load(path, allow_pickle=False)
        c = len(self.class_names)
        if m.ndim == 2 and m.dtype.kind in "iu":
            if m.max(initial=0) > c:
                raise SensorDataError(f"{path}: class {m.max()} but {c} classes")
            out = (m[None] == np.arange(1, c + 1)[:, None, None]).astype(np.float32)
            return out
        if m.ndim != 3 or m.shape[0] != c:
            raise SensorDataError(f"{path}: shape {m.shape}, expected ({c}, h, w) or (h, w) class ids")
        m = m.astype(np.float32)
        return softmax(m) if self.logits else m


class TorchScriptScores:
    """A local TorchScript segmenter: (1, 3, H, W) float RGB in [0, 1] -> (1, C, h, w) logits; class names given
    (``class_names``) or in a ``<model>.classes.txt`` beside it."""

    name = "torchscript"

    def __init__(self, model: str, class_names: list[str] | None = None, device: str = "cpu") -> None:
        import torch

        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript model {path} not found")
        if class_names is None:
            names = path.with_suffix(path.suffix + ".classes.txt")
            if not names.is_file():
                raise FileNotFoundError(f"{names}: give the model's class names (class_names or this file)")
            class_names = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]
        self.class_names = list(class_names)
        self.torch, self.device = torch, torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    def scores(self, frame, view) -> np.ndarray:
        rgb = as_rgb(view.image)
        x = self.torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().to(self.device) / 255.0
        with self.torch.inference_mode():
            out = self.model(x)
        out = out[0].float().cpu().numpy()
        if out.ndim != 3 or out.shape[0] != len(self.class_names):
            raise SensorDataError(f"TorchScript model gave shape {out.shape}, expected ({len(self.class_names)}, h, w)")
        return softmax(out)


class ClipDenseScores:
    """Open vocabulary, MaskCLIP-style (Zhou et al., ECCV 2022): per patch, the last ViT block's value path
    (``ClipTokenEncoder.patch_features``) in CLIP's joint space, cosine against the vocabulary's text embeddings
    (a class with several descriptions takes its best), softmax at CLIP's logit scale. Maps are patch-grid sized."""

    name = "clip"

    def __init__(self, vocabulary, clip_model: str = "ViT-B-16", pretrained: str | None = None, device: str = "cpu",
                 logit_scale: float = 100.0, short_side: int | None = None) -> None:
        if isinstance(vocabulary, (str, Path)):
            vocabulary = Vocabulary.from_yaml(vocabulary)
        elif not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.from_prompts(list(vocabulary))
        self.encoder = ClipTokenEncoder(clip_model, pretrained, device=device, method="dense", short_side=short_side)
        text = TextEncoder(clip_model, pretrained, device).encode(vocabulary)
        self.class_names = list(text.class_names)
        self.text = self.encoder.torch.from_numpy(np.ascontiguousarray(text.embeddings)).to(self.encoder.device)
        self.row_class = np.asarray(text.row_class)
        self.logit_scale = float(logit_scale)

    def scores(self, frame, view) -> np.ndarray:
        enc, torch = self.encoder, self.encoder.torch
        with torch.inference_mode():
            feats, grid = enc.patch_features(as_rgb(view.image))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            sims = (feats @ self.text.float().T).cpu().numpy()  # (P, rows)
        per_class = np.full((sims.shape[0], len(self.class_names)), -np.inf, np.float32)
        np.maximum.at(per_class.T, self.row_class, sims.T)
        return softmax(self.logit_scale * per_class.T.reshape(len(self.class_names), *grid), axis=0)


def build_score_source(kind: str, device: str = "cpu", **options):
    if kind == "oracle":
        return OracleScores(**options)
    if kind == "folder":
        return FolderScores(**options)
    if kind == "torchscript":
        return TorchScriptScores(device=device, **options)
    if kind == "clip":
        return ClipDenseScores(device=device, **options)
    raise ValueError(f"unknown score source {kind!r}; known: clip, folder, torchscript, oracle")


# --- the labeler (what engine workers run) -----------------------------------------------------------------------

class SemanticLabeler:
    """Builds the score source once per process; labels frames. ``source`` (an engine.FrameSource) is needed for
    frame agreement: neighbouring frames are labelled here too (cached), so every frame stays independent."""

    def __init__(self, config: SemanticConfig, source=None, score_source=None) -> None:
        self.config = config
        self.scores = score_source or build_score_source(config.scores, config.device, **config.score_options)
        self.class_names = list(self.scores.class_names)
        self.source = source
        self._poses: dict | None = None
        self._cache: OrderedDict = OrderedDict()
        self.meta = {"config": config.to_dict(), "config_hash": config.config_hash(), "score_source": config.scores}

    save_result = staticmethod(save_semantic)

    def raw(self, frame) -> SemanticLabels:
        """Steps 1-3 and the per-frame filters of one frame (cached by key for its neighbours)."""
        if frame.key in self._cache:
            return self._cache[frame.key]
        if not frame.cameras:
            raise SensorDataError(f"frame {frame.key or frame.stamp_ns}: no camera images to label from")
        maps = {name: self.scores.scores(frame, view) for name, view in frame.cameras.items()}
        out = label_from_scores(frame, maps, self.class_names, self.config.lift, self.config.filter, self.meta)
        self._cache[frame.key] = out
        while len(self._cache) > 2 * self.config.filter.frame_agreement + 2:
            self._cache.popitem(last=False)
        return out

    def label_frame(self, frame) -> SemanticLabels:
        raw = self.raw(frame)
        labels = SemanticLabels(raw.label.copy(), raw.raw_label, raw.confidence, raw.margin, raw.filtered.copy(),
                                raw.in_frustum, dict(raw.meta))
        k = self.config.filter.frame_agreement
        if k > 0:
            self._frame_agreement(frame, labels, k)
        return labels

    def _frame_agreement(self, frame, labels: SemanticLabels, k: int) -> None:
        if self.source is None:
            raise SensorDataError("frame agreement needs the frame source (neighbouring frames)")
        if self._poses is None:
            if self.source.kind != "semantickitti":
                raise SensorDataError(f"frame agreement needs poses; {self.source.kind} sources have none here "
                                      "(SemanticKITTI sequences: poses.txt)")
            self._poses = {}
            for seq in semantickitti_sequences(self.source.path):
                self._poses.update(semantickitti_lidar_poses(seq))
        keys = self.source.keys()
        if frame.key not in self._poses or frame.key not in keys:
            raise SensorDataError(f"frame {frame.key}: no pose")
        i = keys.index(frame.key)
        to_here = np.linalg.inv(self._poses[frame.key])
        neighbours = []
        for j in range(max(0, i - k), min(len(keys), i + k + 1)):
            if j == i or keys[j] not in self._poses or keys[j].rsplit("_", 1)[0] != frame.key.rsplit("_", 1)[0]:
                continue
            other = self.source.load(keys[j])
            raw = self.raw(other)
            neighbours.append((transform(other.points, to_here @ self._poses[keys[j]]), raw.raw_label))
        apply_frame_agreement(labels, frame.points, neighbours, self.config.filter.frame_radius,
                              self.config.filter.frame_min_agree)
        labels.meta["frame_votes_from"] = len(neighbours)


# --- command line (sal-ros pseudolabel --semantic) ---------------------------------------------------------------

def add_arguments(parser) -> None:
    s = parser.add_argument_group("semantic pseudo-labels (--semantic)")
    s.add_argument("--semantic", action="store_true",
                   help="per-point classes from per-pixel class scores instead of instances + CLIP tokens")
    s.add_argument("--scores", choices=["clip", "folder", "torchscript", "oracle"], default="clip",
                   help="clip: dense CLIP (MaskCLIP) vs --vocabulary; folder: precomputed maps (--score-folder); "
                        "torchscript: a local model file (--score-model); oracle: ground truth + --oracle-noise")
    s.add_argument("--vocabulary", help="--scores clip: vocabulary yaml (prompts per class)")
    s.add_argument("--score-folder", help="<folder>/<frame key>/<camera>.npy and classes.txt")
    s.add_argument("--score-logits", action="store_true", help="the folder's maps are logits (softmax applied)")
    s.add_argument("--score-model", help="TorchScript model: (1,3,H,W) RGB in [0,1] -> (1,C,h,w) logits")
    s.add_argument("--oracle-noise", type=float, default=1.0, help="--scores oracle: Gaussian logit noise sigma")
    s.add_argument("--min-score", type=float, default=0.0, help="ignore points whose top class scores below")
    s.add_argument("--min-margin", type=float, default=0.0, help="ignore points whose top-2 margin is below")
    s.add_argument("--camera-agreement", action="store_true", help="ignore points whose cameras disagree")
    s.add_argument("--frame-agreement", type=int, default=0, metavar="K",
                   help="ignore points that the K neighbouring frames each side (aligned by poses) contradict")
    s.add_argument("--frame-radius", type=float, default=0.2, help="metres, a neighbour frame's vote radius")
    s.add_argument("--frame-min-agree", type=float, default=0.5, help="share of votes a point's class needs")


def config_from_args(args, lift: LiftConfig) -> SemanticConfig:
    if args.scores == "clip":
        if not args.vocabulary:
            raise ValueError("--semantic --scores clip needs --vocabulary (the classes to score)")
        if not args.clip_pretrained and not args.random_weights:
            raise ValueError("--scores clip needs --clip-pretrained (or --random-weights for a smoke test)")
        options = {"vocabulary": str(Path(args.vocabulary).resolve()), "clip_model": args.clip_model,
                   "pretrained": args.clip_pretrained}
    elif args.scores == "folder":
        if not args.score_folder:
            raise ValueError("--scores folder needs --score-folder")
        options = {"root": str(Path(args.score_folder).resolve()), "logits": args.score_logits}
    elif args.scores == "torchscript":
        if not args.score_model:
            raise ValueError("--scores torchscript needs --score-model")
        options = {"model": str(Path(args.score_model).resolve())}
    else:
        options = {"noise": args.oracle_noise}
    filt = FilterConfig(args.min_score, args.min_margin, args.camera_agreement, args.frame_agreement,
                        args.frame_radius, args.frame_min_agree)
    return SemanticConfig(scores=args.scores, score_options=options, lift=lift, filter=filt, device=args.device)
