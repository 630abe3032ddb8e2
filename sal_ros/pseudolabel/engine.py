"""The pseudo-label engine: frames (lidar + cameras + calibration) -> per-point pseudo-instances with CLIP tokens.

Per frame (``PseudoLabeler.label_frame``):

1. per camera: 2D masks (SAM 2 / SAM / SLIC), flattened (whole objects over parts); optionally voted over K
   augmented copies of the image (``augment``, augmentation.py);
2. per camera: one CLIP token per mask (MaskCLIP relative mask attention by default);
3. per camera: lift masks onto the points that project into the image (occlusion test optional);
4. fuse cameras (instances that agree where two cameras overlap become one; area-weighted tokens);
5. DBSCAN replace over the points in the camera frustums (SAL's refinement);
6. drop instances with fewer than ``min_points`` points and renumber 1..K.

Runs (``run``) go over a frame source (a FrameStore folder, a SemanticKITTI sequence, a nuScenes sample folder),
write one file per frame atomically, skip frames already written (resume), and fan out over worker processes
(``backend="local"``) or Ray actors on a private instance or a running cluster (``backend="ray"``, ray_backend.py).
Several runs may write one folder at once (other nodes, other frame sets): a finished file is only ever replaced
whole, and a run removes only temporary files no writer can still be writing (``remove_stale_temp_files``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sal_ros.core.errors import SensorDataError
from sal_ros.core.files import TMP_PREFIX
from sal_ros.data.pseudolabels import PseudoLabels, load_pseudolabels, pseudolabel_path, save_pseudolabels
from sal_ros.data.sources import FrameSource
from sal_ros.pseudolabel import ray_backend  # imports ray only when a Ray run connects
from sal_ros.pseudolabel.augmentation import AugmentConfig, augmented
from sal_ros.pseudolabel.fusion import CameraLift, fuse_cameras
from sal_ros.pseudolabel.lifting import LiftConfig, in_image, lift_labels, point_pixels
from sal_ros.pseudolabel.mask_sources import build_mask_source, mask_source_identity
from sal_ros.pseudolabel.masks import Masks, flatten_masks
from sal_ros.pseudolabel.refine import RefineConfig, compact, dbscan_refine

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    masks: str = "sam2"  # slic | sam | sam2 | sam2_lidar | geometric (mask_sources.py)
    mask_options: dict = field(default_factory=dict)  # passed to the mask source (checkpoint, config, ...)
    flatten_overlap: float = 0.8  # SAL flatten: drop a mask inside a kept one above this overlap
    augment: dict = field(default_factory=dict)  # AugmentConfig (augmentation.py): masks voted over K augmentations
    tokens: bool = True
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = None
    token_method: str = "mask_attention"
    token_options: dict = field(default_factory=dict)
    lift: LiftConfig = field(default_factory=LiftConfig)
    fusion_iou: float = 0.3
    refine: RefineConfig | None = field(default_factory=RefineConfig)
    min_points: int = 5
    device: str = "cpu"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lift"] = asdict(self.lift)
        d["refine"] = asdict(self.refine) if self.refine is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        d = dict(d)
        lift = d.pop("lift", None) or {}
        refine = d.pop("refine", "default")
        cfg = cls(**d)
        spacing = tuple(lift.get("lidar_spacing_deg", LiftConfig.lidar_spacing_deg))  # JSON gives a list
        cfg.lift = LiftConfig(**{**lift, "lidar_spacing_deg": spacing})
        cfg.refine = None if refine is None else RefineConfig() if refine == "default" else RefineConfig(**refine)
        return cfg

    def config_hash(self) -> str:
        """What decides the labels (not where they run): changes here make old files stale."""
        d = self.to_dict()
        d.pop("device")
        if not AugmentConfig.from_dict(d["augment"]).enabled:  # off: the hash of the files made before it existed
            d.pop("augment")
        else:
            d["augment"] = AugmentConfig.from_dict(d["augment"]).to_dict()
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def label_from_masks(frame, masks: dict[str, Masks], tokens: dict[str, np.ndarray] | None = None,
                     lift: LiftConfig = LiftConfig(), fusion_iou: float = 0.3, refine: RefineConfig | None = None,
                     min_points: int = 1, token_dim: int = 0, meta: dict | None = None,
                     timings: dict | None = None) -> PseudoLabels:
    """Steps 3-6 for given (already flattened) masks per camera; tokens per camera are (M, D) or absent."""
    t0 = time.perf_counter()
    n = frame.num_points
    names = [name for name in frame.cameras if name in masks]
    lifts = []
    for name in names:
        view, m = frame.cameras[name], masks[name]
        px = point_pixels(frame.points, view, lift)
        mask_id, seen = lift_labels(px, m, n)
        tok = tokens[name] if tokens is not None else np.zeros((len(m), token_dim), np.float32)
        lifts.append(CameraLift(name, mask_id, seen, in_image(px, n), tok, m.scores, m.areas))
    t1 = time.perf_counter()
    fused = fuse_cameras(lifts, n, fusion_iou)
    t2 = time.perf_counter()
    instance = fused.instance
    if refine is not None:
        instance = dbscan_refine(frame.points, instance, fused.in_frustum, refine)
    instance, kept = compact(instance, min_points)
    t3 = time.perf_counter()
    rows = kept - 1
    if timings is not None:
        timings.update(lift_ms=1e3 * (t1 - t0), fuse_ms=1e3 * (t2 - t1), refine_ms=1e3 * (t3 - t2))
    meta = {**(meta or {}), "camera_names": names, "key": frame.key, "stamp_ns": int(frame.stamp_ns),
            "missing_cameras": list(frame.missing_cameras)}
    return PseudoLabels(instance, fused.tokens[rows].astype(np.float16), fused.scores[rows], fused.cameras[rows],
                        fused.in_frustum, meta)


class PseudoLabeler:
    """Holds the 2D models (built once per process) and labels frames."""

    def __init__(self, config: EngineConfig, mask_source=None, token_encoder=None) -> None:
        self.config = config
        self.mask_source = augmented(mask_source or build_mask_source(config.masks, **self._mask_kwargs()),
                                     AugmentConfig.from_dict(config.augment), config.flatten_overlap)
        self.token_encoder = token_encoder
        if self.token_encoder is None and config.tokens:
            from sal_ros.pseudolabel.clip_tokens import ClipTokenEncoder

            self.token_encoder = ClipTokenEncoder(config.clip_model, config.clip_pretrained, device=config.device,
                                                  method=config.token_method, **config.token_options)
        self.meta = {"mask_source": mask_source_identity(self.mask_source),
                     "clip": getattr(self.token_encoder, "identity", None),
                     "config": config.to_dict(), "config_hash": config.config_hash()}

    def _mask_kwargs(self) -> dict:
        kw = dict(self.config.mask_options)
        if self.config.masks in ("sam", "sam2", "sam2_lidar"):
            kw.setdefault("device", self.config.device)
        if self.config.masks == "sam2_lidar":
            kw.setdefault("lift", asdict(self.config.lift))
        if self.config.masks == "geometric":  # renders its clusters where lifting will look for them
            kw.setdefault("min_depth", self.config.lift.min_depth)
        return kw

    @property
    def token_dim(self) -> int:
        return self.token_encoder.dim if self.token_encoder is not None else 0

    def masks_and_tokens(self, frame, timings: dict | None = None) -> tuple[dict, dict]:
        masks, tokens = {}, {}
        t_mask = t_tok = 0.0
        t0 = time.perf_counter()
        whole = getattr(self.mask_source, "generate_for_frame", None)  # all cameras at once (oracle.py)
        per_frame = whole(frame) if whole is not None else None
        t_mask += time.perf_counter() - t0
        for name, view in frame.cameras.items():
            t0 = time.perf_counter()
            gen = getattr(self.mask_source, "generate_for_view", None)  # sources prompted by the lidar (amml.py)
            raw = per_frame[name] if per_frame is not None else \
                gen(frame.points, view) if gen is not None else self.mask_source.generate(view.image)
            m = flatten_masks(raw, self.config.flatten_overlap)
            t1 = time.perf_counter()
            masks[name] = m
            if self.token_encoder is not None:
                tokens[name] = self.token_encoder.encode(view.image, m)
            t_mask, t_tok = t_mask + t1 - t0, t_tok + time.perf_counter() - t1
        if timings is not None:
            timings.update(masks_ms=1e3 * t_mask, tokens_ms=1e3 * t_tok)
        return masks, tokens

    def label_frame(self, frame) -> PseudoLabels:
        frame, left_out = usable_cameras(frame)
        timings: dict = {}
        masks, tokens = self.masks_and_tokens(frame, timings)
        c = self.config
        pl = label_from_masks(frame, masks, tokens if self.token_encoder is not None else None, c.lift,
                              c.fusion_iou, c.refine, c.min_points, self.token_dim, self.meta, timings)
        pl.meta["timings_ms"] = {k: round(v, 2) for k, v in timings.items()}
        if left_out:
            pl.meta["cameras_left_out"] = left_out
        return pl


def usable_cameras(frame):
    """The frame with only the cameras whose image its calibration describes, and {camera: why} for the others
    (an empty image, or one of another size than the calibration: the node and the recorder leave them out for
    the same reasons). No usable camera: SensorDataError naming each reason, so the frame fails by name."""
    from dataclasses import replace

    from sal_ros.core.camera import image_size_problem

    left_out = {}
    for name, view in frame.cameras.items():
        problem = image_size_problem(view.image, view.camera)
        if problem is not None:
            left_out[name] = f"{problem[0]}: {problem[1]}"
            log.warning("frame %s: camera %s left out (%s)", frame.key, name, left_out[name])
    key = frame.key or frame.stamp_ns
    if not frame.cameras:
        raise SensorDataError(f"frame {key}: no camera images to label from")
    if len(left_out) == len(frame.cameras):
        reasons = "; ".join(f"{n}: {why}" for n, why in left_out.items())
        raise SensorDataError(f"frame {key}: no usable camera image ({reasons})")
    if left_out:
        frame = replace(frame, cameras={n: v for n, v in frame.cameras.items() if n not in left_out})
    return frame, left_out


# --- runs --------------------------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    total: int
    skipped: int  # already done before this run
    done: int  # written by this run
    failed: dict[str, str]  # key -> error
    out_dir: str
    seconds: float
    workers: int = 0  # worker processes that labeled (Ray: the actors the cluster could place)


# A pseudo-label file is written in well under a second (the write keeps its mtime fresh); a temporary file untouched
# this long has no live writer. Age, not a PID: on a shared filesystem the writer may run on another node.
STALE_TEMP_S = 600.0


def remove_stale_temp_files(folder: str | Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Remove the temporary files that killed writers left in ``folder``, never one another run is writing; how many.

    The clocks of the nodes sharing the folder must agree to well within ``older_than_s`` (NTP)."""
    now, removed = time.time(), 0
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # its writer renamed it, or another run removed it first
            continue
    return removed


def pending_keys(keys: list[str], out_dir: Path, config_hash: str, overwrite: bool, read_hash=None) -> list[str]:
    """Keys without a finished file; a finished file from another configuration is an error (or redone).
    ``read_hash(path)``: the config hash a finished file records (default: an instance pseudo-label file)."""
    read_hash = read_hash or (lambda path: load_pseudolabels(path).meta.get("config_hash"))
    todo = []
    for key in keys:
        path = pseudolabel_path(out_dir, key)
        if not path.exists() or overwrite:
            todo.append(key)
            continue
        try:
            old = read_hash(path)
        except SensorDataError as exc:
            log.warning("redoing %s: %s", key, exc)
            todo.append(key)
            continue
        if old != config_hash:
            raise SensorDataError(f"{path} was made with another configuration ({old} != {config_hash}); "
                                  "use another --out or --overwrite")
    return todo


# Worker-process state: the labeler is built once per process, not per frame.
_WORKER: dict = {}


def _init_worker(source_path: str, config: dict, out_dir: str, threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    source = FrameSource(source_path)
    if config.get("kind") == "semantic":  # sal-ros pseudolabel --semantic (pseudolabel/semantic_labeler.py)
        from sal_ros.pseudolabel.semantic_labeler import SemanticConfig, SemanticLabeler

        labeler = SemanticLabeler(SemanticConfig.from_dict(config), source)
    else:
        labeler = PseudoLabeler(EngineConfig.from_dict(config))
    _WORKER.update(source=source, labeler=labeler, out=Path(out_dir))


def _label_key(key: str) -> tuple[str, str | None]:
    try:
        frame = _WORKER["source"].load(key)
        labeler = _WORKER["labeler"]
        getattr(labeler, "save_result", save_pseudolabels)(pseudolabel_path(_WORKER["out"], key), labeler.label_frame(frame))
        return key, None
    except (SensorDataError, ValueError, KeyError, OSError) as exc:
        return key, f"{type(exc).__name__}: {exc}"


def run(source_path: str | Path, config: EngineConfig, out_dir: str | Path | None = None, workers: int = 1,
        backend: str = "local", overwrite: bool = False, max_frames: int | None = None,
        progress: bool = True, ray_address: str | None = None, select: str | None = None) -> RunSummary:
    """Label every frame of a dataset folder that has no finished file yet (of the ``select``ed ones: workers
    get the keys, so they open the whole source).

    ``ray_address`` (backend "ray"): None = $RAY_ADDRESS, else a private local instance; "auto" or HOST:PORT
    joins a running cluster."""
    t0 = time.perf_counter()
    source = FrameSource(source_path, select)
    out = Path(out_dir) if out_dir is not None else source.default_out
    if out is None:
        raise ValueError(f"{source_path} is a raw {source.kind} folder: pass --out DIR (its folder is left untouched)")
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temp_files(out)
    if removed:
        log.info("removed %d partial files of killed runs in %s", removed, out)
    keys = source.keys()[:max_frames] if max_frames else source.keys()
    todo = pending_keys(keys, out, config.config_hash(), overwrite, getattr(config, "read_config_hash", None))
    summary = RunSummary(len(keys), len(keys) - len(todo), 0, {}, str(out), 0.0)
    if todo:
        # Absolute: Ray workers do not run in the driver's working directory (nor on its machine).
        args = (str(source.path.resolve()), config.to_dict(), str(out.resolve()))
        results = _run_ray(todo, args, workers, ray_address, summary) if backend == "ray" else \
            _run_local(todo, args, workers, summary)
        try:
            for key, error in _progress(results, len(todo), progress, f"pseudolabel {source.path.name}"):
                if error is None:
                    summary.done += 1
                else:
                    summary.failed[key] = error
                    log.error("frame %s failed: %s", key, error)
        finally:
            remove_stale_temp_files(out)
    summary.seconds = time.perf_counter() - t0
    return summary


def _progress(results, total: int, enabled: bool, desc: str):
    if not enabled:
        return results
    from tqdm import tqdm

    return tqdm(results, total=total, desc=desc, unit="frame")


def _run_local(todo: list[str], args: tuple, workers: int, summary: RunSummary):
    summary.workers = max(workers, 1)
    if workers <= 1:
        _init_worker(*args, 0)
        for key in todo:
            yield _label_key(key)
        return
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: torch and fork do not mix; each worker builds its own models once.
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(*args, threads)) as pool:
        yield from pool.imap_unordered(_label_key, todo)


def _run_ray(todo: list[str], args: tuple, workers: int, address: str | None, summary: RunSummary):
    yield from ray_backend.label(todo, args, workers, address, summary, _init_worker, _label_key)
