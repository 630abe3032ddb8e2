"""The one inference path: points in, Segmentation out (the ROS node, evaluation and benches all use it).

``Segmenter.segment(points, intensity)`` admits the cloud under its SegmenterConfig (sal_ros.core.cloud_input:
non-finite and far points left out, intensity rescaled to the checkpoint's scale, clouds over ``max_points`` on a
fixed random subset or rejected), runs voxelize -> backbone -> decoder (last layer only) -> fusion and
classification, and returns arrays aligned with the input (label 0 for dropped points), with per-stage timings.
The vocabulary's text embeddings (``set_embeddings``) and the settings (``configure``) each swap atomically
between two calls; a call in flight finishes with those it started with. When CUDA runs out of memory the cloud
is retried on a random half of its points (twice at most); points that did not run take the fusion result of
their nearest point that ran. ``score_threshold`` and ``min_points`` are applied after that, once, to every
point: the node and evaluation apply no threshold of their own.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sal_ros.core.cloud_input import (CloudInput, ConfiguredSegmenter, SegmenterConfig, fixed_subset,
                                      spread_nearest)
from sal_ros.core.panoptic import panoptic_from_queries
from sal_ros.core.types import Segmentation
from sal_ros.model.checkpoint import ModelError, load_checkpoint, read_checkpoint
from sal_ros.model.errors import NonFiniteOutputError
from sal_ros.model.inference import class_similarity, fuse_queries, rank_classes
from sal_ros.model.runtime import cpu_bf16
from sal_ros.model.sal import ModelConfig, SALModel
from sal_ros.model.text_encoder import TextEmbeddings, TextEncoder
from sal_ros.model.vocabulary import Vocabulary

log = logging.getLogger(__name__)

OOM_RETRIES = 2
WARM_UP_POINTS = 120_000  # a 64-beam scan (SemanticKITTI's have 124k)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Segmenter(ConfiguredSegmenter):
    def __init__(self, model: SALModel, device: str = "cpu", text_embeddings: TextEmbeddings | None = None,
                 config: SegmenterConfig | None = None, amp: bool = True) -> None:
        """``config``: the per-frame settings (default: SegmenterConfig()). ``amp``: bfloat16 autocast on
        CUDA, and on a CPU with native bf16 (AMX / AVX512-BF16) for models wide enough to gain from it
        (sal_ros.model.runtime.cpu_bf16; float32 elsewhere); the sparse conv still sums in float32. Both paths are
        deterministic."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._config = config or SegmenterConfig()
        self.amp = amp and (self.device.type == "cuda" or (self.device.type == "cpu" and cpu_bf16(model.config)))
        self._lock = threading.Lock()
        self._active: tuple[TextEmbeddings, torch.Tensor, torch.Tensor] | None = None
        if text_embeddings is not None:
            self.set_embeddings(text_embeddings)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path | None, device: str, text_encoder: TextEncoder, **kwargs: Any) -> "Segmenter":
        """Model of a checkpoint; ``None``: the tiny preset with fixed random weights (plumbing only). A semantic
        checkpoint (``objective: semantic``) gives a model.semantic_model.SemanticSegmenter, which runs the same way."""
        from sal_ros.model.semantic_model import SemanticSegmenter, is_semantic_checkpoint

        if path is not None and is_semantic_checkpoint(path):
            return SemanticSegmenter.from_checkpoint(path, device, **kwargs)
        if path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = SALModel(ModelConfig.preset("tiny", token_dim=text_encoder.embed_dim)).eval()
        else:
            model, meta = load_checkpoint(path, map_location="cpu", text_encoder=text_encoder)
            recorded = (meta.get("text_encoder") or {}).get("identity")
            if recorded and recorded != text_encoder.identity:
                log.warning("checkpoint %s was trained with text encoder %s, running with %s: classes may be wrong",
                            path, recorded, text_encoder.identity)
        return cls(model, device, **kwargs)

    @classmethod
    def from_files(cls, checkpoint: str | Path, vocabulary: str | Path | Vocabulary | Sequence[str],
                   device: str = "cpu", text_encoder: TextEncoder | None = None, **kwargs: Any) -> "Segmenter":
        """Checkpoint + vocabulary (YAML path, Vocabulary or prompt list), embedded with the text encoder the
        checkpoint records (or ``text_encoder``)."""
        if text_encoder is None:
            record = read_checkpoint(checkpoint).get("text_encoder")
            if record is None:
                log.warning("%s does not record its text encoder: using ViT-B-16 with seeded random weights "
                            "(the training default)", checkpoint)
                record = {"model": "ViT-B-16", "pretrained": None}
            text_encoder = TextEncoder(record["model"], record.get("pretrained"), device)
        if isinstance(vocabulary, (str, Path)):
            vocabulary = Vocabulary.from_yaml(vocabulary)
        segmenter = cls.from_checkpoint(checkpoint, device, text_encoder, **kwargs)
        segmenter.set_embeddings(text_encoder.encode(vocabulary))
        return segmenter

    # ------------------------------------------------------------------------------------------ vocabulary
    def set_embeddings(self, text_embeddings: TextEmbeddings) -> None:
        """Swap the vocabulary; thread-safe, takes effect from the next ``segment`` call."""
        if text_embeddings.dim != self.model.token_dim:
            raise ModelError(f"text embeddings are {text_embeddings.dim}-d ({text_embeddings.encoder}) but the model "
                             f"predicts {self.model.token_dim}-d tokens")
        emb = torch.from_numpy(np.ascontiguousarray(text_embeddings.embeddings)).to(self.device)
        rows = torch.from_numpy(np.ascontiguousarray(text_embeddings.row_class)).to(self.device)
        with self._lock:
            self._active = (text_embeddings, emb, rows)

    @property
    def text_embeddings(self) -> TextEmbeddings | None:
        return None if self._active is None else self._active[0]

    # ------------------------------------------------------------------------------------------ inference
    def run(self, cloud: CloudInput) -> Segmentation:
        """The model on an admitted cloud (``admit``), under the settings it was admitted with.

        ``score_threshold`` and ``min_points`` apply here and only here, to the whole cloud: a subsampled run's
        fusion result is first spread to every valid point, so the instances' point counts and boxes describe
        exactly the points that carry their label."""
        with self._lock:
            active = self._active
        if active is None:
            raise ModelError("no vocabulary: call set_embeddings(text_encoder.encode(vocabulary)) first")
        te, points, valid, config = active[0], cloud.points, cloud.valid, cloud.config
        if valid.size == 0:
            out = Segmentation.empty(len(points), te.class_names, te.version)
            out.dropped_points = cloud.dropped_points
            return out
        run, query, score, point_to_voxel, query_class, query_rank, timings = self._run_with_retries(
            points, cloud.intensity, cloud.run, active)
        t0 = time.perf_counter()
        every = valid.size == len(points)  # valid is then every point, in order
        if run.size < valid.size:
            query, score = spread_nearest(points, valid, run, query[point_to_voxel], score[point_to_voxel])
            point_to_voxel = None
        # fused per voxel and spread to the points through point_to_voxel (a voxel's points share its result)
        part = panoptic_from_queries(query, score, query_class, te.thing, points if every else points[valid],
                                     te.class_names, config.score_threshold, config.min_points, te.version,
                                     query_rank, point_to_cell=point_to_voxel)
        if every:  # the fusion's arrays are the output's (no zeros allocated per frame to be replaced)
            out = part
        else:
            out = Segmentation.empty(len(points), te.class_names, te.version)
            out.label[valid], out.instance[valid], out.score[valid] = part.label, part.instance, part.score
            out.instances = part.instances
        out.dropped_points = cloud.dropped_points
        timings["postprocess"] += (time.perf_counter() - t0) * 1e3
        out.timings_ms = timings
        return out

    def _run_with_retries(self, points: np.ndarray, intensity: np.ndarray | None, run: np.ndarray, active):
        """The model on ``points[run]``; out of CUDA memory, again on a random half (the run that worked is
        returned with its results)."""
        attempt = 0
        while True:
            try:
                whole = run.size == len(points)  # run is sorted and unique: every point, in order (no copy)
                pts = points if whole else points[run]
                inten = intensity if whole or intensity is None else intensity[run]
                return (run, *self._run(pts, inten, active))
            except RuntimeError as exc:
                if not _is_oom(exc) or self.device.type != "cuda":
                    raise
                torch.cuda.empty_cache()
                if attempt == OOM_RETRIES:
                    raise ModelError(f"out of GPU memory on {run.size} points after {OOM_RETRIES} retries with fewer "
                                     f"points; lower max_points or use a larger voxel_size") from exc
                attempt += 1
                log.warning("out of GPU memory on %d points, retrying on half of them", run.size)
                run = fixed_subset(run, run.size // 2)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _run(self, points: np.ndarray, intensity: np.ndarray | None, active):
        """Per voxel its best query and fused score, each point's voxel, the class of each query, its top classes
        (:func:`rank_classes`), and the stage timings."""
        te, emb, rows = active
        model = self.model
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            t0 = self._sync()
            p = torch.from_numpy(points).to(self.device)
            i = None if intensity is None else torch.from_numpy(intensity).to(self.device)
            vin = model.prepare(p, i)
            t1 = self._sync()
            feats = model.backbone(vin.voxels)
            t2 = self._sync()
            pred = model.decode(feats, 1, all_layers=False)[-1]
            t3 = self._sync()
            query_v, score_v = fuse_queries(pred.masks[0], pred.objectness[0])
            per_class = class_similarity(pred.tokens[0], emb, rows, te.num_classes)
            _check_finite(score_v, per_class)
            query_class = per_class.argmax(1)
            query_rank = rank_classes(per_class)
            query, score = query_v.cpu().numpy(), score_v.cpu().numpy()
            point_to_voxel, query_class = vin.point_to_voxel[0].cpu().numpy(), query_class.cpu().numpy()
        t4 = time.perf_counter()
        timings = {"voxelize": (t1 - t0) * 1e3, "backbone": (t2 - t1) * 1e3, "decoder": (t3 - t2) * 1e3,
                   "postprocess": (t4 - t3) * 1e3}
        return query, score, point_to_voxel, query_class, query_rank, timings


def warm_up(segmenter: ConfiguredSegmenter, points: int = WARM_UP_POINTS
            ) -> tuple[np.ndarray, np.ndarray, Segmentation]:
    """``segmenter`` (either kind) once on a synthetic scan of ``points`` points (at most its ``max_points``), so
    that the first real frame does not pay what a first call costs (lazy imports, kernel and allocator set-up,
    buffers sized to a real scan). The scan and its segmentation."""
    limit = segmenter.config.max_points
    xyz, intensity = synthetic_scan(min(points, limit) if limit > 0 else points)
    return xyz, intensity, segmenter.run(segmenter.admit(xyz, intensity))


def _check_finite(score: torch.Tensor, per_class: torch.Tensor) -> None:
    """NaN in the fused voxel scores (mask or objectness logits) or the class similarities (query tokens) would
    label every point 0 and still count as a processed frame: refuse the frame instead. Both are small (one value
    per voxel, per query and class) and NaN reaches them from any NaN logit (max and amax propagate it)."""
    bad = [name for name, t in (("mask/objectness scores", score), ("class similarities", per_class))
           if bool(torch.isnan(t).any())]
    if bad:
        raise NonFiniteOutputError(bad)


def synthetic_scan(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points shaped like a spinning lidar's scan (64 rings over 360 degrees, a ground plane at -1.7 m and
    walls 5-40 m away), with intensities in 0..1: a stand-in of realistic size and voxel count for warm-up."""
    rng = np.random.default_rng(seed)
    elevation = np.deg2rad(rng.uniform(-24.8, 2.0, n))
    azimuth = rng.uniform(-np.pi, np.pi, n)
    wall = 5.0 + 35.0 * (0.5 + 0.5 * np.sin(3.0 * azimuth) ** 2)
    ground = np.where(elevation < -0.02, 1.73 / np.maximum(-np.tan(elevation), 1e-3), np.inf)
    r = np.minimum(wall, ground) + rng.normal(0.0, 0.02, n)
    xyz = np.stack([r * np.cos(elevation) * np.cos(azimuth), r * np.cos(elevation) * np.sin(azimuth),
                    r * np.sin(elevation)], 1).astype(np.float32)
    return xyz, rng.random(n, dtype=np.float32)


__all__ = ["Segmenter", "synthetic_scan", "warm_up", "NonFiniteOutputError"]
