"""Semantic pseudo-labels: per-pixel class scores of a 2D model -> per-point classes with confidence and filtering.

The indoor study of the ScaLR line (valeo.ai: 2D semantic predictions of OneFormer or DINOv2 on indoor lidar, a
WaffleIron trained on them; docs/training.md, section 4) projects 2D semantic predictions onto lidar points and keeps
only confident ones. Per frame (``SemanticLabeler.label_frame``):

1. per camera: class probabilities (C, h, w) from a score source (any resolution; read at each point's pixel);
2. per camera: the engine's projection and occlusion test (``lifting.point_pixels``): occluded points get nothing;
3. fuse cameras: mean of the probabilities of the cameras that see a point; each camera's top class is kept for
   the agreement test;
4. filter (``FilterConfig``): top-1 probability, margin between the top two, agreement across cameras, agreement
   with neighbouring frames aligned by their poses; a filtered point keeps its raw class in ``raw_label`` but
   gets label 0 (ignore) and a bit in ``filtered`` saying why.

Score sources (``sal_ros.pseudolabel.score_sources``): ``clip``, ``folder``, ``torchscript`` and ``oracle``.

Files: one ``<key>.npz`` per frame (``sal_ros.data.pseudolabels``: ``save_semantic`` / ``load_semantic``), written
atomically, with the run's ``config_hash`` so that a resumed run skips finished frames and refuses files of another
configuration.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.transforms import transform_points
from sal_ros.data.datasets import semantickitti_poses
from sal_ros.data.pseudolabels import (CAMERA_DISAGREE, FRAME_DISAGREE, LOW_MARGIN, LOW_SCORE, SemanticLabels,
                                       load_semantic, save_semantic)
from sal_ros.pseudolabel.lifting import LiftConfig, point_pixels
from sal_ros.pseudolabel.score_sources import build_score_source


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
            self._poses = semantickitti_poses(self.source.path)
            if not self._poses:
                raise SensorDataError(f"{self.source.path}: frame agreement needs poses (poses.txt of a SemanticKITTI "
                                      "sequence)")
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
            neighbours.append((transform_points(to_here @ self._poses[keys[j]], other.points), raw.raw_label))
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
