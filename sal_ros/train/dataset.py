"""Training samples from lidar frames and their pseudo-labels, with SAL's partial-label handling.

Pseudo-labels only exist where cameras see (~14 % of a SemanticKITTI scan). Training on the whole scan teaches
the model that everything outside the cameras is "no object", so (SAL, class-agnostic PQ 22.2 -> 62.8):

- ``crop``: keep only points inside the labeled camera frustums (``PseudoLabels.in_frustum``);
- FrankenFrustum: rotate several frustum crops (from different scans) about z to different azimuths and
  concatenate them into a 360-degree-like cloud, so the model sees full-circle geometry;
- scan mixing: overlay a second, independently augmented sample (Mix3D style; SAL does not publish its exact
  form, this is our choice).

Every sample is a pure function of (seed, epoch, index): the same run gives the same batches, whatever the
number of workers or DDP ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sal_ros.core.camera import in_camera_frustum
from sal_ros.core.errors import SensorDataError
from sal_ros.core.settings import known_settings
from sal_ros.pseudolabel.oracle import class_text_tokens, oracle_tokens
from sal_ros.train.augment import AugmentConfig, augment, azimuth_center, rotate_z


@dataclass
class LabeledScan:
    """One frame with pseudo-labels: ``instance`` 0 = unlabeled, i >= 1 uses ``tokens[i - 1]``."""

    key: str
    points: np.ndarray  # (N, 3) float32
    intensity: np.ndarray  # (N,) float32
    instance: np.ndarray  # (N,) int64
    tokens: np.ndarray  # (K, D) float32
    in_frustum: np.ndarray  # (N,) bool

    def __post_init__(self) -> None:
        n = len(self.points)
        for name in ("intensity", "instance", "in_frustum"):
            if len(getattr(self, name)) != n:
                raise SensorDataError(f"scan {self.key}: {name} has {len(getattr(self, name))} entries for {n} points")
        if len(self.instance) and self.instance.max(initial=0) > len(self.tokens):
            raise SensorDataError(f"scan {self.key}: instance id {self.instance.max()} but only {len(self.tokens)} tokens")


def scan_from_pseudolabels(frame, labels) -> LabeledScan:
    """A Frame (sal_ros.core.types) and its PseudoLabels (sal_ros.data.pseudolabels) -> LabeledScan."""
    if len(labels.instance) != frame.num_points:
        raise SensorDataError(f"pseudo-labels of {frame.key} have {len(labels.instance)} points, frame has "
                              f"{frame.num_points}")
    intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
    in_frustum = labels.in_frustum if labels.in_frustum is not None else np.ones(frame.num_points, bool)
    return LabeledScan(frame.key, frame.points, np.asarray(intensity, np.float32),
                       np.asarray(labels.instance, np.int64), np.asarray(labels.tokens, np.float32),
                       np.asarray(in_frustum, bool))


@dataclass
class Sample:
    """What the trainer consumes: points with compact instance ids 1..K and one token per instance."""

    points: np.ndarray  # (N, 3) float32
    intensity: np.ndarray  # (N,) float32
    instance: np.ndarray  # (N,) int64, 0 = no pseudo-label
    tokens: np.ndarray  # (K, D) float32
    keys: tuple[str, ...] = ()

    @property
    def num_instances(self) -> int:
        return len(self.tokens)

    def masks(self) -> np.ndarray:
        """(K, N) bool target masks."""
        return self.instance[None, :] == np.arange(1, self.num_instances + 1)[:, None]


@dataclass
class DataConfig:
    crop: bool = True  # drop points outside the labeled frustums
    franken_frustum: int = 4  # crops per FrankenFrustum sample (1 = off)
    franken_prob: float = 1.0
    mix_prob: float = 0.0  # scan mixing probability
    min_instance_points: int = 5  # smaller pseudo-instances are dropped (their points become unlabeled)
    max_points: int = 0  # random subsample above this (0 = keep all)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataConfig":
        d = known_settings(cls, d, "data")
        d["augment"] = AugmentConfig.from_dict(d.get("augment"))
        return cls(**d)


def _part(scan: LabeledScan, crop: bool) -> Sample:
    keep = scan.in_frustum if crop else np.ones(len(scan.points), bool)
    return Sample(scan.points[keep], scan.intensity[keep], scan.instance[keep], scan.tokens, (scan.key,))


def concat(parts: list[Sample]) -> Sample:
    """Concatenate samples, offsetting instance ids so they stay unique."""
    offset, inst = 0, []
    for p in parts:
        inst.append(np.where(p.instance > 0, p.instance + offset, 0))
        offset += p.num_instances
    return Sample(np.concatenate([p.points for p in parts]), np.concatenate([p.intensity for p in parts]),
                  np.concatenate(inst), np.concatenate([p.tokens for p in parts]),
                  tuple(k for p in parts for k in p.keys))


def compact(sample: Sample, min_points: int) -> Sample:
    """Renumber the instances present (with at least ``min_points`` points) to 1..K, drop the other tokens."""
    counts = np.bincount(sample.instance, minlength=sample.num_instances + 1)
    keep = np.flatnonzero(counts >= max(min_points, 1))
    keep = keep[keep > 0]
    remap = np.zeros(sample.num_instances + 1, np.int64)
    remap[keep] = np.arange(1, len(keep) + 1)
    tokens = sample.tokens[keep - 1] if len(keep) else np.zeros((0, sample.tokens.shape[1]), np.float32)
    return Sample(sample.points, sample.intensity, remap[sample.instance], tokens, sample.keys)


class DistillDataset:
    """Map-style dataset (works with torch DataLoader and DistributedSampler) of augmented training samples."""

    def __init__(self, scans: list[LabeledScan], cfg: DataConfig | None = None, seed: int = 0) -> None:
        if not scans:
            raise ValueError("no training scans")
        dims = {s.tokens.shape[1] for s in scans if len(s.tokens)}
        if len(dims) > 1:
            raise SensorDataError(f"pseudo-label token dimensions differ between scans: {sorted(dims)}")
        self.scans = scans
        self.cfg = cfg or DataConfig()
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.scans)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


    def _franken(self, index: int, rng: np.random.Generator) -> Sample:
        cfg = self.cfg
        k = cfg.franken_frustum if (cfg.crop and cfg.franken_frustum > 1 and rng.random() < cfg.franken_prob) else 1
        picks = [index] + list(rng.integers(0, len(self.scans), k - 1))
        start = rng.uniform(-np.pi, np.pi)
        parts = []
        for slot, i in enumerate(picks):
            part = _part(self.scans[i], cfg.crop)
            if k > 1:  # turn this crop to its slot of the circle
                part.points = rotate_z(part.points, start + 2 * np.pi * slot / k - azimuth_center(part.points))
            parts.append(part)
        return concat(parts)

    def _augmented(self, index: int, rng: np.random.Generator) -> Sample:
        sample = self._franken(index, rng)
        sample.points = augment(sample.points, self.cfg.augment, rng)
        return sample

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int = 0) -> Sample:
        """The training sample for (seed, epoch, index): the same every time it is asked for."""
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = self._augmented(index, rng)
        if self.cfg.mix_prob > 0 and rng.random() < self.cfg.mix_prob:
            sample = concat([sample, self._augmented(int(rng.integers(len(self.scans))), rng)])
        if self.cfg.max_points and len(sample.points) > self.cfg.max_points:
            keep = np.sort(rng.choice(len(sample.points), self.cfg.max_points, replace=False))
            sample = Sample(sample.points[keep], sample.intensity[keep], sample.instance[keep], sample.tokens,
                            sample.keys)
        return compact(sample, self.cfg.min_instance_points)


def collate(samples: list[Sample]) -> list[Sample]:
    """Batches stay lists of samples: point counts differ and the sparse model takes a list of clouds."""
    return list(samples)


# ---------------------------------------------------------------------------------------------- sources
def ground_truth_scan(frame, label_set, class_tokens: np.ndarray, in_frustum: np.ndarray | None = None) -> LabeledScan:
    """Oracle pseudo-labels from ground truth, restricted to the camera frustum (as real pseudo-labels are).

    Each thing instance and each stuff class present becomes one pseudo-instance; its token is
    ``class_tokens[class_id - 1]`` (e.g. the CLIP text embedding of the class name), so a student trained on
    these learns the zero-shot path end to end. Ignore-class points stay unlabeled.
    """
    if frame.gt_labels is None:
        raise SensorDataError(f"frame {frame.key} has no ground-truth labels")
    sem, seg = label_set.split(frame.gt_labels)
    inside = in_camera_frustum(frame) if in_frustum is None else np.asarray(in_frustum, bool)
    # things: one instance per ground-truth segment; stuff: one per class (lane-marking joins road)
    key = np.where(label_set.thing_mask[sem], sem * (1 << 32) + seg, sem * (1 << 32))
    labelled = inside & (sem > 0)
    uniq, inverse = np.unique(key[labelled], return_inverse=True)
    instance = np.zeros(frame.num_points, np.int64)
    instance[labelled] = inverse.reshape(-1) + 1
    tokens = np.asarray(class_tokens, np.float32)[uniq // (1 << 32) - 1]
    intensity = frame.intensity if frame.intensity is not None else np.zeros(frame.num_points, np.float32)
    return LabeledScan(frame.key, frame.points, np.asarray(intensity, np.float32), instance, tokens, inside)


def load_scans(sources: list[dict], base: str | Path = ".", text_encoder: dict | None = None,
               seed: int = 0) -> list[LabeledScan]:
    """Training scans from config ``sources`` entries (paths relative to ``base``, the config's folder):

    - ``{frames: <dataset folder | FrameStore | rosbag2>, pseudolabels: <dir of <key>.npz>}``: engine output;
      with ``oracle_tokens: semantickitti`` each pseudo-instance's token is instead the text embedding of the
      class the ground truth says it mostly covers (``token_noise``: norm of added Gaussian noise; sal_ros.
      pseudolabel.oracle), for zero-shot classification given ideal CLIP tokens;
    - ``{frames: ..., oracle: semantickitti}``: ground truth as labels (``ground_truth_scan``), the supervised
      reference: ``region: frustum`` (default) labels the camera-frustum points as pseudo-labels would,
      ``region: full`` the whole scan; tokens from the text encoder ``text_encoder`` ({"model": open_clip name,
      "pretrained": tag}; the run's, recorded in its checkpoints).

    ``select`` (``00,05:0-4``) picks sequences and scans of a dataset with sequences.
    """
    from sal_ros.data.labels import get_label_set
    from sal_ros.data.pseudolabels import load_pseudolabels, pseudolabel_path
    from sal_ros.data.sources import iter_source_frames

    scans: list[LabeledScan] = []
    for src in sources:
        frames_path = Path(base) / src["frames"]
        frames = list(iter_source_frames(frames_path, src.get("bag_config"), select=src.get("select")))
        encoder = src.get("text_encoder") or text_encoder or {}
        if src.get("oracle"):
            label_set = get_label_set(src["oracle"])
            tokens = class_text_tokens(label_set.class_names, encoder)
            region = src.get("region", "frustum")
            if region not in ("frustum", "full"):
                raise ValueError(f"source region {region!r}: frustum or full")
            scans += [ground_truth_scan(f, label_set, tokens, np.ones(f.num_points, bool) if region == "full" else None)
                      for f in frames]
            continue
        pl_dir = Path(base) / src["pseudolabels"]
        oracle = get_label_set(src["oracle_tokens"]) if src.get("oracle_tokens") else None
        class_tokens = class_text_tokens(oracle.class_names, encoder) if oracle is not None else None
        for frame in frames:
            path = pseudolabel_path(pl_dir, frame.key)
            if not path.exists():
                continue  # frames without pseudo-labels (e.g. no camera match) are not trained on
            scan = scan_from_pseudolabels(frame, load_pseudolabels(path, frame.num_points))
            if oracle is not None:
                if frame.gt_labels is None:
                    raise SensorDataError(f"oracle_tokens: frame {frame.key} has no ground-truth labels")
                instance, tokens = oracle_tokens(frame.key, scan.instance, frame.gt_labels, oracle, class_tokens,
                                                 float(src.get("token_noise", 0.0)), seed)
                scan = replace(scan, instance=instance, tokens=tokens)
            scans.append(scan)
    if not scans:
        raise SensorDataError(f"no training scans found in {[s.get('frames') for s in sources]}")
    return scans
