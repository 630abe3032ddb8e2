"""Augmentation-based consolidation (LOSC): a 2D mask source run on K augmented copies of each image (horizontal
flip, scale, crop), its masks mapped back onto the original pixels, and the runs' answers voted.

The first run is the plain image; its masks are the candidates (the augmented runs only vote: a mask seen in a
single augmented copy has no majority anyway). Per augmented run, a candidate's match is the run's mask with the
highest IoU over the pixels that run saw, when above ``match_iou`` (> 0.5 makes it unique). A candidate is kept
when a strict majority of the runs that saw it (most of its pixels inside their crop) agree, ``votes > min_votes *
seen``; each pixel then takes the label most of the runs that saw it give it (again a strict majority, else none).
Score: the first run's score times the candidate's vote share.

Sources that do not read the image pixels cannot vary under image augmentation (lidar-prompted sources with
``generate_for_view``, the ground-truth oracle with ``generate_for_frame`` or in ``eval pseudolabels``): the
wrapper is not applied to them (a no-op).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sal_ros.pseudolabel.masks import Masks, as_rgb, flatten_masks, label_image, mask_source_identity


@dataclass
class AugmentConfig:
    k: int = 0  # runs per image, the plain one included; 0 or 1 = off
    flip: bool = True  # every second augmented run is mirrored left-right
    scale: tuple[float, float] = (0.75, 1.25)  # uniform scale factor of an augmented run
    crop: float = 0.85  # side of the crop as a share of the image side (1 = no crop), at a random place
    min_votes: float = 0.5  # a mask / a pixel needs more than this share of the runs that saw it
    match_iou: float = 0.5  # a run's mask answers a candidate above this IoU
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.k > 1

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)


@dataclass(frozen=True)
class Augmentation:
    """A crop (rows r0:r1, cols c0:c1 of the original), then an optional mirror, then a resize to ``out_hw``."""

    r0: int
    r1: int
    c0: int
    c1: int
    flip: bool
    out_hw: tuple[int, int]

    def source_index(self) -> tuple[np.ndarray, np.ndarray]:
        """For every augmented pixel, the original row / column it samples (nearest)."""
        h, w = self.out_hw
        rows = self.r0 + np.minimum(((np.arange(h) + 0.5) * (self.r1 - self.r0) / h).astype(np.int64),
                                    self.r1 - self.r0 - 1)
        cols = self.c0 + np.minimum(((np.arange(w) + 0.5) * (self.c1 - self.c0) / w).astype(np.int64),
                                    self.c1 - self.c0 - 1)
        return rows, cols[::-1] if self.flip else cols

    def target_index(self) -> tuple[np.ndarray, np.ndarray]:
        """For every original pixel of the crop, the augmented row / column that covers it (nearest)."""
        h, w = self.out_hw
        rows = np.minimum(((np.arange(self.r1 - self.r0) + 0.5) * h / (self.r1 - self.r0)).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(self.c1 - self.c0) + 0.5) * w / (self.c1 - self.c0)).astype(np.int64), w - 1)
        return rows, (w - 1 - cols) if self.flip else cols

    def apply(self, image: np.ndarray) -> np.ndarray:
        rows, cols = self.source_index()
        return np.ascontiguousarray(image[rows[:, None], cols[None, :]])

    def invert_labels(self, labels: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """An augmented (h, w) label image -> (labels, seen) on the original pixels; -1 / False outside the crop."""
        out = np.full(shape, -1, labels.dtype)
        seen = np.zeros(shape, bool)
        rows, cols = self.target_index()
        out[self.r0:self.r1, self.c0:self.c1] = labels[rows[:, None], cols[None, :]]
        seen[self.r0:self.r1, self.c0:self.c1] = True
        return out, seen


def augmentations(config: AugmentConfig, height: int, width: int) -> list[Augmentation]:
    """The K runs for an image of this size: the plain image first; the same list for every image of a run."""
    rng = np.random.default_rng(config.seed)
    out = [Augmentation(0, height, 0, width, False, (height, width))]
    for i in range(1, config.k):
        ch, cw = max(1, round(height * config.crop)), max(1, round(width * config.crop))
        r0, c0 = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
        s = float(rng.uniform(*config.scale))
        out.append(Augmentation(r0, r0 + ch, c0, c0 + cw, config.flip and i % 2 == 1,
                                (max(8, round(ch * s)), max(8, round(cw * s)))))
    return out


def vote(candidates: np.ndarray, runs: list[tuple[np.ndarray, np.ndarray]], scores: np.ndarray,
         config: AugmentConfig) -> Masks:
    """Candidates (H, W) label image of the plain run (-1 none), ``runs`` (labels, seen) of the augmented runs on
    the original pixels, ``scores`` per candidate -> the voted masks (disjoint)."""
    h, w = candidates.shape
    m = int(scores.size)
    votes, seen_by = np.ones(m, np.int64), np.ones(m, np.int64)
    mapped = [candidates]  # each run's labels renamed to the candidate they answer (-1: none)
    seen_px = [np.ones((h, w), bool)]
    area = np.bincount(candidates[candidates >= 0], minlength=m)
    for labels, seen in runs:
        lut = _answers(candidates, labels, seen, m, config.match_iou)
        inside = np.bincount(candidates[seen & (candidates >= 0)], minlength=m)
        saw = inside * 2 > area
        seen_by += saw
        votes += saw & (lut_inverse(lut, m) >= 0)
        mapped.append(np.where(labels >= 0, lut[labels.clip(min=0)], -1) if lut.size else np.full((h, w), -1))
        seen_px.append(seen)
    kept = votes > config.min_votes * seen_by
    final = _pixel_majority(np.stack(mapped), np.stack(seen_px), config.min_votes)
    final = np.where(final >= 0, np.where(kept[final.clip(min=0)], final, -1), -1)
    ids = np.flatnonzero(kept & (np.bincount(final[final >= 0], minlength=m) > 0))
    if ids.size == 0:
        return Masks.empty(h, w)
    return Masks(final[None] == ids[:, None, None], scores[ids] * votes[ids] / seen_by[ids])


def _answers(candidates: np.ndarray, labels: np.ndarray, seen: np.ndarray, m: int, match_iou: float) -> np.ndarray:
    """(R,) for each of the run's labels the candidate it answers (IoU over the pixels the run saw), -1 none."""
    r = int(labels.max(initial=-1)) + 1
    if r == 0 or m == 0:
        return np.full(r, -1, np.int64)
    a, b = candidates[seen], labels[seen]
    both = (a >= 0) & (b >= 0)
    inter = np.bincount(a[both] * r + b[both], minlength=m * r).reshape(m, r)
    area_a, area_b = np.bincount(a[a >= 0], minlength=m), np.bincount(b[b >= 0], minlength=r)
    iou = inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1)
    best = iou.argmax(0)
    return np.where(iou[best, np.arange(r)] > match_iou, best, -1)


def lut_inverse(lut: np.ndarray, m: int) -> np.ndarray:
    """(m,) for each candidate the run label that answers it, -1 none (IoU > 0.5 makes it unique)."""
    inv = np.full(m, -1, np.int64)
    hit = lut >= 0
    inv[lut[hit]] = np.flatnonzero(hit)
    return inv


def _pixel_majority(mapped: np.ndarray, seen: np.ndarray, min_votes: float) -> np.ndarray:
    """(K, H, W) candidate per run and pixel -> (H, W) the candidate more than ``min_votes`` of the runs that saw
    the pixel give it, -1 none ("none" is a vote too)."""
    k = mapped.shape[0]
    flat = np.where(seen, mapped, -2).reshape(k, -1)  # -2: the run did not see the pixel
    flat.sort(axis=0)
    n_seen = seen.reshape(k, -1).sum(0)
    best, best_count = np.full(flat.shape[1], -1, flat.dtype), np.zeros(flat.shape[1], np.int64)
    run = np.ones(flat.shape[1], np.int64)
    for i in range(1, k + 1):  # run lengths of equal values along the sorted axis
        ends = np.ones(flat.shape[1], bool) if i == k else flat[i] != flat[i - 1]
        better = ends & (flat[i - 1] >= 0) & (run > best_count)
        best[better], best_count[better] = flat[i - 1][better], run[better]
        run = np.where(ends, 1, run + 1)
    return np.where(best_count > min_votes * n_seen, best, -1).reshape(mapped.shape[1:])


class AugmentedMasks:
    """A mask source voted over K augmented copies of each image (a ``MaskSource`` itself)."""

    def __init__(self, source, config: AugmentConfig, flatten_overlap: float = 0.8) -> None:
        self.source, self.config, self.flatten_overlap = source, config, flatten_overlap
        self.name = source.name
        self.identity = {**mask_source_identity(source), "augment": config.to_dict()}

    def generate(self, image: np.ndarray) -> Masks:
        rgb = as_rgb(image)
        h, w = rgb.shape[:2]
        augs = augmentations(self.config, h, w)
        first = flatten_masks(self.source.generate(rgb), self.flatten_overlap)
        runs = []
        for aug in augs[1:]:
            masks = flatten_masks(self.source.generate(aug.apply(rgb)), self.flatten_overlap)
            runs.append(aug.invert_labels(label_image(masks), (h, w)))
        return vote(label_image(first), runs, first.scores, self.config)


def augmented(source, config: AugmentConfig | None, flatten_overlap: float = 0.8):
    """``source`` voted over augmentations when ``config`` asks for it and the source reads the image; else itself."""
    reads_more = any(hasattr(source, a) for a in ("generate_for_view", "generate_for_frame"))  # points, truth
    if config is None or not config.enabled or reads_more:
        return source
    return AugmentedMasks(source, config, flatten_overlap)


# --- command line (sal-ros pseudolabel, sal-ros eval pseudolabels) -------------------------------------------

def add_arguments(group) -> None:
    group.add_argument("--augment", type=int, default=0, metavar="K",
                       help="vote the masks over K runs of the source per image: the image and K-1 flipped / scaled "
                            "/ cropped copies, masks mapped back (augmentation.py); 0 = off; no-op for sources "
                            "that do not read the image (geometric, sam2_lidar)")
    group.add_argument("--augment-crop", type=float, default=0.85, help="crop side as a share of the image side")
    group.add_argument("--augment-scale", type=float, nargs=2, default=(0.75, 1.25), metavar=("MIN", "MAX"))


def options_from_args(args) -> dict:
    """The AugmentConfig dict of ``--augment*`` ({} = off)."""
    if args.augment < 0:
        raise ValueError(f"--augment must be >= 0, got {args.augment}")
    if not args.augment:
        return {}
    return AugmentConfig(k=args.augment, crop=args.augment_crop, scale=tuple(args.augment_scale)).to_dict()
