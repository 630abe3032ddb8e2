"""Time-based consolidation of semantic pseudo-labels (LOSC's first step, issue 22): the scans of a window
t-k .. t+k registered by their poses vote per voxel, and the vote is written back to scan t.

Per scan t of a sequence:

1. every scan j of the window (same sequence, with a pose) is moved into the world frame; each of its points
   with a pseudo-label of a *static* class casts a vote of weight ``confidence`` for its class in its voxel
   (``voxel`` metres). Classes that can move (``moving_classes``: cars, people, ...) never vote, so a parked car
   is not smeared over the road where a driving one was;
2. a point of t takes its voxel's top class when the voxel holds votes of at least ``min_frames`` scans (a moving
   object's points find no support in the other scans: they are left alone) and that class holds at least
   ``min_agree`` of the voxel's votes (disagreeing votes: left alone);
3. points whose own label is a moving class are left alone; points no camera saw in scan t (no label) take the
   voxel's class too when ``fill`` is on (the window's other scans saw them).

What is written back is a SemanticLabels of scan t: ``label``/``raw_label`` the consolidated class where step 2
decided, the scan's own label elsewhere; ``meta["consolidated"]`` counts the points changed and filled. Off by
default (``ConsolidationConfig.enabled``) until the numbers say otherwise (docs/training.md).

Instances (``associate_instances``): the instance pseudo-labels of a sequence's scans, registered the same way,
are linked where two instances of scans at most ``window`` apart overlap (IoU of their occupied voxels of
``instance_voxel`` metres >= ``instance_iou``, each the other's best match between the two scans); linked
instances form a tracklet with one id (``meta["track_ids"]``, per instance row) and one token, the normalized
mean of its per-scan tokens (SAL-4D's tracklet token). Masks are unchanged.

Files: ``consolidate_folder`` reads one ``<key>.npz`` per scan (``semantic.save_semantic``), writes one per scan
into another folder with the configuration's hash, and skips scans already done with the same configuration
(resumable; another configuration's files are an error, as for pseudo-labeling).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sal_ros.core.transforms import transform_points
from sal_ros.data.pseudolabels import SemanticLabels
from sal_ros.eval.tracking import sequence_of

THINGS = ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist")


@dataclass(frozen=True)
class ConsolidationConfig:
    enabled: bool = False
    window: int = 2  # scans each side of t that vote
    voxel: float = 0.2  # metres, edge of a voting cell in the world frame
    min_frames: int = 2  # scans that must vote in a voxel (1 would let a moving object's own scan decide)
    min_agree: float = 0.6  # share of a voxel's votes its top class needs
    fill: bool = True  # points no camera saw in scan t take their voxel's class
    moving_classes: tuple[str, ...] = THINGS  # classes that never vote nor get overwritten
    instance_voxel: float = 0.3  # metres, cells whose overlap links instances of two scans
    instance_iou: float = 0.2  # voxel IoU two instances need to be one object

    def __post_init__(self) -> None:
        if self.window < 1 or not self.voxel > 0 or self.min_frames < 1 or not 0.0 < self.min_agree <= 1.0:
            raise ValueError(f"consolidation: window >= 1, voxel > 0, min_frames >= 1, min_agree in (0, 1]; got "
                             f"{self.window}, {self.voxel}, {self.min_frames}, {self.min_agree}")

    def config_hash(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "enabled"}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


def voxel_ids(points: np.ndarray, voxel: float) -> np.ndarray:
    """One int64 per point naming its voxel (21 bits per axis: +-200 km at 0.2 m)."""
    cell = np.floor(np.asarray(points, np.float64) / voxel).astype(np.int64) + (1 << 20)
    return (cell[:, 0] << 42) | (cell[:, 1] << 21) | cell[:, 2]


@dataclass
class Consolidated:
    labels: SemanticLabels  # what is written back
    decided: np.ndarray  # (N,) bool, the points whose label the window's vote set


def consolidate_scan(t: int, scans: list[tuple[np.ndarray, np.ndarray, SemanticLabels]],
                     config: ConsolidationConfig) -> Consolidated:
    """Scan ``t`` of ``scans`` ((points, 4x4 pose to the world, labels) of one sequence in time order), its
    labels consolidated over the window (module docstring)."""
    points_t, pose_t, own = scans[t]
    names = own.class_names
    moving = np.zeros(len(names) + 1, bool)
    moving[[i + 1 for i, n in enumerate(names) if n in config.moving_classes]] = True
    size = len(names) + 1
    keys, cls, weight, scan = [], [], [], []
    window = range(max(0, t - config.window), min(len(scans), t + config.window + 1))
    for j in window:
        pts, pose, lab = scans[j]
        votes = (lab.raw_label > 0) & ~moving[lab.raw_label]
        keys.append(voxel_ids(transform_points(pose, pts[votes]), config.voxel))
        cls.append(lab.raw_label[votes].astype(np.int64))
        weight.append(lab.confidence[votes].astype(np.float64))
        scan.append(np.full(int(votes.sum()), j, np.int64))
    voxels, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    inverse = inverse.reshape(-1)
    tally = np.bincount(inverse * size + np.concatenate(cls), weights=np.concatenate(weight),
                        minlength=len(voxels) * size).reshape(len(voxels), size)
    pairs = np.unique(inverse * len(scans) + np.concatenate(scan))
    frames = np.bincount(pairs // len(scans), minlength=len(voxels))
    # scan t's points in the voting voxels
    mine = voxel_ids(transform_points(pose_t, points_t), config.voxel)
    at = np.minimum(np.searchsorted(voxels, mine), max(len(voxels) - 1, 0))
    found = (voxels[at] == mine) if len(voxels) else np.zeros(len(mine), bool)
    top = tally.argmax(1) if len(voxels) else np.zeros(0, np.int64)
    total = tally.sum(1)
    share = np.where(total > 0, tally[np.arange(len(voxels)), top] / np.maximum(total, 1e-12), 0.0)
    decided = found & (frames[at] >= config.min_frames) & (share[at] >= config.min_agree) if len(voxels) else found
    decided &= ~moving[own.raw_label]
    if not config.fill:
        decided &= own.raw_label > 0
    new = np.where(decided, top[at] if len(voxels) else 0, own.raw_label).astype(np.uint16)
    label = np.where(decided, new, own.label).astype(np.uint16)
    changed = int((decided & (own.raw_label > 0) & (new != own.raw_label)).sum())
    filled = int((decided & (own.raw_label == 0)).sum())
    meta = {**own.meta, "consolidation": {**asdict(config), "scans": [int(j) for j in window]},
            "consolidation_hash": config.config_hash(),
            "consolidated": {"decided": int(decided.sum()), "changed": changed, "filled": filled}}
    filtered = np.where(decided, 0, own.filtered).astype(np.uint8)
    confidence = np.where(decided, share[at] if len(voxels) else 0, own.confidence)
    return Consolidated(SemanticLabels(label, new, confidence, own.margin, filtered, own.in_frustum, meta), decided)


def consolidate_sequence(keys: list[str], load_frame, load_labels, poses: dict,
                         config: ConsolidationConfig) -> dict[str, Consolidated]:
    """Every scan of ``keys`` (time order; several sequences allowed, each consolidated on its own) with a pose.
    ``load_frame(key)`` gives the frame (points), ``load_labels(key, n_points)`` its SemanticLabels."""
    return _per_sequence(keys, load_frame, load_labels, poses,
                         lambda scans: [consolidate_scan(t, scans, config) for t in range(len(scans))])


def _per_sequence(keys: list[str], load_frame, load_labels, poses: dict, consolidate) -> dict:
    """{key: result} of ``consolidate(scans)`` run on each sequence's posed scans ((points, pose, labels))."""
    out = {}
    by_seq: dict[str, list[str]] = {}
    for key in keys:
        by_seq.setdefault(sequence_of(key), []).append(key)
    for seq_keys in by_seq.values():
        posed = [k for k in seq_keys if k in poses]
        scans = []
        for key in posed:
            pts = load_frame(key).points
            scans.append((pts, poses[key], load_labels(key, len(pts))))
        out.update(zip(posed, consolidate(scans)))
    return out


def consolidate_folder(dataset, pseudolabels, out_dir, config: ConsolidationConfig, overwrite: bool = False,
                       progress: bool = True, semantic: bool = True) -> dict:
    """Consolidate the pseudo-label files of ``pseudolabels`` (one per scan of ``dataset``, a SemanticKITTI
    sequence or root with poses) into ``out_dir``: semantic ones by the window's votes, instance ones
    (``semantic=False``) by associating their instances into tracklets. Scans done before with this configuration
    are skipped (a sequence with one scan to do is read whole: windows span it). Returns counts."""
    from tqdm import tqdm

    from sal_ros.data.datasets import semantickitti_poses
    from sal_ros.data.pseudolabels import (load_pseudolabels, load_semantic, pseudolabel_path, save_pseudolabels,
                                           save_semantic)
    from sal_ros.data.sources import FrameSource
    from sal_ros.pseudolabel.engine import pending_keys

    load, save = (load_semantic, save_semantic) if semantic else (load_pseudolabels, save_pseudolabels)
    if semantic:
        run = lambda scans: [consolidate_scan(t, scans, config).labels for t in range(len(scans))]  # noqa: E731
    else:
        run = lambda scans: associate_instances(scans, config)  # noqa: E731
    source = FrameSource(dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    poses = semantickitti_poses(dataset)
    keys = [k for k in source.keys() if pseudolabel_path(pseudolabels, k).exists()]
    todo = set(pending_keys(keys, out_dir, config.config_hash(), overwrite,
                            read_hash=lambda p: load(p).meta.get("consolidation_hash")))
    seqs = {sequence_of(k) for k in todo}
    wanted = [k for k in keys if sequence_of(k) in seqs]
    results = _per_sequence(wanted, source.load, lambda k, n: load(pseudolabel_path(pseudolabels, k), n), poses, run)
    done = 0
    for key, labels in tqdm(results.items(), desc="consolidate", unit="scan", disable=not progress):
        if key in todo:
            save(pseudolabel_path(out_dir, key), labels)
            done += 1
    return {"scans": len(keys), "written": done, "skipped": len(keys) - len(todo),
            "unposed": len([k for k in wanted if k not in poses])}


def oracle_study(dataset, noise: float, config: ConsolidationConfig, seed: int = 0, progress: bool = False) -> dict:
    """Semantic pseudo-labels of the noisy oracle (``semantic_eval.oracle_study``'s teacher) before and after
    consolidation, scored on the points a camera saw with a ground-truth class: every label ("all"), and only
    the points consolidation decided ("decided": their share is the kept share); plus the points no camera saw
    that consolidation filled (count and accuracy)."""
    from tqdm import tqdm

    from sal_ros.data.datasets import semantickitti_poses
    from sal_ros.data.sources import FrameSource
    from sal_ros.pseudolabel.score_sources import OracleScores
    from sal_ros.pseudolabel.semantic_labeler import SemanticConfig, SemanticLabeler
    from sal_ros.eval.semantic_pseudolabels import SemanticScore

    source = FrameSource(dataset)
    oracle = OracleScores("semantickitti", noise=noise, seed=seed)
    label_set = oracle.label_set
    labeler = SemanticLabeler(SemanticConfig(scores="oracle"), source, score_source=oracle)
    frames, raw = {}, {}
    for key in tqdm(source.keys(), desc=f"oracle sigma {noise}", unit="scan", disable=not progress):
        frames[key] = source.load(key)
        raw[key] = labeler.raw(frames[key])
    after = consolidate_sequence(list(frames), frames.get, lambda k, n: raw[k], semantickitti_poses(dataset), config)
    rows = {name: SemanticScore(label_set.num_classes) for name in ("per scan", "consolidated", "decided only")}
    filled = filled_right = 0
    for key, result in after.items():
        gt, _ = label_set.split(frames[key].gt_labels)
        before, lab, decided = raw[key], result.labels, result.decided
        scored = before.seen & (gt > 0)
        g = gt[scored]
        rows["per scan"].add(before.raw_label[scored].astype(np.int64), before.raw_label[scored].astype(np.int64), g)
        rows["consolidated"].add(lab.raw_label[scored].astype(np.int64), lab.raw_label[scored].astype(np.int64), g)
        only = np.where(decided[scored], lab.raw_label[scored], 0).astype(np.int64)
        rows["decided only"].add(only, lab.raw_label[scored].astype(np.int64), g)
        new = ~before.seen & (lab.raw_label > 0) & (gt > 0)
        filled += int(new.sum())
        filled_right += int((lab.raw_label[new] == gt[new]).sum())
    return {"noise": noise, "scans": len(after), "config": asdict(config),
            "rows": {n: s.summary(label_set.class_names) for n, s in rows.items()},
            "filled": filled, "filled_acc": 100 * filled_right / filled if filled else float("nan")}


# ------------------------------------------------------------------------------------------------ instances


def associate_instances(scans: list[tuple[np.ndarray, np.ndarray, "PseudoLabels"]],
                        config: ConsolidationConfig) -> list["PseudoLabels"]:
    """The instance pseudo-labels of one sequence's scans ((points, pose, PseudoLabels) in time order) with one id
    and one token per tracklet (module docstring); the masks are the scans' own."""
    from sal_ros.data.pseudolabels import PseudoLabels

    members, cells = [], []  # (scan, instance row) and the voxels each occupies
    for j, (pts, pose, pl) in enumerate(scans):
        has = pl.instance > 0
        vox = voxel_ids(transform_points(pose, pts[has]), config.instance_voxel)
        pairs = np.unique(np.stack([pl.instance[has].astype(np.int64), vox]), axis=1)
        for row in range(pl.num_instances):
            members.append((j, row))
            cells.append(pairs[1][pairs[0] == row + 1])
    index = {m: k for k, m in enumerate(members)}
    parent = list(range(len(members)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a_scan in range(len(scans)):
        for b_scan in range(a_scan + 1, min(len(scans), a_scan + config.window + 1)):
            for a, b in _best_overlaps(scans, a_scan, b_scan, cells, index, config.instance_iou):
                parent[root(a)] = root(b)
    roots = [root(k) for k in range(len(members))]
    track_of = {r: t + 1 for t, r in enumerate(dict.fromkeys(roots))}
    tokens_of: dict[int, list] = {}
    for (j, row), r in zip(members, roots):
        tokens_of.setdefault(r, []).append(scans[j][2].tokens[row].astype(np.float32))
    token = {r: _normalized(np.mean(rows, axis=0)) for r, rows in tokens_of.items()}
    out = []
    for j, (_, _, pl) in enumerate(scans):
        ks = [index[(j, row)] for row in range(pl.num_instances)]
        tokens = np.array([token[roots[k]] for k in ks], np.float32).reshape(len(ks), pl.tokens.shape[1])
        meta = {**pl.meta, "track_ids": [track_of[roots[k]] for k in ks],
                "consolidation": {**asdict(config)}, "consolidation_hash": config.config_hash()}
        out.append(PseudoLabels(pl.instance, tokens, pl.scores, pl.cameras, pl.in_frustum, meta))
    return out


def _best_overlaps(scans, a_scan: int, b_scan: int, cells, index, min_iou: float) -> list[tuple[int, int]]:
    """Member pairs of two scans whose voxel IoU reaches ``min_iou``, each the other's best."""
    a_rows = range(scans[a_scan][2].num_instances)
    b_rows = range(scans[b_scan][2].num_instances)
    if not len(a_rows) or not len(b_rows):
        return []
    iou = np.zeros((len(a_rows), len(b_rows)))
    for i in a_rows:
        ca = cells[index[(a_scan, i)]]
        for k in b_rows:
            cb = cells[index[(b_scan, k)]]
            inter = np.intersect1d(ca, cb, assume_unique=True).size
            if inter:
                iou[i, k] = inter / (ca.size + cb.size - inter)
    best_b, best_a = iou.argmax(1), iou.argmax(0)
    return [(index[(a_scan, i)], index[(b_scan, int(best_b[i]))]) for i in a_rows
            if iou[i, best_b[i]] >= min_iou and best_a[best_b[i]] == i]


def _normalized(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def instance_study(dataset, config: ConsolidationConfig, progress: bool = False) -> dict:
    """Oracle masks (ground-truth segments rendered into the camera, lifted by the engine) of every scan of
    ``dataset``, scored before and after ``associate_instances``: per-scan class-agnostic PQ (the masks are the
    same, so it cannot move) and the association over the sequence, S_assoc of LSTQ with the thing instances as
    tubes (per-scan ids before, tracklet ids after) on the points the cameras see."""
    from tqdm import tqdm

    from sal_ros.data.datasets import semantickitti_poses
    from sal_ros.data.labels import semantickitti
    from sal_ros.data.sources import FrameSource
    from sal_ros.eval.tracking import LSTQEvaluator
    from sal_ros.pseudolabel.engine import label_from_masks
    from sal_ros.eval.pseudolabels import PseudoLabelScore, scored_points
    from sal_ros.pseudolabel.evaluate import _frame_masks

    label_set = semantickitti()
    source = FrameSource(dataset)
    poses = semantickitti_poses(dataset)
    by_seq: dict[str, list] = {}
    for key in tqdm(source.keys(), desc="oracle masks", unit="scan", disable=not progress):
        if key not in poses:
            continue
        frame = source.load(key)
        masks = _frame_masks(frame, None, "oracle", label_set, 0.8, 1.0, (2, 3))
        pl = label_from_masks(frame, masks, None, min_points=5, token_dim=0)
        by_seq.setdefault(sequence_of(key), []).append((frame, poses[key], pl))
    pq = PseudoLabelScore()
    assoc = {"per scan": LSTQEvaluator(1), "tracklets": LSTQEvaluator(1)}
    tracklets = 0
    for seq, scans in by_seq.items():
        after = associate_instances([(f.points, pose, pl) for f, pose, pl in scans], config)
        tracklets += len({t for pl in after for t in pl.meta["track_ids"]})
        for (frame, _, pl), linked in zip(scans, after):
            keep, gt_cls, gt_seg, thing = scored_points(frame, label_set, 1.0)
            pq.add(pl.instance[keep], gt_cls, gt_seg, thing, label_set.min_points)
            gt_inst = np.where(thing, np.asarray(frame.gt_labels, np.int64)[keep] >> 16, 0)
            gt_sem = np.where(thing, 1, gt_cls > 0).astype(np.int64)  # one class: tubes keyed by id alone
            track = np.r_[0, linked.meta["track_ids"]].astype(np.int64)[linked.instance]
            for name, ids in (("per scan", pl.instance.astype(np.int64)), ("tracklets", track)):
                assoc[name].add(gt_sem, ids[keep], gt_sem, gt_inst, sequence=seq)
    return {"scans": sum(len(v) for v in by_seq.values()), "pq": pq.summary(), "tracklets": tracklets,
            "s_assoc": {name: ev.compute().s_assoc for name, ev in assoc.items()},
            "gt_tubes": assoc["per scan"].compute().gt_tubes}
