"""Fused inference of the sparse layers (``layers``): in eval mode without autograd, every BatchNorm is folded
into the conv before it (kept until a weight or statistic changes), bias, residual sum and ReLU run on the
accumulator of ``sparse_conv_inference`` (``kernels``), and features stay in one compute dtype from layer to
layer."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from sal_ros.model.sparse.conv import Conv3d
from sal_ros.model.sparse.tensor import SparseTensor, Workspace


@contextlib.contextmanager
def fused_pass(x: SparseTensor, workspace: Optional[Workspace] = None) -> Iterator[SparseTensor]:
    """``x`` in the compute dtype (autocast's, else its own), autocast off, with scratch shared by the convs of
    the pass (CPU: ``workspace``, else a new one) on its cache, taken off it after the pass (the outputs keep the
    cache)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.feats.dtype
    x.cache.workspace = (workspace or Workspace()) if device == "cpu" else None
    try:
        with torch.autocast(device, enabled=False):
            yield x.replace_feats(x.feats.to(dtype))
    finally:
        x.cache.workspace = None


def conv_bn(layers: nn.Sequential, x: SparseTensor, relu: bool, residual: Optional[Tensor] = None) -> SparseTensor:
    """``Conv3d, BatchNorm[, + residual][, ReLU]`` as one conv with the norm folded into its weight and bias."""
    conv = layers[0]
    weight, bias = folded_weights(conv, layers[1], x.feats.dtype)
    return conv.forward_inference(x, weight, bias, residual, relu)


def residual_blocks(blocks: nn.Sequential, x: SparseTensor) -> SparseTensor:
    """``layers.residual_blocks`` fused: each block is two (three with a projected shortcut) fused convs."""
    for block in blocks:
        shortcut = x.feats if isinstance(block.shortcut, nn.Identity) else conv_bn(block.shortcut, x, relu=False).feats
        y = conv_bn(block.body[0:3], x, relu=True)
        x = conv_bn(block.body[3:5], y, relu=True, residual=shortcut)
    return x


def folded_weights(conv: Conv3d, bn: nn.BatchNorm1d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The conv's weight and bias with the eval-mode norm folded in, in ``dtype``; kept on the conv until one of
    the tensors it is folded from changes (:func:`_fold_key`), which spares 33 folds per scan (realtime: ~1.5 ms)."""
    key = _fold_key(conv, bn, dtype)
    kept = getattr(conv, "_folded", None)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1], kept[2]
    exact = torch.promote_types(conv.kernel.dtype, torch.float32)  # fold in float32 at least
    scale = bn.weight.to(exact) * torch.rsqrt(bn.running_var.to(exact) + bn.eps)
    shift = bn.bias.to(exact) - bn.running_mean.to(exact) * scale
    if conv.bias is not None:
        shift = shift + conv.bias.to(exact) * scale
    weight, bias = (conv.kernel.to(exact) * scale).to(dtype), shift.to(dtype)
    conv._folded = (key, weight, bias)
    return weight, bias


def _fold_key(conv: Conv3d, bn: nn.BatchNorm1d, dtype: torch.dtype) -> Optional[tuple]:
    """What the folded weights depend on: each source tensor's storage and version counter. Optimizer steps,
    ``load_state_dict`` and in-place writes under ``no_grad`` bump the counter; a training forward updates the
    running statistics without bumping theirs but always bumps ``num_batches_tracked``'s. Writes through
    ``.data`` bump nothing: code that edits weights that way must ``del conv._folded`` (nothing here does). None
    (fold every time) for tensors made under ``inference_mode``, which have no version counter."""
    sources = [t for t in (conv.kernel, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           bn.num_batches_tracked) if t is not None]
    if any(t.is_inference() for t in sources):
        return None
    return (dtype, bn.eps, *((t.data_ptr(), t._version) for t in sources))


__all__ = ["fused_pass", "conv_bn", "residual_blocks", "folded_weights"]
