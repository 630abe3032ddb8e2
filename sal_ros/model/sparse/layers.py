"""Sparse layers built on ``Conv3d`` (torchsparse's nn.modules): BatchNorm and ReLU over a SparseTensor's features,
conv-norm-ReLU, and the residual block of MinkUNet; ``sal_ros.model.sparse.fused`` runs them fused at inference."""
from __future__ import annotations

from torch import nn

from sal_ros.model.sparse.conv import Conv3d
from sal_ros.model.sparse.tensor import SparseTensor


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


def residual_blocks(cin: int, cout: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(cin if i == 0 else cout, cout) for i in range(n)])


__all__ = ["BatchNorm", "ReLU", "conv_bn_relu", "ResidualBlock", "residual_blocks"]
