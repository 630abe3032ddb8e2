"""The backbone families, in the plug-in registry (``sal_ros.core.registry``): each takes the ModelConfig (its
family's settings are the config's section of the same name) and returns ``{stride: SparseTensor}`` with
``out_widths``. Adding a family = a module, a config section and one ``register`` line here."""
from __future__ import annotations

from torch import nn

from sal_ros.core.registry import Registry
from sal_ros.model.minkunet import MinkUNet
from sal_ros.model.waffleiron import WaffleIron

BACKBONES: Registry = Registry("backbone")  # each takes the ModelConfig
BACKBONES.register("minkunet", MinkUNet)
BACKBONES.register("waffleiron", WaffleIron)


def build_backbone(cfg) -> nn.Module:
    """The backbone family ``cfg.backbone`` (a ModelConfig) names."""
    return BACKBONES.lookup(cfg.backbone)(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["BACKBONES", "build_backbone", "count_parameters"]
