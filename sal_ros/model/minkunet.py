"""Minkowski U-Net backbone (MinkUNet18/34 layout of SPVNAS/torchsparse) on sparse voxels.

Encoder: a stem at stride 1, then four stages, each a 2x2x2 stride-2 conv followed by residual blocks, reaching
strides 2, 4, 8, 16. Decoder: four stages, each a 2x2x2 transposed conv back to the finer stride, concatenation
with the encoder's skip at that stride, then residual blocks. Every stage's output is kept, so the query
decoder can cross-attend to several scales and predict masks on the stride-1 features.
"""
from __future__ import annotations

import torch
from torch import nn

from sal_ros.model.sparse import SparseTensor, cat_feats, fused
from sal_ros.model.sparse.layers import conv_bn_relu, residual_blocks


class MinkUNet(nn.Module):
    """Returns ``{stride: SparseTensor}`` for strides 16 (bottleneck) and 8, 4, 2, 1 (decoder outputs); its
    settings are the config's ``minkunet`` section.

    ``fused_inference`` (default on): in eval mode without autograd, the layers run fused
    (``sal_ros.model.sparse.fused``: BatchNorm folded into the conv before it, ReLU and residual sums in place,
    features in the compute dtype from layer to layer); submanifold kernel maps are walked along z (exact, also in
    training). Off, the modules run one by one on searched maps (the reference path of ``sal-ros bench model``),
    as when training."""

    def __init__(self, cfg) -> None:  # a ModelConfig (model/config.py imports the registry, so not this module)
        super().__init__()
        net = cfg.minkunet
        self.fused_inference = True
        self._workspace = None  # the fused CPU pass's scratch, kept between passes (its peak size per pass)
        self.stem = nn.Sequential(conv_bn_relu(cfg.input.in_channels, net.stem_width),
                                  conv_bn_relu(net.stem_width, net.stem_width))
        self.down = nn.ModuleList()
        cin = net.stem_width
        skip_widths = [net.stem_width]
        for width, n in zip(net.widths, net.blocks):
            self.down.append(nn.Sequential(conv_bn_relu(cin, cin, 2, 2), residual_blocks(cin, width, n)))
            cin = width
            skip_widths.append(width)
        self.up_conv = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, (width, n) in enumerate(zip(net.decoder_widths, net.decoder_blocks)):
            skip = skip_widths[-2 - i]  # strides 8, 4, 2, 1
            self.up_conv.append(conv_bn_relu(cin, width, 2, 2, transposed=True))
            self.up_blocks.append(residual_blocks(width + skip, width, n))
            cin = width
        self.out_widths = {16: net.widths[-1], **{s: w for s, w in zip((8, 4, 2, 1), net.decoder_widths)}}

    def forward(self, x: SparseTensor) -> dict[int, SparseTensor]:
        x.cache.walk_columns = self.fused_inference
        if self.fused_inference and not self.training and not torch.is_grad_enabled() \
                and not self.stem[0][0]._uses_torchsparse(x):
            # The scratch is kept from pass to pass: made afresh, its buffers were new pages from the OS in every
            # frame (tiny: ~2,600 page faults per scan, 137 kept). Taken while in use, so a pass on another thread
            # makes its own.
            workspace, self._workspace = self._workspace, None
            with fused.fused_pass(x, workspace) as y:
                workspace = y.cache.workspace
                out = self._forward_fused(y)
            self._workspace = workspace
            return out
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        out = {16: skips[-1]}
        y = skips[-1]
        for i, (up, blocks) in enumerate(zip(self.up_conv, self.up_blocks)):
            y = blocks(cat_feats(up(y), skips[-2 - i]))
            out[y.stride] = y
        return out

    def _forward_fused(self, y: SparseTensor) -> dict[int, SparseTensor]:
        """The forward pass above with every conv-norm(-ReLU) and residual block fused."""
        for layer in self.stem:
            y = fused.conv_bn(layer, y, relu=True)
        skips = [y]
        for down, blocks in self.down:
            y = fused.residual_blocks(blocks, fused.conv_bn(down, y, relu=True))
            skips.append(y)
        out = {16: y}
        for i, (up, blocks) in enumerate(zip(self.up_conv, self.up_blocks)):
            y = fused.residual_blocks(blocks, cat_feats(fused.conv_bn(up, y, relu=True), skips[-2 - i]))
            out[y.stride] = y
        return out


__all__ = ["MinkUNet"]
