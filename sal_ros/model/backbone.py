"""Minkowski U-Net backbone (MinkUNet18/34 layout of SPVNAS/torchsparse) on sparse voxels, and the model config.

Encoder: a stem at stride 1, then four stages, each a 2x2x2 stride-2 conv followed by residual blocks, reaching
strides 2, 4, 8, 16. Decoder: four stages, each a 2x2x2 transposed conv back to the finer stride, concatenation
with the encoder's skip at that stride, then residual blocks. Every stage's output is kept, so the query
decoder can cross-attend to several scales and predict masks on the stride-1 features.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from sal_ros.core.settings import known_settings
from sal_ros.model.sparse import Conv3d, SparseTensor, Workspace, cat_feats

ENCODER_STRIDES = (2, 4, 8, 16)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the SAL model's architecture; stored in checkpoints as a plain dict.

    Defaults (preset ``minkunet34``, 37.9 M backbone + 3.9 M decoder parameters): MinkUNet34 encoder depths,
    SPVNAS widths, a Mask4Former-like decoder with SAL's 300 queries, Mask4Former's 0.05 m voxels (a 124.7k-point
    HDL-64 scan gives ~92k voxels; the whole model runs on it in ~5 s on two CPU cores, so no coarser default
    is needed for CPU demos). ``minkunet18`` is the SPVNAS reference (21.7 M backbone parameters).
    Cross-attention goes to strides 16, 8, 4 and masks are predicted at stride 1, as Mask2Former attends to
    1/32..1/8 and predicts masks at 1/4: the finest levels would make attention cost Q x 90k per layer.
    """

    in_channels: int = 5  # per point: x y z (scaled), intensity (scaled), range (scaled); 4 drops range
    voxel_size: float = 0.05  # metres (Mask4Former)
    coord_scale: float = 50.0  # metres mapped to 1.0 in the input features
    intensity_scale: float = 1.0  # sensor intensity mapped to 1.0 (SemanticKITTI 1, nuScenes/Ouster 255)
    stem_width: int = 32
    widths: tuple[int, ...] = (32, 64, 128, 256)  # encoder stages at strides 2, 4, 8, 16
    blocks: tuple[int, ...] = (2, 3, 4, 6)  # residual blocks per encoder stage (MinkUNet34)
    decoder_widths: tuple[int, ...] = (256, 128, 96, 96)  # decoder stages at strides 8, 4, 2, 1
    decoder_blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_queries: int = 300  # SAL: 100 -> 300 queries raised stuff PQ 47.8 -> 58.3
    hidden_dim: int = 128  # query / attention width (Mask4Former 128)
    mask_dim: int = 128  # width of the per-voxel mask features the query embeddings are dotted with
    decoder_rounds: int = 3  # each round visits every attention level once (Mask4Former: 3 rounds)
    attention_strides: tuple[int, ...] = (16, 8, 4)  # feature levels the queries cross-attend to, coarse first
    heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.0
    token_dim: int = 512  # must equal the CLIP text encoder's embed_dim (ViT-B-16: 512)
    max_keys: int = 0  # training only: cap on voxels per attention level (random subset; 0 = all)
    # Backbone family: "minkunet" (sparse conv, the fields above) or "waffleiron" (sal_ros.model.waffleiron:
    # 2D-grid projections, no sparse conv; the paper's SemanticKITTI setting: 0.5 m cells over +-64 m x +-64 m x +-8 m).
    backbone: str = "minkunet"
    waffle_depth: int = 48
    waffle_width: int = 256
    waffle_cell: float = 0.5  # metres per 2D grid cell
    waffle_extent: tuple[float, ...] = (64.0, 64.0, 8.0)  # half-size of the gridded box in x, y, z (metres)
    waffle_layer_scale: float = 0.1  # initial residual branch scale

    def __post_init__(self) -> None:
        for name in ("widths", "blocks", "decoder_widths", "decoder_blocks", "attention_strides"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "waffle_extent", tuple(float(v) for v in self.waffle_extent))
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if len(self.waffle_extent) != 3 or min(self.waffle_extent) <= 0 or not self.waffle_cell > 0 \
                or min(self.waffle_depth, self.waffle_width) < 1:
            raise ValueError("waffle_extent needs 3 positive half-sizes; waffle_cell, waffle_depth, waffle_width > 0")
        if self.in_channels not in (4, 5):
            raise ValueError(f"in_channels must be 4 (x y z intensity) or 5 (+ range), got {self.in_channels}")
        if len(self.widths) != 4 or len(self.blocks) != 4 or len(self.decoder_widths) != 4 \
                or len(self.decoder_blocks) != 4:
            raise ValueError("widths, blocks, decoder_widths and decoder_blocks need 4 entries (strides 2..16)")
        known = {16, 8, 4, 2, 1}
        if not self.attention_strides or not set(self.attention_strides) <= known:
            raise ValueError(f"attention_strides must be a non-empty subset of {sorted(known)}")
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be positive, got {self.voxel_size}")
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by heads {self.heads}")
        if min(self.num_queries, self.decoder_rounds, self.token_dim, self.mask_dim) < 1:
            raise ValueError("num_queries, decoder_rounds, token_dim and mask_dim must be positive")

    @classmethod
    def preset(cls, name: str | None = "minkunet34", **overrides: Any) -> "ModelConfig":
        """A named architecture with some fields overridden (``ModelConfig.preset("tiny", token_dim=768)``)."""
        name = name or "minkunet34"
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**known_settings(cls, d, "model"))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


BACKBONES = ("minkunet", "waffleiron")

PRESETS: dict[str, ModelConfig] = {
    "minkunet34": ModelConfig(),
    "minkunet18": ModelConfig(blocks=(2, 2, 2, 2)),
    # CPU-sized: tests, demos, smoke runs of the whole loop (0.42 M backbone parameters, ~0.1 s per scan on CPU).
    "tiny": ModelConfig(voxel_size=0.2, stem_width=16, widths=(16, 24, 32, 48), blocks=(1, 1, 1, 1),
                        decoder_widths=(32, 24, 16, 16), decoder_blocks=(1, 1, 1, 1), num_queries=32,
                        hidden_dim=32, mask_dim=32, decoder_rounds=1, attention_strides=(16, 8), heads=4,
                        ffn_dim=64),
}
# WaffleIron on 0.1 m voxels (the paper's downsampling): WI-48-256, the 24-layer setting of the indoor study, and
# a CPU-sized one with the tiny decoder.
PRESETS["waffleiron48"] = ModelConfig(backbone="waffleiron", voxel_size=0.1)
PRESETS["waffleiron24"] = ModelConfig(backbone="waffleiron", voxel_size=0.1, waffle_depth=24)
PRESETS["waffleiron_tiny"] = replace(PRESETS["tiny"], backbone="waffleiron", waffle_depth=6, waffle_width=32,
                                     waffle_cell=1.0)
# Real time on one CPU core (issue 25; chosen by `sal-ros bench model` and the held-out oracle protocol, table in
# docs/performance.md): tiny's layout on 0.5 m voxels (a 124.7k-point scan gives ~11.0k voxels instead of ~31.8k)
# with a narrower encoder and decoder: 0.6-0.7x tiny's CPU time on one thread (its per-point stages, voxelize and
# postprocess, are what is left). Held out, it kept 92 % of tiny's whole-scan PQ but 35-55 % of its PQ in the
# camera frustum; at 0.4 m it was no faster and scored lower.
PRESETS["realtime"] = replace(PRESETS["tiny"], voxel_size=0.5, stem_width=8, widths=(16, 16, 24, 32),
                              decoder_widths=(24, 16, 16, 16))


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone family ``cfg.backbone`` names; both return ``{stride: SparseTensor}`` with ``out_widths``."""
    if cfg.backbone == "waffleiron":
        from sal_ros.model.waffleiron import WaffleIron

        return WaffleIron(cfg)
    return MinkUNet(cfg)


# ------------------------------------------------------------------------------------------- layers
class BatchNorm(nn.BatchNorm1d):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace_feats(super().forward(x.feats))


class ReLU(nn.ReLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace_feats(super().forward(x.feats))


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, stride: int = 1, transposed: bool = False) -> nn.Sequential:
    return nn.Sequential(Conv3d(cin, cout, kernel_size, stride, transposed=transposed), BatchNorm(cout), ReLU(True))


class ResidualBlock(nn.Module):
    """Two 3x3x3 submanifold convs with a (1x1x1 projected where widths differ) identity shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(Conv3d(cin, cout, 3), BatchNorm(cout), ReLU(True), Conv3d(cout, cout, 3),
                                  BatchNorm(cout))
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(Conv3d(cin, cout, 1), BatchNorm(cout))
        self.relu = nn.ReLU(True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.body(x)
        return out.replace_feats(self.relu(out.feats + self.shortcut(x).feats))


def _blocks(cin: int, cout: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(cin if i == 0 else cout, cout) for i in range(n)])


class MinkUNet(nn.Module):
    """Returns ``{stride: SparseTensor}`` for strides 16 (bottleneck) and 8, 4, 2, 1 (decoder outputs).

    ``fused_inference`` (default on): in eval mode without autograd, every BatchNorm is folded into the conv
    before it (in each forward pass), ReLU and residual sums run in place, and features stay in the compute dtype
    (autocast's, else the input's) from layer to layer; convs use ``sparse_conv_inference``; submanifold kernel
    maps are walked along z (exact, also in training). Off, the modules run one by one on searched maps (the
    reference path of ``sal-ros bench model``), as when training."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fused_inference = True
        self.stem = nn.Sequential(conv_bn_relu(cfg.in_channels, cfg.stem_width), conv_bn_relu(cfg.stem_width, cfg.stem_width))
        self.down = nn.ModuleList()
        cin = cfg.stem_width
        skip_widths = [cfg.stem_width]
        for width, n in zip(cfg.widths, cfg.blocks):
            self.down.append(nn.Sequential(conv_bn_relu(cin, cin, 2, 2), _blocks(cin, width, n)))
            cin = width
            skip_widths.append(width)
        self.up_conv = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, (width, n) in enumerate(zip(cfg.decoder_widths, cfg.decoder_blocks)):
            skip = skip_widths[-2 - i]  # strides 8, 4, 2, 1
            self.up_conv.append(conv_bn_relu(cin, width, 2, 2, transposed=True))
            self.up_blocks.append(_blocks(width + skip, width, n))
            cin = width
        self.out_widths = {16: cfg.widths[-1], **{s: w for s, w in zip((8, 4, 2, 1), cfg.decoder_widths)}}

    def forward(self, x: SparseTensor) -> dict[int, SparseTensor]:
        x.cache.walk_columns = self.fused_inference
        if self.fused_inference and not self.training and not torch.is_grad_enabled() \
                and not self.stem[0][0]._uses_torchsparse(x):
            return self._forward_fused(x)
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        out = {16: skips[-1]}
        y = skips[-1]
        for i, (up, blocks) in enumerate(zip(self.up_conv, self.up_blocks)):
            y = blocks(cat_feats(up(y), skips[-2 - i]))
            out[y.stride] = y
        return out

    # -------------------------------------------------------------------------------- fused inference
    def _forward_fused(self, x: SparseTensor) -> dict[int, SparseTensor]:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.feats.dtype
        # Scratch shared by the convs of this pass, dropped after it (the outputs keep the cache).
        x.cache.workspace = Workspace() if device == "cpu" else None
        try:
            return self._fused_layers(x, dtype)
        finally:
            x.cache.workspace = None

    def _fused_layers(self, x: SparseTensor, dtype: torch.dtype) -> dict[int, SparseTensor]:
        with torch.autocast(x.device.type, enabled=False):
            y = x.replace_feats(x.feats.to(dtype))
            for layer in self.stem:
                y = self._conv_bn(layer, y, relu=True)
            skips = [y]
            for down, blocks in self.down:
                y = self._blocks(blocks, self._conv_bn(down, y, relu=True))
                skips.append(y)
            out = {16: y}
            for i, (up, blocks) in enumerate(zip(self.up_conv, self.up_blocks)):
                y = self._blocks(blocks, cat_feats(self._conv_bn(up, y, relu=True), skips[-2 - i]))
                out[y.stride] = y
        return out

    def _blocks(self, blocks: nn.Sequential, x: SparseTensor) -> SparseTensor:
        for block in blocks:
            shortcut = x.feats if isinstance(block.shortcut, nn.Identity) else \
                self._conv_bn(block.shortcut, x, relu=False).feats
            y = self._conv_bn(block.body[0:3], x, relu=True)
            x = self._conv_bn(block.body[3:5], y, relu=True, residual=shortcut)
        return x

    def _conv_bn(self, layers: nn.Sequential, x: SparseTensor, relu: bool, residual=None) -> SparseTensor:
        """``Conv3d, BatchNorm[, + residual][, ReLU]`` as one conv with the norm folded into its weight and bias."""
        conv = layers[0]
        weight, bias = self._folded_weights(conv, layers[1], x.feats.dtype)
        return conv.forward_inference(x, weight, bias, residual, relu)

    @staticmethod
    def _folded_weights(conv: Conv3d, bn: nn.BatchNorm1d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The conv's weight and bias with the eval-mode norm folded in, in ``dtype``. Folded again in every
        forward pass (about 2 % of minkunet34's backbone): a kept copy would go stale unseen, since running
        statistics updated by a training forward and writes through ``.data`` leave version counters alone."""
        exact = torch.promote_types(conv.kernel.dtype, torch.float32)  # fold in float32 at least
        scale = bn.weight.to(exact) * torch.rsqrt(bn.running_var.to(exact) + bn.eps)
        shift = bn.bias.to(exact) - bn.running_mean.to(exact) * scale
        if conv.bias is not None:
            shift = shift + conv.bias.to(exact) * scale
        return (conv.kernel.to(exact) * scale).to(dtype), shift.to(dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ModelConfig", "PRESETS", "BACKBONES", "build_backbone", "MinkUNet", "ResidualBlock", "BatchNorm", "ReLU", "count_parameters"]
