"""The SAL student: MinkUNet backbone + query decoder, per-point outputs through the voxel inverse map.

``SALModel(config)(points, intensity)`` takes a batch of clouds (a list of ``(N_b, 3)`` tensors, or one tensor)
and returns, per decoder layer, ``{"masks": [(Q, N_b)], "objectness": [(Q, 2)], "tokens": [(Q, D)]}`` as
sal_ros.train.losses expects. Inference uses the stages on their own (``prepare``, ``backbone``, ``decode``)
and fuses at voxel level (points of one voxel share every output). In eval mode the forward pass is
deterministic on CPU (no random draws; ``max_keys`` subsampling only happens in training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from sal_ros.model.backbone import build_backbone, count_parameters
from sal_ros.model.config import PRESETS, ModelConfig
from sal_ros.model.decoder import OBJECT, LayerPrediction, QueryDecoder
from sal_ros.model.sparse import SparseTensor, voxelize


@dataclass
class VoxelInput:
    voxels: SparseTensor  # stride-1 voxels of the whole batch, rows sorted by batch index
    point_to_voxel: list[Tensor]  # per batch element (N_b,) rows into that element's voxels
    num_voxels: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.num_voxels)


def _as_batch(points, intensity) -> tuple[list[Tensor], list[Tensor | None]]:
    if isinstance(points, Tensor):
        points = [points]
    points = list(points)
    if intensity is None or isinstance(intensity, Tensor):
        intensity = [intensity] * len(points) if intensity is None else [intensity]
    intensity = list(intensity)
    if len(intensity) != len(points):
        raise ValueError(f"{len(points)} clouds but {len(intensity)} intensity arrays")
    return points, intensity


class SALModel(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.backbone = build_backbone(self.config)  # the family config.backbone names
        self.decoder = QueryDecoder(self.config, self.backbone.out_widths)

    @property
    def token_dim(self) -> int:
        return self.config.decoder.token_dim

    def point_features(self, points: Tensor, intensity: Tensor | None) -> Tensor:
        """(N, in_channels): xyz and range divided by ``coord_scale``, intensity by ``intensity_scale``."""
        cfg = self.config.input
        if intensity is None:
            intensity = points.new_zeros(len(points))
        out = points.new_empty(len(points), cfg.in_channels)  # columns written in place: torch.cat cost 0.4 ms
        torch.div(points, cfg.coord_scale, out=out[:, :3])
        torch.nan_to_num(intensity.to(points.dtype), nan=0.0, posinf=0.0, neginf=0.0, out=out[:, 3])
        out[:, 3].div_(cfg.intensity_scale)
        if cfg.in_channels == 5:  # the range; squares summed by one matrix-vector product: 2.5x vector_norm's speed
            ones = points.new_ones(3)
            torch.div(torch.mv(points.square(), ones).sqrt_(), cfg.coord_scale, out=out[:, 4])
        return out

    def prepare(self, points: Sequence[Tensor] | Tensor, intensity=None) -> VoxelInput:
        """Voxelize a batch of clouds: voxel features are the mean of their points' input features."""
        points, intensity = _as_batch(points, intensity)
        for b, p in enumerate(points):
            if p.ndim != 2 or p.shape[1] != 3 or len(p) == 0:
                raise ValueError(f"cloud {b}: expected a non-empty (N, 3) tensor, got {tuple(p.shape)}")
        if len(points) == 1:  # one cloud, as inference runs: no concatenated copies, no batch column
            xyz = points[0].float()
            voxels, p2v = voxelize(xyz, None, self.config.input.voxel_size, self.point_features(xyz, intensity[0]))
            return VoxelInput(voxels, [p2v], [len(voxels.coords)])
        xyz = torch.cat([p.float() for p in points])
        feats = torch.cat([self.point_features(p.float(), i) for p, i in zip(points, intensity)])
        batch = torch.cat([torch.full((len(p),), b, dtype=torch.int64, device=xyz.device) for b, p in enumerate(points)])
        voxels, p2v = voxelize(xyz, batch, self.config.input.voxel_size, feats)
        num_voxels = torch.bincount(voxels.coords[:, 0].long(), minlength=len(points)).tolist()
        offsets = [sum(num_voxels[:b]) for b in range(len(points))]
        per_cloud = [rows - off for rows, off in zip(p2v.split([len(p) for p in points]), offsets)]
        return VoxelInput(voxels, per_cloud, num_voxels)

    def decode(self, feats: dict[int, SparseTensor], batch_size: int, all_layers: bool = True) -> list[LayerPrediction]:
        return self.decoder(feats, batch_size, all_layers)

    @staticmethod
    def to_points(pred: LayerPrediction, vin: VoxelInput) -> dict[str, list[Tensor]]:
        """Voxel masks -> per-point masks through the inverse map."""
        return {"masks": [m[:, p2v] for m, p2v in zip(pred.masks, vin.point_to_voxel)],
                "objectness": list(pred.objectness.unbind(0)), "tokens": list(pred.tokens.unbind(0))}

    def forward(self, points, intensity=None, all_layers: bool = True) -> list[dict[str, list[Tensor]]]:
        vin = self.prepare(points, intensity)
        preds = self.decode(self.backbone(vin.voxels), vin.batch_size, all_layers)
        return [self.to_points(p, vin) for p in preds]

    def num_parameters(self) -> dict[str, int]:
        return {"backbone": count_parameters(self.backbone), "decoder": count_parameters(self.decoder)}


__all__ = ["SALModel", "ModelConfig", "PRESETS", "VoxelInput", "OBJECT"]
