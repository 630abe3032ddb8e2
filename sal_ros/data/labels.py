"""Dataset label sets (read by evaluation, pseudo-labeling, training, the demo): class names, thing/stuff split,
raw-label conversion, min segment size.

Class ids follow the benchmarks' learning maps: 0 = ignore, 1..C = evaluated classes (``class_names[k-1]``).

The panoptic segment id of a ground-truth point is its *whole* raw label, as semantic-kitti-api does
(``label`` uint32 for SemanticKITTI, ``semantic * 1000 + instance`` for nuScenes). For SemanticKITTI this
means road (40) and lane-marking (60), both mapped to "road", are two ground-truth segments; we keep that
so our numbers are comparable with the published ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError

# learning_map of semantic-kitti.yaml (raw id -> 19-class id); read from the yaml when one is given.
_SEMANTICKITTI_LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10,
    48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0,
    252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}
SEMANTICKITTI_CLASSES = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist",
    "road", "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk", "terrain",
    "pole", "traffic-sign",
)
SEMANTICKITTI_THINGS = ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist")

# nuScenes lidarseg: 32 general classes (index = raw id) -> 16 challenge classes, as the devkit maps them.
NUSCENES_CLASSES = (
    "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian", "traffic_cone",
    "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade", "vegetation",
)
NUSCENES_THINGS = NUSCENES_CLASSES[:10]
_NUSCENES_GENERAL_TO_CHALLENGE = {
    "noise": 0, "animal": 0,
    "human.pedestrian.adult": 7, "human.pedestrian.child": 7, "human.pedestrian.construction_worker": 7,
    "human.pedestrian.personal_mobility": 0, "human.pedestrian.police_officer": 7,
    "human.pedestrian.stroller": 0, "human.pedestrian.wheelchair": 0,
    "movable_object.barrier": 1, "movable_object.debris": 0, "movable_object.pushable_pullable": 0,
    "movable_object.trafficcone": 8, "static_object.bicycle_rack": 0, "vehicle.bicycle": 2,
    "vehicle.bus.bendy": 3, "vehicle.bus.rigid": 3, "vehicle.car": 4, "vehicle.construction": 5,
    "vehicle.emergency.ambulance": 0, "vehicle.emergency.police": 0, "vehicle.motorcycle": 6,
    "vehicle.trailer": 9, "vehicle.truck": 10, "flat.driveable_surface": 11, "flat.other": 12,
    "flat.sidewalk": 13, "flat.terrain": 14, "static.manmade": 15, "static.other": 0,
    "static.vegetation": 16, "vehicle.ego": 0,
}


@dataclass(frozen=True)
class LabelSet:
    """What a benchmark evaluates: ``lut`` maps a raw semantic id to class 0..C (0 = ignore)."""

    name: str
    class_names: tuple[str, ...]
    things: frozenset[int]  # class ids (1-based) that have instances
    lut: np.ndarray  # (max_raw + 1,) int64
    min_points: int  # unmatched segments smaller than this are not counted (FP / FN)
    encoding: str  # "kitti": sem = l & 0xFFFF, whole label is the segment; "nuscenes": sem = l // 1000

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def thing_mask(self) -> np.ndarray:
        """(C + 1,) bool indexed by class id."""
        mask = np.zeros(self.num_classes + 1, bool)
        mask[list(self.things)] = True
        return mask

    def class_id(self, name: str) -> int:
        key = normalize_name(name)
        for k, cname in enumerate(self.class_names, start=1):
            if normalize_name(cname) == key:
                return k
        raise KeyError(f"{self.name} has no class {name!r}; classes: {', '.join(self.class_names)}")

    def split(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw per-point labels -> (class id (N,) int64, segment id (N,) int64) as the benchmark sees them."""
        raw = np.asarray(raw)
        if raw.ndim != 1:
            raise SensorDataError(f"{self.name} labels must be one per point, got shape {raw.shape}")
        raw = raw.astype(np.int64)
        sem_raw = raw & 0xFFFF if self.encoding == "kitti" else raw // 1000
        if sem_raw.size and (sem_raw.min() < 0 or sem_raw.max() >= self.lut.size):
            raise SensorDataError(f"{self.name} labels hold unknown semantic ids (range {sem_raw.min()}..{sem_raw.max()})")
        return self.lut[sem_raw], raw


def normalize_name(name: str) -> str:
    """'Other-Vehicle', 'other vehicle' and 'other_vehicle' name the same class."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _make_lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(mapping) + 1, np.int64)
    for raw, cls in mapping.items():
        lut[int(raw)] = int(cls)
    return lut


def _ids(class_names: tuple[str, ...], names: tuple[str, ...]) -> frozenset[int]:
    return frozenset(class_names.index(n) + 1 for n in names)


def semantickitti(config_yaml: str | Path | None = None, min_points: int = 50) -> LabelSet:
    """SemanticKITTI 19 classes; ``config_yaml`` (semantic-kitti.yaml) overrides the built-in learning_map."""
    mapping, names = _SEMANTICKITTI_LEARNING_MAP, SEMANTICKITTI_CLASSES
    if config_yaml is not None:
        from sal_ros.core.yamlfile import load_yaml

        cfg = load_yaml(config_yaml, "label config")
        try:
            mapping = {int(k): int(v) for k, v in cfg["learning_map"].items()}
            inv = {int(k): int(v) for k, v in cfg["learning_map_inv"].items()}
            names = tuple(cfg["labels"][inv[k]] for k in sorted(inv) if k != 0)
        except (KeyError, TypeError) as exc:
            raise SensorDataError(f"{config_yaml}: not a SemanticKITTI label config ({exc})") from exc
    return LabelSet("semantickitti", names, _ids(names, SEMANTICKITTI_THINGS), _make_lut(mapping), min_points, "kitti")


def nuscenes(min_points: int = 15) -> LabelSet:
    """nuScenes lidarseg / panoptic, 16 challenge classes; raw ids are the 32 general lidarseg classes."""
    general = list(_NUSCENES_GENERAL_TO_CHALLENGE)
    lut = _make_lut({i: _NUSCENES_GENERAL_TO_CHALLENGE[n] for i, n in enumerate(general)})
    return LabelSet("nuscenes", NUSCENES_CLASSES, _ids(NUSCENES_CLASSES, NUSCENES_THINGS), lut, min_points, "nuscenes")


LABEL_SETS = {"semantickitti": semantickitti, "nuscenes": nuscenes}


def get_label_set(name: str, **kwargs) -> LabelSet:
    try:
        return LABEL_SETS[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None


def vocabulary_lut(vocab_class_names: tuple[str, ...] | list[str], label_set: LabelSet,
                   mapping: dict[str, str] | None = None) -> np.ndarray:
    """Segmentation label (0..K, k = vocabulary class k-1) -> dataset class id (0 = counts as a miss).

    ``mapping`` names the dataset class of each vocabulary class ("sedan" -> "car"); classes it does not
    name are matched by normalized name; a vocabulary class with no dataset class maps to 0 (its points
    count as false negatives of their true class, never as a correct prediction).
    """
    mapping = {normalize_name(k): v for k, v in (mapping or {}).items()}
    lut = np.zeros(len(vocab_class_names) + 1, np.int64)
    for k, name in enumerate(vocab_class_names, start=1):
        target = mapping.get(normalize_name(name), name)
        if target is None or target == "":
            continue
        try:
            lut[k] = label_set.class_id(target)
        except KeyError:
            if normalize_name(name) in mapping:  # an explicit mapping to a missing class is a config error
                raise
    return lut
