"""The geometric teacher: pseudo-instances from the lidar alone, no weights, no ground truth (issue 21).

1. Ground removal (``ground_points``), a region-wise ground model in the spirit of Patchwork (Lim et al., RA-L
   2021): the scan is cut into a polar grid (range rings x azimuth sectors, coarser sectors far out where points
   are sparse); in each cell a plane is fitted (PCA) to the cell's lowest points and refitted to its inliers;
   a cell's plane is ground when it is upright (tilt below ``max_tilt_deg``) and not above the ground expected at
   that range (sensor height, estimated from the near rings, plus ``max_slope`` times the range: a car roof or a
   wall filling a cell is flat or low enough to fool a plane fit, not both checks). Points within
   ``distance`` of (or below) an accepted plane are ground. A cell with too few points or a rejected plane falls
   back to the expected-ground height.
2. Clustering of the points above the ground (DBSCAN, the same ``dbscan`` as the DBSCAN refinement; or scikit-learn's
   HDBSCAN): each cluster with ``min_points`` points is a pseudo-instance; the ground is one more
   (``ground_instance``), as a 2D teacher's road mask would be.
3. As a mask source (``GeometricMasks``, name ``geometric``): the instances are rendered into each camera image
   (z-buffer splats, as the oracle masks), optionally split by a 2D source's masks (``intersect``: "slic", or any
   mask source), and go through the engine like any masks (flatten, CLIP tokens, lift, fuse, DBSCAN replace).
   ``label_points`` labels the whole scan, cameras or not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from sal_ros.core.camera import project_view
from sal_ros.pseudolabel.masks import Masks, as_rgb, label_image, mask_source_identity
from sal_ros.pseudolabel.refine import dbscan


GROUND_CLASSES = ("road", "parking", "sidewalk", "other-ground", "terrain")  # what a vehicle could stand on


@dataclass
class GroundConfig:
    ring_edges: tuple[float, ...] = (2.7, 6.0, 9.0, 12.4, 16.0, 22.8, 30.0, 41.0, 60.0, 80.0)  # metres
    sectors: tuple[int, ...] = (16, 32, 32, 54, 54, 54, 32, 32, 16)  # azimuth sectors per ring
    distance: float = 0.15  # metres above a cell's plane that still count as ground
    seed_points: int = 20  # lowest points per cell whose mean height starts the fit
    seed_margin: float = 0.3  # metres above that mean height: the first fit's points
    iterations: int = 3
    min_cell_points: int = 10
    max_tilt_deg: float = 12.0
    sensor_height: float | None = None  # metres above the ground; None = estimated per scan from the near rings
    max_slope: float = 0.08  # rise per metre of range the ground may have over the sensor's footprint
    elevation_margin: float = 0.5  # metres above the expected ground a cell's plane may still lie

    def __post_init__(self) -> None:
        self.ring_edges = tuple(float(r) for r in self.ring_edges)
        self.sectors = tuple(int(s) for s in self.sectors)
        if len(self.sectors) != len(self.ring_edges) - 1 or np.any(np.diff(self.ring_edges) <= 0):
            raise ValueError(f"need increasing ring_edges and one sector count per ring, got {self.ring_edges} "
                             f"and {self.sectors}")


@dataclass
class ClusterConfig:
    method: str = "dbscan"  # dbscan | hdbscan
    eps: float = 0.5  # metres, DBSCAN radius
    min_samples: int = 3  # DBSCAN core: neighbours within eps (voxels when voxel > 0)
    voxel: float = 0.15  # metres; > 0 clusters one mean point per occupied voxel (fewer pairs: faster)
    min_points: int = 20  # smaller clusters are left unlabelled
    max_range: float = 80.0  # metres; farther points are left unlabelled
    ground_instance: bool = True  # the ground points are one pseudo-instance

    def __post_init__(self) -> None:
        if self.method not in ("dbscan", "hdbscan"):
            raise ValueError(f"cluster method must be 'dbscan' or 'hdbscan', got {self.method!r}")


# --- ground ------------------------------------------------------------------------------------------------------

def _cells(xy: np.ndarray, cfg: GroundConfig) -> np.ndarray:
    """(N,) cell index in the polar grid, -1 outside the rings."""
    r = np.hypot(xy[:, 0], xy[:, 1])
    ring = np.searchsorted(cfg.ring_edges, r, side="right") - 1
    inside = (ring >= 0) & (ring < len(cfg.sectors))
    sectors = np.asarray(cfg.sectors)
    offset = np.r_[0, np.cumsum(sectors)]
    ring_c = np.clip(ring, 0, len(sectors) - 1)
    azimuth = (np.arctan2(xy[:, 1], xy[:, 0]) + np.pi) / (2 * np.pi)  # 0..1
    sector = np.minimum((azimuth * sectors[ring_c]).astype(np.int64), sectors[ring_c] - 1)
    return np.where(inside, offset[ring_c] + sector, -1)


def _fit_planes(pts: np.ndarray, cell: np.ndarray, members: np.ndarray, n_cells: int):
    """Per cell (normal (C, 3) pointing up, offset (C,), count (C,)): PCA plane of the member points."""
    c, p = cell[members], pts[members]
    count = np.bincount(c, minlength=n_cells).astype(np.float64)
    safe = np.maximum(count, 1)[:, None]
    mean = np.stack([np.bincount(c, p[:, k], n_cells) for k in range(3)], 1) / safe
    d = p - mean[c]
    cov = np.empty((n_cells, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cov[:, a, b] = cov[:, b, a] = np.bincount(c, d[:, a] * d[:, b], n_cells) / safe[:, 0]
    _, vec = np.linalg.eigh(cov)
    normal = vec[:, :, 0]  # smallest eigenvalue's eigenvector
    normal *= np.where(normal[:, 2:3] < 0, -1.0, 1.0)
    return normal, -(normal * mean).sum(1), count


def estimate_sensor_height(points: np.ndarray, near: tuple[float, float] = (3.0, 12.0), quantile: float = 10.0) -> float:
    """Metres from the sensor down to the ground: a low height percentile of the near points (the ground around
    a vehicle is what the near rings mostly see). 1.73 (KITTI's mounting) when nothing is near."""
    r = np.hypot(points[:, 0], points[:, 1])
    z = points[(r > near[0]) & (r < near[1]), 2]
    return float(-np.percentile(z, quantile)) if z.size >= 50 else 1.73


def ground_points(points: np.ndarray, cfg: GroundConfig = GroundConfig()) -> np.ndarray:
    """(N,) bool: the ground (road, sidewalk, parking, terrain: what a vehicle could stand on)."""
    pts = np.asarray(points, np.float64)[:, :3]
    n = len(pts)
    if n == 0:
        return np.zeros(0, bool)
    h = cfg.sensor_height if cfg.sensor_height is not None else estimate_sensor_height(pts)
    r = np.hypot(pts[:, 0], pts[:, 1])
    cell = _cells(pts, cfg)
    n_cells = int(sum(cfg.sectors))
    inside = np.flatnonzero(cell >= 0)
    # Seeds: the lowest points of each cell (sorted by cell, then height).
    order = inside[np.lexsort((pts[inside, 2], cell[inside]))]
    oc = cell[order]
    start = np.searchsorted(oc, np.arange(n_cells))
    rank = np.arange(order.size) - start[oc]
    low = order[rank < cfg.seed_points]
    low_mean = np.bincount(cell[low], pts[low, 2], n_cells) / np.maximum(np.bincount(cell[low], minlength=n_cells), 1)
    members = inside[pts[inside, 2] < low_mean[cell[inside]] + cfg.seed_margin]
    for _ in range(cfg.iterations):
        normal, offset, count = _fit_planes(pts, cell, members, n_cells)
        dist = (pts[inside] * normal[cell[inside]]).sum(1) + offset[cell[inside]]
        members = inside[dist < cfg.distance]
    centre_r = np.bincount(cell[members], r[members], n_cells) / np.maximum(count, 1)
    centre_z = np.bincount(cell[members], pts[members, 2], n_cells) / np.maximum(count, 1)
    accepted = ((count >= cfg.min_cell_points) & (normal[:, 2] >= np.cos(np.radians(cfg.max_tilt_deg)))
                & (centre_z <= -h + cfg.max_slope * centre_r + cfg.elevation_margin))
    ground = pts[:, 2] < -h + cfg.distance  # fallback where no plane holds: flat ground at the sensor's height
    ok = inside[accepted[cell[inside]]]
    dist = (pts[ok] * normal[cell[ok]]).sum(1) + offset[cell[ok]]
    ground[ok] = dist < cfg.distance
    return ground


# --- instances ---------------------------------------------------------------------------------------------------

def cluster_points(points: np.ndarray, cfg: ClusterConfig = ClusterConfig()) -> np.ndarray:
    """(N,) int64 cluster per point, -1 = noise."""
    if len(points) == 0:
        return np.zeros(0, np.int64)
    if cfg.voxel > 0:
        _, inverse, count = np.unique(np.floor(points / cfg.voxel).astype(np.int64), axis=0, return_inverse=True,
                                      return_counts=True)
        inverse = inverse.reshape(-1)
        centre = np.stack([np.bincount(inverse, points[:, k]) for k in range(3)], 1) / count[:, None]
        return cluster_points(centre, replace(cfg, voxel=0.0))[inverse]
    if cfg.method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        # eps is not passed on: scikit-learn 1.9's cluster_selection_epsilon fails on lidar scans (epsilon_search
        # TypeError); HDBSCAN needs no radius, which is its point.
        return HDBSCAN(min_cluster_size=cfg.min_points, min_samples=cfg.min_samples,
                       copy=True).fit_predict(points).astype(np.int64)
    return dbscan(points, cfg.eps, cfg.min_samples)


def geometric_instances(points: np.ndarray, ground: GroundConfig = GroundConfig(),
                        cluster: ClusterConfig = ClusterConfig()) -> tuple[np.ndarray, np.ndarray]:
    """((N,) int64 pseudo-instance ids 1..K (0 = none), (N,) bool ground) for a whole scan: the ground (if
    ``ground_instance``), then the above-ground clusters of at least ``min_points`` points, largest first."""
    pts = np.asarray(points, np.float64)[:, :3]
    is_ground = ground_points(pts, ground)
    out = np.zeros(len(pts), np.int64)
    above = np.flatnonzero(~is_ground & (np.hypot(pts[:, 0], pts[:, 1]) <= cluster.max_range))
    labels = cluster_points(pts[above], cluster)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    keep = np.flatnonzero(sizes >= cluster.min_points)
    keep = keep[np.argsort(-sizes[keep], kind="stable")]
    first = 1
    if cluster.ground_instance and is_ground.any():
        out[is_ground] = 1
        first = 2
    lut = np.zeros(sizes.size + 1, np.int64)  # cluster -1 -> index 0 -> 0
    lut[keep + 1] = np.arange(first, first + keep.size)
    out[above] = lut[labels + 1]
    return out, is_ground


# --- as a mask source --------------------------------------------------------------------------------------------

def render_segments(points: np.ndarray, view, segment: np.ndarray, min_depth: float = 1.0,
                    splat: tuple[int, int] = (2, 3)) -> Masks:
    """Point segments rendered into the view's image: each point paints a (2*sx+1) x (2*sy+1) splat, the nearest
    point wins each pixel (z-buffer); one mask per segment id > 0, in id order."""
    idx, uv, depth = project_view(points, view, min_depth)
    h, w = view.image.shape[:2]
    sx, sy = splat
    du, dv = np.meshgrid(np.arange(-sx, sx + 1), np.arange(-sy, sy + 1))
    u = (uv[:, 0].astype(np.int64)[:, None] + du.reshape(1, -1)).ravel()
    v = (uv[:, 1].astype(np.int64)[:, None] + dv.reshape(1, -1)).ravel()
    d = np.repeat(depth, du.size)
    s = np.repeat(np.asarray(segment)[idx], du.size)
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    pix, d, s = v[ok] * w + u[ok], d[ok], s[ok]
    order = np.lexsort((d, pix))
    first = np.r_[True, pix[order][1:] != pix[order][:-1]]
    pix, s = pix[order][first], s[order][first]
    pix, s = pix[s > 0], s[s > 0]
    ids, inv = np.unique(s, return_inverse=True)
    masks = np.zeros((ids.size, h * w), bool)
    masks[inv, pix] = True
    return Masks(masks.reshape(ids.size, h, w), np.ones(ids.size, np.float32))


def split_by(masks: Masks, image_masks: Masks, min_fraction: float = 0.1) -> Masks:
    """Each mask cut along the image masks: its parts inside one image mask that hold at least ``min_fraction``
    of it become masks (two touching cars clustered as one, told apart by the image); the rest stays whole."""
    if len(masks) == 0 or len(image_masks) == 0:
        return masks
    regions = label_image(image_masks)
    out, scores = [], []
    for m, s in zip(masks.masks, masks.scores):
        ids, counts = np.unique(regions[m], return_counts=True)
        big = ids[(counts >= min_fraction * m.sum()) & (ids >= 0)]
        if big.size <= 1:
            out.append(m)
            scores.append(s)
            continue
        for k in big:
            out.append(m & (regions == k))
            scores.append(s)
        rest = m & ~np.isin(regions, big)
        if rest.any():
            out.append(rest)
            scores.append(s)
    return Masks(np.stack(out), np.asarray(scores, np.float32))


class GeometricMasks:
    """Ground removal + clustering of the lidar, rendered into each camera (a source that needs the points)."""

    name = "geometric"

    def __init__(self, ground: dict | None = None, cluster: dict | None = None, splat: tuple[int, int] = (2, 3),
                 min_depth: float = 1.0, intersect=None, intersect_min_fraction: float = 0.1, **_ignored) -> None:
        self.ground = GroundConfig(**(ground or {}))
        self.cluster = ClusterConfig(**(cluster or {}))
        self.splat, self.min_depth = tuple(int(s) for s in splat), float(min_depth)
        self.intersect_source = intersect  # a 2D mask source (mask_sources.build_mask_source builds it by name)
        self.intersect_min_fraction = intersect_min_fraction
        self.identity = {"source": "geometric", "ground": asdict(self.ground), "cluster": asdict(self.cluster),
                         "splat": list(self.splat), "intersect_min_fraction": intersect_min_fraction,
                         "intersect": None if intersect is None else mask_source_identity(intersect)}
        self._last: tuple | None = None  # (points, instances, ground): one scan, several cameras

    def generate(self, image: np.ndarray) -> Masks:
        raise TypeError("geometric masks need the frame's points: use generate_for_view(points, view)")

    def label_points(self, points: np.ndarray) -> np.ndarray:
        """(N,) pseudo-instance ids for the whole scan (cached for the cameras of the same scan)."""
        if self._last is None or self._last[0] is not points:  # the reference kept: no id reuse
            self._last = (points, *geometric_instances(points, self.ground, self.cluster))
        return self._last[1]

    def ground_of(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool ground of the scan (the same computation as ``label_points``)."""
        self.label_points(points)
        return self._last[2]

    def generate_for_view(self, points: np.ndarray, view) -> Masks:
        masks = render_segments(points, view, self.label_points(points), self.min_depth, self.splat)
        if self.intersect_source is not None:
            as_rgb(view.image)  # a bad image fails here by name, as in the 2D sources
            masks = split_by(masks, self.intersect_source.generate(view.image), self.intersect_min_fraction)
        return masks


# --- command line (sal-ros pseudolabel, sal-ros eval pseudolabels) -----------------------------------------------

def add_arguments(group) -> None:
    """The geometric source's options, for an argparse parser or group."""
    g, c = GroundConfig, ClusterConfig
    group.add_argument("--ground-distance", type=float, default=g.distance,
                       help="geometric: metres above a cell's ground plane that still count as ground")
    group.add_argument("--ground-max-tilt", type=float, default=g.max_tilt_deg,
                       help="geometric: steepest ground plane (degrees)")
    group.add_argument("--sensor-height", type=float, help="geometric: lidar height above the ground, metres "
                                                           "(default: estimated per scan)")
    group.add_argument("--cluster-method", choices=["dbscan", "hdbscan"], default=c.method)
    group.add_argument("--cluster-eps", type=float, default=c.eps, help="geometric: clustering radius, metres")
    group.add_argument("--cluster-min-points", type=int, default=c.min_points,
                       help="geometric: smaller clusters stay unlabelled")
    group.add_argument("--no-ground-instance", action="store_true",
                       help="geometric: leave the ground unlabelled instead of one pseudo-instance")
    group.add_argument("--geometric-intersect", choices=["slic"],
                       help="geometric: split each rendered cluster by these image masks (--slic-segments)")


def options_from_args(args) -> dict:
    """``GeometricMasks`` keyword arguments from ``add_arguments``' options."""
    ground = {"distance": args.ground_distance, "max_tilt_deg": args.ground_max_tilt,
              "sensor_height": args.sensor_height}
    cluster = {"method": args.cluster_method, "eps": args.cluster_eps, "min_points": args.cluster_min_points,
               "ground_instance": not args.no_ground_instance}
    opts = {"ground": ground, "cluster": cluster}
    if args.geometric_intersect:
        opts.update(intersect=args.geometric_intersect, intersect_options={"n_segments": args.slic_segments})
    return opts
