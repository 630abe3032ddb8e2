"""Panoptic quality (PQ, SQ, RQ, PQ-dagger) and class-agnostic PQ, accumulated over scans.

Definitions follow semantic-kitti-api (``PanopticEval``):

- points whose ground-truth class is ``ignore`` (0) are removed from both prediction and ground truth;
- a segment is a (class, instance id) pair, so stuff predicted with instance 0 is one segment per class,
  and one instance id spread over two classes is two segments;
- a prediction and a ground-truth segment of the same class match when IoU > 0.5 (unique by construction);
- unmatched segments count as FP / FN only when they hold at least ``min_points`` points
  (after ignore removal);
- SQ = sum IoU(TP) / TP, RQ = TP / (TP + FP/2 + FN/2), PQ = SQ * RQ; PQ-dagger averages PQ for things and
  IoU for stuff.

Means over classes follow semantic-kitti-api too, so our numbers sit beside published ones: a class absent from
both ground truth and predictions (no TP, FP or FN; for IoU an empty union) scores 0 in ``pq``, ``sq``, ``rq``,
``pq_dagger``, ``miou`` and the things / stuff means. Per class such a class stays NaN (null in JSON, '–' in the
tables). The ``*_present`` means leave absent classes out instead: on a full validation set every class occurs
and both agree, on a few scans the present-classes mean is the fairer look at the classes that occur (ground
truth against itself on 2 SemanticKITTI scans: 100 present, 63.2 reference).

Class-agnostic PQ (SAL): every labelled ground-truth segment and every predicted segment is one class; the
class of a prediction does not matter, only its points. Predicted points with class 0 and instance 0 belong to
no segment (they only lower the IoU of the segments they should have joined).

Everything is vectorized: per scan one ``np.unique`` over combined (prediction, ground truth) segment ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sal_ros.eval.confusion import ConfusionMatrix, check_same_length

_SHIFT = np.int64(1) << np.int64(32)


@dataclass
class SegmentCounts:
    """Per-class TP / FP / FN counts and summed TP IoU, indexed by class id 0..C."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> "SegmentCounts":
        z = lambda dt: np.zeros(num_classes + 1, dt)  # noqa: E731
        return cls(z(np.int64), z(np.int64), z(np.int64), z(np.float64))

    def __iadd__(self, other: "SegmentCounts") -> "SegmentCounts":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    def total(self) -> "SegmentCounts":
        """All classes 1..C as the one class 1 (class 0 never scores)."""
        return SegmentCounts(*(np.array([0, a[1:].sum()], a.dtype) for a in (self.tp, self.fp, self.fn, self.iou_sum)))

    def quality(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(PQ, SQ, RQ) per class; NaN where the class had no TP, FP or FN."""
        tp = self.tp.astype(np.float64)
        denom = tp + 0.5 * self.fp + 0.5 * self.fn
        seen = denom > 0
        sq = np.where(self.tp > 0, self.iou_sum / np.maximum(tp, 1), 0.0)
        rq = np.where(seen, tp / np.where(seen, denom, 1.0), 0.0)
        nan = np.full_like(tp, np.nan)
        return np.where(seen, sq * rq, nan), np.where(seen, sq, nan), np.where(seen, rq, nan)


def _segments(cls: np.ndarray, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point a compact segment index, and per segment its class and size."""
    key = cls.astype(np.int64) * _SHIFT + inst.astype(np.int64)
    _, first, index, size = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    return index.reshape(-1), cls[first], size


def match_segments(pred_cls: np.ndarray, pred_inst: np.ndarray, gt_cls: np.ndarray, gt_inst: np.ndarray,
                   num_classes: int, min_points: int, pred_valid: np.ndarray | None = None,
                   by: np.ndarray | None = None, by_classes: int = 0) -> SegmentCounts:
    """Match the segments of one scan; all inputs are per point with ignore points already removed.

    ``pred_cls`` / ``gt_cls`` are class ids 0..C (0 never scores), ``pred_inst`` / ``gt_inst`` any integer ids.
    ``pred_valid`` (bool per point) marks points that belong to a predicted segment at all.
    ``by`` (class ids 0..``by_classes`` per point, constant within a ground-truth segment: e.g. the ground-truth
    classes) counts under another key than the matching classes: TP and FN under the ground-truth segment's ``by``
    class, an FP under the ``by`` class most of its points have. The class-agnostic match then says which classes' segments are found or missed.
    """
    counts = SegmentCounts.zeros(num_classes if by is None else by_classes)
    if gt_cls.size == 0:
        return counts
    valid = np.ones(gt_cls.size, bool) if pred_valid is None else pred_valid
    p_idx, p_cls, p_size = _segments(pred_cls[valid], pred_inst[valid])
    g_idx, g_cls, g_size = _segments(gt_cls, gt_inst)
    # Intersections: one unique over (prediction segment, ground-truth segment) pairs.
    pair, inter = np.unique(p_idx.astype(np.int64) * g_size.size + g_idx[valid], return_counts=True)
    pp, gg = pair // g_size.size, pair % g_size.size
    iou = inter / (p_size[pp] + g_size[gg] - inter)
    hit = (iou > 0.5) & (p_cls[pp] == g_cls[gg]) & (g_cls[gg] > 0)
    mp, mg = pp[hit], gg[hit]
    p_key, g_key = p_cls, g_cls
    if by is not None:
        g_key = np.zeros(g_size.size, np.int64)
        g_key[g_idx] = by  # constant within a ground-truth segment (its class): no count needed
        p_key = _majority(p_idx, by[valid], p_size.size)
    bins = counts.tp.size
    counts.tp += np.bincount(g_key[mg], minlength=bins)
    counts.iou_sum += np.bincount(g_key[mg], weights=iou[hit], minlength=bins)
    p_matched = np.zeros(p_size.size, bool)
    p_matched[mp] = True
    g_matched = np.zeros(g_size.size, bool)
    g_matched[mg] = True
    fp = ~p_matched & (p_size >= min_points) & (p_cls > 0)
    fn = ~g_matched & (g_size >= min_points) & (g_cls > 0)
    counts.fp += np.bincount(p_key[fp], minlength=bins)
    counts.fn += np.bincount(g_key[fn], minlength=bins)
    return counts


def _majority(segment: np.ndarray, value: np.ndarray, num_segments: int) -> np.ndarray:
    """Per segment the value most of its points have (ties: the smallest)."""
    out = np.zeros(num_segments, np.int64)
    if value.size == 0:
        return out
    base = int(value.max()) + 1
    pair, n = np.unique(segment.astype(np.int64) * base + value, return_counts=True)
    seg, val = pair // base, pair % base
    order = np.lexsort((val, -n, seg))  # per segment: most points first, then the smallest value
    seg, val = seg[order], val[order]
    first = np.r_[True, seg[1:] != seg[:-1]]
    out[seg[first]] = val[first]
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean over the classes present (NaN = absent, left out)."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _refmean(values: np.ndarray) -> float:
    """semantic-kitti-api's mean: an absent class (NaN) counts as 0."""
    return float(np.nan_to_num(values, nan=0.0).mean()) if values.size else float("nan")


MEAN_CONVENTION = ("pq, sq, rq, pq_dagger, miou and the things / stuff means score a class absent from ground truth "
                   "and predictions as 0 (semantic-kitti-api); the *_present means leave such classes out")


@dataclass
class PanopticResult:
    """Metrics in [0, 1]; per-class arrays are indexed by class id - 1 (``class_names`` order)."""

    class_names: tuple[str, ...]
    things: tuple[bool, ...]
    pq: np.ndarray
    sq: np.ndarray
    rq: np.ndarray
    iou: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    agnostic: dict[str, float]  # pq, sq, rq, tp, fp, fn over class-agnostic segments
    num_scans: int
    num_points: int
    summary: dict[str, float] = field(default_factory=dict)
    agnostic_by_class: SegmentCounts | None = None  # the class-agnostic match counted per ground-truth class

    def __post_init__(self) -> None:
        things = np.asarray(self.things, bool)
        stuff = ~things
        dagger = np.where(things, self.pq, self.iou)
        means = {"pq": self.pq, "sq": self.sq, "rq": self.rq, "pq_dagger": dagger, "miou": self.iou,
                 "pq_things": self.pq[things], "pq_stuff": self.pq[stuff], "sq_things": self.sq[things],
                 "sq_stuff": self.sq[stuff], "rq_things": self.rq[things], "rq_stuff": self.rq[stuff]}
        self.summary = {
            **{k: _refmean(v) for k, v in means.items()},
            **{f"{k}_present": _nanmean(v) for k, v in means.items()},
            "classes_present": float(np.isfinite(self.pq).sum()),
            "agnostic_pq": self.agnostic["pq"], "agnostic_sq": self.agnostic["sq"],
            "agnostic_rq": self.agnostic["rq"],
        }

    def per_class(self) -> list[dict]:
        return [
            {"class": name, "thing": bool(t), "pq": _f(self.pq[i]), "sq": _f(self.sq[i]), "rq": _f(self.rq[i]),
             "iou": _f(self.iou[i]), "tp": int(self.tp[i]), "fp": int(self.fp[i]), "fn": int(self.fn[i])}
            for i, (name, t) in enumerate(zip(self.class_names, self.things))
        ]

    def agnostic_per_class(self) -> list[dict]:
        """Per ground-truth class that occurs: its segments found (TP) and missed (FN) by the class-agnostic match,
        the mean IoU of those found, and the unmatched predictions lying mostly on it (FP)."""
        c = self.agnostic_by_class
        if c is None:
            return []
        return [{"class": name, "thing": bool(t), "found": int(c.tp[k]), "missed": int(c.fn[k]),
                 "sq": _f(c.iou_sum[k] / c.tp[k]) if c.tp[k] else None, "spurious": int(c.fp[k])}
                for k, (name, t) in enumerate(zip(self.class_names, self.things), start=1)
                if c.tp[k] + c.fn[k] + c.fp[k] > 0]

    def to_dict(self) -> dict:
        return {"summary": {k: _f(v) for k, v in self.summary.items()}, "mean_convention": MEAN_CONVENTION,
                "per_class": self.per_class(),
                "agnostic": {k: _f(v) for k, v in self.agnostic.items()},
                "agnostic_per_class": self.agnostic_per_class(),
                "num_scans": self.num_scans, "num_points": self.num_points}


def _f(x) -> float | None:
    """JSON-friendly: NaN becomes null."""
    x = float(x)
    return None if np.isnan(x) else x


class PanopticEvaluator:
    """Accumulates panoptic, semantic and class-agnostic counts over scans.

    >>> ev = PanopticEvaluator(num_classes=19, things=range(1, 9), min_points=50)
    >>> ev.add(pred_sem, pred_inst, gt_sem, gt_inst)      # per scan, class ids 0..19
    >>> result = ev.compute()                           # PanopticResult
    """

    def __init__(self, num_classes: int, things=(), min_points: int = 50, ignore: int = 0,
                 class_names: tuple[str, ...] | None = None) -> None:
        if ignore != 0:
            raise ValueError("class 0 is the ignore class of every label set here")
        self.num_classes = num_classes
        self.min_points = min_points
        self.class_names = tuple(class_names) if class_names else tuple(str(k) for k in range(1, num_classes + 1))
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.thing_mask = np.zeros(num_classes + 1, bool)
        self.thing_mask[list(things)] = True
        self.confusion = ConfusionMatrix(num_classes)
        self.counts = SegmentCounts.zeros(num_classes)
        self.agnostic = SegmentCounts.zeros(1)
        self.agnostic_by_class = SegmentCounts.zeros(num_classes)  # the same match, counted per ground-truth class
        self.num_scans = 0
        self.num_points = 0

    @classmethod
    def for_label_set(cls, label_set, min_points: int | None = None) -> "PanopticEvaluator":
        return cls(label_set.num_classes, label_set.things,
                   label_set.min_points if min_points is None else min_points, class_names=label_set.class_names)

    def add(self, pred_sem: np.ndarray, pred_inst: np.ndarray, gt_sem: np.ndarray, gt_inst: np.ndarray) -> None:
        """One scan: class ids 0..C and instance / segment ids per point (ground truth class 0 = ignore)."""
        check_same_length(pred_sem=pred_sem, pred_inst=pred_inst, gt_sem=gt_sem, gt_inst=gt_inst)
        pred_sem = np.asarray(pred_sem, np.int64)
        gt_sem = np.asarray(gt_sem, np.int64)
        self.confusion.add(pred_sem, gt_sem)  # validates the class range
        keep = gt_sem != 0
        ps, pi = pred_sem[keep], np.asarray(pred_inst, np.int64)[keep]
        gs, gi = gt_sem[keep], np.asarray(gt_inst, np.int64)[keep]
        self.counts += match_segments(ps, pi, gs, gi, self.num_classes, self.min_points)
        self.add_agnostic(ps, pi, gs, gi, _count=False)
        self.num_scans += 1
        self.num_points += int(keep.sum())

    def add_agnostic(self, pred_sem, pred_inst, gt_sem, gt_inst, _count: bool = True) -> None:
        """Class-agnostic counts only (e.g. a model's raw query segments against pseudo-labels)."""
        pred_sem, pred_inst = np.asarray(pred_sem, np.int64), np.asarray(pred_inst, np.int64)
        gt_sem, gt_inst = np.asarray(gt_sem, np.int64), np.asarray(gt_inst, np.int64)
        if _count:
            check_same_length(pred_sem=pred_sem, pred_inst=pred_inst, gt_sem=gt_sem, gt_inst=gt_inst)
            keep = gt_sem != 0
            pred_sem, pred_inst, gt_sem, gt_inst = pred_sem[keep], pred_inst[keep], gt_sem[keep], gt_inst[keep]
        one = np.ones(gt_sem.size, np.int64)
        # A segment is (class, instance) on both sides; then every segment gets the single class 1.
        pred_key = pred_sem * _SHIFT + pred_inst
        gt_key = gt_sem * _SHIFT + gt_inst
        # Per ground-truth class when the classes are this evaluator's; a one-class evaluator fed dataset classes
        # (the demo's class-agnostic scores) keeps everything under its class 1.
        by = gt_sem if gt_sem.size == 0 or gt_sem.max() <= self.num_classes else one
        by_class = match_segments(one, pred_key, one, gt_key, 1, self.min_points,
                                  pred_valid=(pred_sem != 0) | (pred_inst != 0), by=by, by_classes=self.num_classes)
        self.agnostic_by_class += by_class
        self.agnostic += by_class.total()

    def compute(self) -> PanopticResult:
        pq, sq, rq = self.counts.quality()
        apq, asq, arq = self.agnostic.quality()
        agnostic = {"pq": float(apq[1]), "sq": float(asq[1]), "rq": float(arq[1]), "tp": float(self.agnostic.tp[1]),
                    "fp": float(self.agnostic.fp[1]), "fn": float(self.agnostic.fn[1])}
        return PanopticResult(
            class_names=self.class_names, things=tuple(self.thing_mask[1:]), pq=pq[1:], sq=sq[1:], rq=rq[1:],
            iou=self.confusion.iou()[1:], tp=self.counts.tp[1:], fp=self.counts.fp[1:], fn=self.counts.fn[1:],
            agnostic=agnostic, num_scans=self.num_scans, num_points=self.num_points,
            agnostic_by_class=self.agnostic_by_class)


def found_by_class(rows: list[dict]) -> str:
    """``agnostic_per_class`` rows as one line, most segments first: "road 5/5, sidewalk 0/5 (+3 spurious)"."""
    rows = sorted(rows, key=lambda r: (-(r["found"] + r["missed"]), r["class"]))
    return ", ".join(f"{r['class']} {r['found']}/{r['found'] + r['missed']}"
                     + (f" (+{r['spurious']} spurious)" if r["spurious"] else "") for r in rows)


def class_agnostic_pq(pred_inst: np.ndarray, ref_inst: np.ndarray, min_points: int = 50,
                      ref_valid: np.ndarray | None = None, pred_sem: np.ndarray | None = None) -> dict[str, float]:
    """Class-agnostic PQ of predicted segments against reference instance ids (e.g. pseudo-labels).

    Reference points with id 0 (or outside ``ref_valid``) are ignored. A predicted segment is
    (``pred_sem``, ``pred_inst``) when labels are given (merged stuff: label k, instance 0), else ``pred_inst``
    with 0 = no segment.
    """
    ref_inst = np.asarray(ref_inst, np.int64)
    gt_sem = (ref_inst != 0).astype(np.int64)
    if ref_valid is not None:
        gt_sem &= np.asarray(ref_valid, bool)
    pred_inst = np.asarray(pred_inst, np.int64)
    pred_sem = np.zeros_like(pred_inst) if pred_sem is None else np.asarray(pred_sem, np.int64)
    ev = PanopticEvaluator(1, min_points=min_points)
    ev.add_agnostic(pred_sem, pred_inst, gt_sem, ref_inst)
    return ev.compute().agnostic
