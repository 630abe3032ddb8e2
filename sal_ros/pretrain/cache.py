"""Per-frame teacher cache: what pretraining needs from the cameras, computed once (the 2D models are the slow part).

One ``<key>.npz`` per frame in the cache folder, written atomically (a killed run leaves whole files only; the next
run skips them: resumable). Per camera ``j`` (names in ``meta["cameras"]``):

- ``c{j}_index`` (P,) int32: points that project into the image and pass the occlusion test of the pseudo-label
  engine (sal_ros.pseudolabel.lifting);
- ``c{j}_cell`` (P,) int32: flat cell of the teacher's feature map each of them falls in;
- ``c{j}_fmap`` (h*w, D) float16: the teacher's feature map;
- with superpixels: ``c{j}_segment`` (P,) int32 superpixel of each point (-1: none) and ``c{j}_segfeats`` (S, D)
  float16 the teacher's features averaged over every pixel of each superpixel.

``meta`` (JSON) records the teacher, the superpixel source, the lift settings and their hash (a file made with
other settings is redone), and the lidar pose in the world when the dataset has one (for Seal's temporal term).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import atomic_write
from sal_ros.data.datasets import semantickitti_poses
from sal_ros.pseudolabel.lifting import LiftConfig, point_pixels
from sal_ros.pseudolabel.masks import flatten_masks, label_image

log = logging.getLogger(__name__)


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_path(folder: str | Path, key: str) -> Path:
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"frame key {key!r} cannot name a file")
    return Path(folder) / f"{key}.npz"


def frame_entry(frame, teacher, superpixels=None, lift=None, pose: np.ndarray | None = None) -> dict:
    """The arrays of one frame's cache file (see module doc)."""
    lift = lift or LiftConfig()
    arrays, cameras = {}, []
    for j, (name, view) in enumerate(frame.cameras.items()):
        fmap = teacher.feature_map(frame, name)
        px = point_pixels(frame.points, view, lift)
        keep = px.visible
        rows, cols = px.v[keep], px.u[keep]
        flat = fmap.feats.reshape(-1, fmap.feats.shape[2]).astype(np.float32)
        arrays[f"c{j}_index"] = px.index[keep].astype(np.int32)
        arrays[f"c{j}_cell"] = fmap.cell_of(rows, cols).astype(np.int32)
        arrays[f"c{j}_fmap"] = flat.astype(np.float16)
        if superpixels is not None:
            seg = label_image(flatten_masks(superpixels.generate(view.image)))
            arrays[f"c{j}_segment"] = seg[rows, cols].astype(np.int32)
            arrays[f"c{j}_segfeats"] = segment_means(seg, fmap, flat).astype(np.float16)
        cameras.append(name)
    meta = {"key": frame.key, "cameras": cameras, "num_points": frame.num_points,
            "pose": None if pose is None else np.asarray(pose, np.float64).tolist()}
    return {"arrays": arrays, "meta": meta}


def segment_means(seg: np.ndarray, fmap, flat: np.ndarray) -> np.ndarray:
    """(S, D) mean teacher feature over every pixel of each superpixel (pixels read their map cell)."""
    n_seg = int(seg.max()) + 1 if seg.size and seg.max() >= 0 else 0
    if n_seg == 0:
        return np.zeros((0, flat.shape[1]), np.float32)
    rows, cols = np.indices(seg.shape)
    cells = fmap.cell_of(rows.ravel(), cols.ravel())
    s = seg.ravel()
    ok = s >= 0
    counts = np.zeros((n_seg, len(flat)), np.float32)
    np.add.at(counts, (s[ok], cells[ok]), 1.0)
    return (counts @ flat) / np.maximum(counts.sum(1, keepdims=True), 1.0)


def save_entry(path: Path, entry: dict, settings: dict) -> Path:
    meta = {**entry["meta"], "settings": settings, "settings_hash": settings_hash(settings)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **entry["arrays"])
    return atomic_write(path, buf.getvalue())


def load_entry(path: str | Path) -> dict:
    """``{"meta": dict, "cameras": [{"index", "cell", "fmap", ["segment", "segfeats"]}]}``; SensorDataError if
    the file is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            cams = []
            for j in range(len(meta["cameras"])):
                cams.append({k: z[f"c{j}_{k}"] for k in ("index", "cell", "fmap", "segment", "segfeats")
                             if f"c{j}_{k}" in z.files})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise SensorDataError(f"{path}: not a readable teacher cache file ({exc})") from exc
    return {"meta": meta, "cameras": cams}


def load_meta(path: str | Path) -> dict:
    """Only the ``meta`` of a cache file (settings, pose); SensorDataError if the file is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise SensorDataError(f"{path}: not a readable teacher cache file ({exc})") from exc


def read_hash(path: Path) -> str | None:
    try:
        return load_meta(path).get("settings_hash")
    except SensorDataError as exc:
        log.warning("redoing %s: %s", path.name, exc)
        return None


def pending(keys: list[str], folder: Path, settings: dict) -> list[str]:
    """Keys without a cache file made with ``settings`` (unreadable files are redone too)."""
    want = settings_hash(settings)
    return [k for k in keys if not cache_path(folder, k).exists() or read_hash(cache_path(folder, k)) != want]


def write_frame(source, key: str, folder: Path, tools: "CacheTools", pose=None) -> Path:
    """Compute and write one frame's cache file."""
    frame = source.load(key)
    if not frame.cameras:
        raise SensorDataError(f"frame {key}: no camera images to distill from")
    entry = frame_entry(frame, tools.teacher, tools.superpixels, tools.lift, pose)
    return save_entry(cache_path(folder, key), entry, tools.settings)


def build_cache(source, keys: list[str], folder: str | Path, teacher, settings: dict, superpixels=None, lift=None,
                poses: dict | None = None, progress: bool = True) -> dict:
    """Write the missing cache files of ``keys`` (FrameSource ``source``) in this process; returns counts. Files
    made with other settings are redone; unreadable ones too."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tools = CacheTools(teacher, superpixels, lift, settings)
    todo = pending(keys, folder, settings)
    for key in tqdm(todo, desc="teacher cache", unit="frame", disable=not progress):
        write_frame(source, key, folder, tools, (poses or {}).get(key))
    return {"frames": len(keys), "computed": len(todo), "reused": len(keys) - len(todo)}


# --- the same work on Ray actors (sal_ros.pseudolabel.ray_backend, the pseudo-label engine's machinery) ----------

@dataclass
class CacheTools:
    """What writes a frame's cache file: the teacher, the superpixel source, the lift settings, the settings
    recorded in (and hashed into) every file."""
    teacher: object
    superpixels: object
    lift: object
    settings: dict


def cache_tools(spec: dict, source_kind: str) -> CacheTools:
    """The tools of a cache ``spec`` (JSON: teacher, superpixels, lift, label_set, pose_frame) for frames of
    ``source_kind``; the driver and every worker build them from the same spec, so their settings agree."""
    from dataclasses import fields

    from sal_ros.pretrain.teachers import build_teacher
    from sal_ros.pseudolabel.lifting import LiftConfig, lidar_spacing_for
    from sal_ros.pseudolabel.mask_sources import build_mask_source, mask_source_identity

    opts = {k: v for k, v in (spec.get("lift") or {}).items() if k in {f.name for f in fields(LiftConfig)}}
    lift = LiftConfig(**{**opts, "lidar_spacing_deg": tuple(opts.get("lidar_spacing_deg",
                                                                    lidar_spacing_for(source_kind)))})
    label_lut, num_classes = None, 0
    if (spec.get("teacher") or {}).get("kind") == "oracle":
        from sal_ros.data.labels import get_label_set

        labels = get_label_set(spec.get("label_set", "semantickitti"))
        label_lut, num_classes = labels.lut, labels.num_classes
    teacher = build_teacher(spec.get("teacher"), label_lut, num_classes, lift)
    superpixels = None
    if spec.get("superpixels"):
        sp = dict(spec["superpixels"])
        superpixels = build_mask_source(sp.pop("kind"), **sp)
    settings = {"teacher": teacher.identity, "lift": vars(lift),
                "superpixels": mask_source_identity(superpixels) if superpixels else None}
    if spec.get("pose_frame"):  # bags: poses read from /tf in this frame; another frame redoes the files
        settings["pose_frame"] = spec["pose_frame"]
    return CacheTools(teacher, superpixels, lift, settings)


_WORKER: dict = {}  # per Ray actor: the source and the tools, built once


def _init_worker(source_path: str, spec: dict, out_dir: str, threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    from sal_ros.data.sources import FrameSource

    if spec.get("device", "cpu").startswith("cuda"):  # the one GPU Ray made visible, whatever index was asked
        spec = {**spec, "teacher": {**spec["teacher"], "device": spec["device"]}}
    source = FrameSource(source_path)
    _WORKER.update(source=source, tools=cache_tools(spec, source.kind), poses=spec.get("poses") or {},
                   out=Path(out_dir))


def _cache_key(key: str) -> tuple[str, str | None]:
    try:
        pose = _WORKER["poses"].get(key)
        write_frame(_WORKER["source"], key, _WORKER["out"], _WORKER["tools"], None if pose is None else np.array(pose))
        return key, None
    except (SensorDataError, ValueError, KeyError, OSError) as exc:
        return key, f"{type(exc).__name__}: {exc}"


@dataclass
class _Workers:
    workers: int = 0  # actors the cluster placed (ray_backend counts them)


def build_cache_ray(source, keys: list[str], folder: str | Path, spec: dict, settings: dict, poses: dict | None,
                    workers: int = 1, address: str | None = None, progress: bool = True) -> dict:
    """``build_cache`` on Ray actors (a private local instance, or the cluster at ``address``); the folder and the
    source must be on a filesystem every node mounts at the same path. Raises SensorDataError naming the frames
    that failed, after the others are written."""
    from tqdm import tqdm

    from sal_ros.pseudolabel import ray_backend

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = pending(keys, folder, settings)
    poses = poses or {}
    job = {**spec, "device": (spec.get("teacher") or {}).get("device", "cpu"),  # the GPU a worker reserves
           "poses": {k: np.asarray(poses[k]).tolist() for k in todo if k in poses}}
    placed, failed = _Workers(), {}
    if todo:
        args = (str(Path(source.path).resolve()), job, str(folder.resolve()))
        results = ray_backend.label(todo, args, workers, address, placed, _init_worker, _cache_key)
        for key, error in tqdm(results, total=len(todo), desc="teacher cache (ray)", unit="frame",
                               disable=not progress):
            if error is not None:
                failed[key] = error
                log.error("frame %s failed: %s", key, error)
    if failed:
        raise SensorDataError(f"teacher cache: {len(failed)} frames failed ({'; '.join(failed.values())})")
    return {"frames": len(keys), "computed": len(todo), "reused": len(keys) - len(todo), "workers": placed.workers}


def frame_poses(source, pose_frame: str) -> tuple[dict[str, np.ndarray], str | None]:
    """Lidar-to-world pose per frame key of a FrameSource, for Seal's temporal term: SemanticKITTI's poses.txt, a
    bag's /tf in ``pose_frame`` at each cloud stamp, the poses a FrameStore's recorder stored in ``pose_frame``.
    Returns (poses, None) or (the poses found, why others have none): a missing pose is said, never skipped
    silently."""
    if source.kind == "semantickitti":
        poses = semantickitti_poses(source.path)
        return poses, None if poses else "no poses.txt in the sequence folder"
    if source.kind == "bag":
        from sal_ros.data.bag import bag_poses

        return bag_poses(source.path, pose_frame)
    if source.kind == "framestore":
        from sal_ros.data.framestore import framestore_poses

        return framestore_poses(source.path, pose_frame)
    return {}, (f"{source.kind} frames carry no poses (only SemanticKITTI's poses.txt, a bag's /tf and a "
                "recorder's FrameStore do)")


__all__ = ["build_cache", "build_cache_ray", "cache_tools", "CacheTools", "load_entry", "load_meta", "cache_path",
           "frame_entry", "frame_poses", "settings_hash"]
