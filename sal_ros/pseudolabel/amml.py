"""SAM2-AMML masks from lidar: SAM 2 point prompts where the lidar says objects are (SAM 2 masks through
point-to-pixel correspondences as a semantic-consistency constraint; docs/training.md, section 4).

Per camera (``Sam2LidarMasks.generate_for_view``):

1. the points the camera sees (projection + the engine's occlusion test), ground removed (below the frame's low
   z percentile + ``ground_clearance``), clustered in 3D (DBSCAN, ``cluster_eps``);
2. one prompt per cluster: the pixel of the cluster's point nearest its 3D centroid (on the object's surface,
   where the centroid of a concave object may fall on the background);
3. boundary-prompt elimination (``eliminate_prompts``): a prompt closer than ``border_px`` to the image border
   (SAM's mask of a cut-off object is unreliable) or closer than ``boundary_px`` to a projected point of another
   cluster (the prompt sits on an object boundary, SAM may take either side) is dropped;
4. SAM 2's image predictor, one positive point per prompt, the best of its three multimask outputs;
5. multi-mask fusion (``fuse_masks``): masks whose IoU reaches ``fuse_iou`` are one object seen from two prompts
   (a car split into two clusters): merged as their union with the higher score, transitively.

The masks then go through the engine like any mask source (flatten, lift, fuse cameras, DBSCAN replace), and, lifted,
serve the mask-consistency loss (train/semantic_objective.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sal_ros.pseudolabel.lifting import LiftConfig, point_pixels
from sal_ros.pseudolabel.masks import Masks, as_rgb, pairwise_intersections
from sal_ros.pseudolabel.refine import dbscan

DROP_BORDER, DROP_BOUNDARY = 1, 2


@dataclass
class PromptConfig:
    cluster_eps: float = 0.5  # metres, DBSCAN radius
    min_cluster_points: int = 10  # smaller clusters give no prompt
    ground_clearance: float = 0.3  # metres above the frame's low z percentile counted as ground (None: keep)
    border_px: float = 8.0
    boundary_px: float = 4.0
    fuse_iou: float = 0.5


def lidar_prompts(points: np.ndarray, view, cfg: PromptConfig = PromptConfig(),
                  lift: LiftConfig = LiftConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prompts (K, 2) u v, prompt cluster (K,), projected uv (P, 2) of the clustered points, their cluster (P,))."""
    px = point_pixels(points, view, lift)
    idx = px.index[px.visible]
    uv = np.stack([px.u[px.visible], px.v[px.visible]], 1).astype(np.float64)
    xyz = points[idx]
    if cfg.ground_clearance is not None and len(xyz):
        above = xyz[:, 2] > np.percentile(xyz[:, 2], 5) + cfg.ground_clearance
        xyz, uv = xyz[above], uv[above]
    cluster = dbscan(xyz, cfg.cluster_eps, 3) if len(xyz) else np.zeros(0, np.int64)
    prompts, ids = [], []
    for c in np.unique(cluster[cluster >= 0]):
        members = np.flatnonzero(cluster == c)
        if members.size < cfg.min_cluster_points:
            continue
        centre = xyz[members].mean(0)
        nearest = members[np.argmin(np.linalg.norm(xyz[members] - centre, axis=1))]
        prompts.append(uv[nearest])
        ids.append(c)
    return np.reshape(prompts, (-1, 2)), np.asarray(ids, np.int64), uv, cluster


def eliminate_prompts(prompts: np.ndarray, prompt_cluster: np.ndarray, uv: np.ndarray, cluster: np.ndarray,
                      shape: tuple[int, int], cfg: PromptConfig = PromptConfig()) -> np.ndarray:
    """(K,) uint8 reasons to drop each prompt (0 = keep): DROP_BORDER, DROP_BOUNDARY bits."""
    from scipy.spatial import cKDTree

    h, w = shape
    reasons = np.zeros(len(prompts), np.uint8)
    if not len(prompts):
        return reasons
    u, v = prompts[:, 0], prompts[:, 1]
    reasons[(u < cfg.border_px) | (v < cfg.border_px) | (u >= w - cfg.border_px) | (v >= h - cfg.border_px)] |= DROP_BORDER
    clustered = cluster >= 0
    if clustered.any() and cfg.boundary_px > 0:
        tree = cKDTree(uv[clustered])
        other = cluster[clustered]
        for k, (p, c) in enumerate(zip(prompts, prompt_cluster)):
            near = tree.query_ball_point(p, cfg.boundary_px)
            if np.any(other[near] != c):
                reasons[k] |= DROP_BOUNDARY
    return reasons


def fuse_masks(masks: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5) -> Masks:
    """Union of masks whose IoU reaches ``iou_threshold`` (transitively), with the group's best score."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    masks = np.asarray(masks, bool)
    m = len(masks)
    if m <= 1:
        return Masks(masks.reshape(m, *masks.shape[1:]), np.asarray(scores, np.float32))
    inter = pairwise_intersections(Masks(masks, scores)).astype(np.float64)  # bounding boxes first: cheap
    area = np.diag(inter)
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1)
    a, b = np.nonzero(np.triu(iou >= iou_threshold, 1))
    _, group = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(m, m)), directed=False)
    groups = np.unique(group)
    fused = np.stack([masks[group == g].any(0) for g in groups])
    best = np.array([np.max(np.asarray(scores)[group == g]) for g in groups], np.float32)
    return Masks(fused, best)


class Sam2LidarMasks:
    """SAM 2 masks prompted at projected lidar clusters (a mask source that needs the frame's points)."""

    name = "sam2_lidar"

    def __init__(self, config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", checkpoint: str | None = None,
                 device: str = "cpu", image_size: int | None = None, prompts: dict | None = None,
                 lift: dict | None = None, **_ignored) -> None:
        import torch
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
        model = build_sam2(config, checkpoint, device=device, hydra_overrides_extra=overrides)
        self.predictor = SAM2ImagePredictor(model)
        s = int(model.image_size)
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # as Sam2Masks
        self.cfg = PromptConfig(**(prompts or {}))
        self.lift = LiftConfig(**{**(lift or {}), **({"lidar_spacing_deg": tuple(lift["lidar_spacing_deg"])}
                                                      if lift and "lidar_spacing_deg" in lift else {})})
        self._torch = torch
        self.identity = {"source": "sam2_lidar", "config": config, "checkpoint": str(checkpoint), "image_size": s,
                         "prompts": vars(self.cfg)}
        self.last_prompts: dict = {}

    def generate(self, image: np.ndarray) -> Masks:
        raise TypeError("sam2_lidar masks need the frame's points: use generate_for_view(points, view)")

    def generate_for_view(self, points: np.ndarray, view) -> Masks:
        rgb = as_rgb(view.image)
        prompts, ids, uv, cluster = lidar_prompts(points, view, self.cfg, self.lift)
        reasons = eliminate_prompts(prompts, ids, uv, cluster, rgb.shape[:2], self.cfg)
        kept = prompts[reasons == 0]
        self.last_prompts = {"prompts": len(prompts), "border": int((reasons & DROP_BORDER > 0).sum()),
                             "boundary": int((reasons & DROP_BOUNDARY > 0).sum()), "kept": len(kept)}
        if not len(kept):
            return Masks.empty(*rgb.shape[:2])
        masks, scores = [], []
        with self._torch.inference_mode():
            self.predictor.set_image(rgb)
            for p in kept:
                m, s, _ = self.predictor.predict(point_coords=p[None].astype(np.float32),
                                                 point_labels=np.ones(1, np.int32), multimask_output=True)
                best = int(np.argmax(s))
                masks.append(m[best] > 0)
                scores.append(float(s[best]))
        return fuse_masks(np.stack(masks), np.asarray(scores, np.float32), self.cfg.fuse_iou)
