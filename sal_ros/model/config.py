"""The SAL model's architecture, one section per component; stored in checkpoints as a nested plain dict.

Sections: ``input`` (points -> voxel features, for every backbone), one per backbone family (``minkunet``,
``waffleiron``; ``backbone`` names the one that runs, a name in ``sal_ros.model.backbone.BACKBONES``), ``decoder``
(the query decoder) and ``training`` (settings that act only while training).

Settings read from YAML (``model: {preset: tiny, ...}``) and checkpoints go through ``ModelConfig.with_settings``:
sections as mappings (``decoder: {num_queries: 16}``, partial), or the flat names of the first layout
(``num_queries: 16``, ``waffle_depth: 8``; ``FLAT_NAMES`` maps each to its section), which format-1 checkpoints and
backbone files store and the YAML configs use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from sal_ros.core.settings import known_settings
from sal_ros.model.backbone import BACKBONES


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class InputConfig:
    """How a cloud becomes voxel features (the same for every backbone)."""

    in_channels: int = 5  # per point: x y z (scaled), intensity (scaled), range (scaled); 4 drops range
    voxel_size: float = 0.05  # metres (Mask4Former)
    coord_scale: float = 50.0  # metres mapped to 1.0 in the input features
    intensity_scale: float = 1.0  # sensor intensity mapped to 1.0 (SemanticKITTI 1, nuScenes/Ouster 255)

    def __post_init__(self) -> None:
        if self.in_channels not in (4, 5):
            raise ValueError(f"in_channels must be 4 (x y z intensity) or 5 (+ range), got {self.in_channels}")
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be positive, got {self.voxel_size}")


@dataclass(frozen=True)
class MinkUNetConfig:
    """Sparse-conv U-Net (sal_ros.model.minkunet): encoder stages at strides 2..16, its decoder back to 1."""

    stem_width: int = 32
    widths: tuple[int, ...] = (32, 64, 128, 256)  # encoder stages at strides 2, 4, 8, 16
    blocks: tuple[int, ...] = (2, 3, 4, 6)  # residual blocks per encoder stage (MinkUNet34)
    decoder_widths: tuple[int, ...] = (256, 128, 96, 96)  # U-Net decoder stages at strides 8, 4, 2, 1
    decoder_blocks: tuple[int, ...] = (2, 2, 2, 2)

    def __post_init__(self) -> None:
        for name in ("widths", "blocks", "decoder_widths", "decoder_blocks"):
            object.__setattr__(self, name, _ints(getattr(self, name)))
        if len(self.widths) != 4 or len(self.blocks) != 4 or len(self.decoder_widths) != 4 \
                or len(self.decoder_blocks) != 4:
            raise ValueError("widths, blocks, decoder_widths and decoder_blocks need 4 entries (strides 2..16)")


@dataclass(frozen=True)
class WaffleIronConfig:
    """2D-grid projections, no sparse conv (sal_ros.model.waffleiron); the paper's SemanticKITTI setting: 0.5 m cells
    over +-64 m x +-64 m x +-8 m."""

    depth: int = 48
    width: int = 256
    cell: float = 0.5  # metres per 2D grid cell
    extent: tuple[float, ...] = (64.0, 64.0, 8.0)  # half-size of the gridded box in x, y, z (metres)
    layer_scale: float = 0.1  # initial residual branch scale

    def __post_init__(self) -> None:
        object.__setattr__(self, "extent", tuple(float(v) for v in self.extent))
        if len(self.extent) != 3 or min(self.extent) <= 0 or not self.cell > 0 or min(self.depth, self.width) < 1:
            raise ValueError("waffleiron extent needs 3 positive half-sizes; cell, depth, width > 0")


@dataclass(frozen=True)
class DecoderConfig:
    """The query decoder (sal_ros.model.decoder): Mask4Former-like, with SAL's 300 queries."""

    num_queries: int = 300  # SAL: 100 -> 300 queries raised stuff PQ 47.8 -> 58.3
    hidden_dim: int = 128  # query / attention width (Mask4Former 128)
    mask_dim: int = 128  # width of the per-voxel mask features the query embeddings are dotted with
    rounds: int = 3  # each round visits every attention level once (Mask4Former: 3 rounds)
    attention_strides: tuple[int, ...] = (16, 8, 4)  # feature levels the queries cross-attend to, coarse first
    heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.0
    token_dim: int = 512  # must equal the CLIP text encoder's embed_dim (ViT-B-16: 512)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_strides", _ints(self.attention_strides))
        known = {16, 8, 4, 2, 1}
        if not self.attention_strides or not set(self.attention_strides) <= known:
            raise ValueError(f"attention_strides must be a non-empty subset of {sorted(known)}")
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by heads {self.heads}")
        if min(self.num_queries, self.rounds, self.token_dim, self.mask_dim) < 1:
            raise ValueError("num_queries, decoder rounds, token_dim and mask_dim must be positive")


@dataclass(frozen=True)
class TrainingConfig:
    max_keys: int = 0  # cap on voxels per attention level (random subset; 0 = all)


SECTIONS: dict[str, type] = {"input": InputConfig, "minkunet": MinkUNetConfig, "waffleiron": WaffleIronConfig,
                             "decoder": DecoderConfig, "training": TrainingConfig}
# The first layout's flat names -> (section, field): where a name is not the field's, it is written out.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    **{f.name: (section, f.name) for section in ("input", "minkunet", "decoder", "training")
       for f in fields(SECTIONS[section]) if f.name != "rounds"},
    "decoder_rounds": ("decoder", "rounds"),
    **{f"waffle_{f.name}": ("waffleiron", f.name) for f in fields(WaffleIronConfig)},
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the SAL model's architecture.

    Defaults (preset ``minkunet34``, 37.9 M backbone + 3.9 M decoder parameters): MinkUNet34 encoder depths,
    SPVNAS widths, a Mask4Former-like decoder with SAL's 300 queries, Mask4Former's 0.05 m voxels (a 124.7k-point
    HDL-64 scan gives ~92k voxels; the whole model runs on it in ~5 s on two CPU cores, so no coarser default
    is needed for CPU demos). ``minkunet18`` is the SPVNAS reference (21.7 M backbone parameters).
    Cross-attention goes to strides 16, 8, 4 and masks are predicted at stride 1, as Mask2Former attends to
    1/32..1/8 and predicts masks at 1/4: the finest levels would make attention cost Q x 90k per layer.
    """

    backbone: str = "minkunet"  # the backbone family: its section holds its settings
    input: InputConfig = field(default_factory=InputConfig)
    minkunet: MinkUNetConfig = field(default_factory=MinkUNetConfig)
    waffleiron: WaffleIronConfig = field(default_factory=WaffleIronConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        BACKBONES.lookup(self.backbone)
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"ModelConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def preset(cls, name: str | None = "minkunet34", **settings: Any) -> "ModelConfig":
        """A named architecture with some settings changed (``ModelConfig.preset("tiny", token_dim=768)``, or
        ``decoder={"token_dim": 768}``; see ``with_settings``)."""
        name = name or "minkunet34"
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name].with_settings(settings) if settings else PRESETS[name]

    def with_settings(self, settings: Mapping[str, Any]) -> "ModelConfig":
        """This config with ``settings`` applied: ``backbone``, sections as mappings of some of their fields (or
        section values), and flat names (``FLAT_NAMES``). ValueError names unknown settings or one given twice."""
        changes = nested_settings(settings)
        known_settings(ModelConfig, changes, "model", tuple(FLAT_NAMES))
        for name, cls in SECTIONS.items():
            if name in changes:
                changes[name] = replace(getattr(self, name), **known_settings(cls, changes[name], f"model {name}"))
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """The config a checkpoint or backbone file stores, in either layout (fields it lacks: the defaults)."""
        return cls().with_settings(d)

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, **{name: {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in asdict(getattr(self, name)).items()}
                                              for name in SECTIONS}}


def preset_settings(spec: str) -> dict[str, Any]:
    """``preset[:field=value...]`` (``tiny:voxel_size=0.4``; values read as YAML scalars) as the settings a train
    config's ``model:`` holds (``{"preset": "tiny", "voxel_size": 0.4}``); ValueError for a field without a value.
    The preset and field names are checked by ``ModelConfig.preset``."""
    import yaml

    name, *fields_ = spec.split(":")
    settings: dict[str, Any] = {"preset": name.strip()}
    for item in fields_:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"preset override {item!r} in {spec!r}: expected field=value")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def split_specs(text: str) -> list[str]:
    """A comma-separated list of preset specs, commas inside brackets kept (``tiny,realtime:widths=[16,24,32,48]``
    is two specs); ValueError for unbalanced brackets."""
    specs, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
        if depth < 0 or (i == len(text) and depth):
            raise ValueError(f"presets {text!r}: unbalanced brackets")
        if ch == "," and not depth:
            specs.append(text[start:i].strip())
            start = i + 1
    return [s for s in specs if s]


def nested_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` in the nested layout: flat names (``FLAT_NAMES``) moved into their sections, section values as
    mappings. ValueError for settings or a section that are not a mapping and for a setting given twice."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"model settings must be a mapping, got {type(settings).__name__}")
    out: dict[str, Any] = {}
    given: dict[tuple[str, str], str] = {}  # (section, field) -> how the settings spell it

    def put(section: str, name: str, value: Any, spelt: str) -> None:
        if (section, name) in given:
            raise ValueError(f"model setting {section}.{name} given twice ({given[section, name]} and {spelt})")
        given[section, name] = spelt
        out.setdefault(section, {})[name] = value

    for key, value in settings.items():
        if key in SECTIONS:
            value = asdict(value) if isinstance(value, SECTIONS[key]) else value
            if not isinstance(value, Mapping):
                raise ValueError(f"model setting {key!r} must be a mapping of {key} settings, got {value!r}")
            for name, v in value.items():
                put(key, name, v, f"{key}.{name}")
        elif key in FLAT_NAMES:
            put(*FLAT_NAMES[key], value, key)
        else:
            out[key] = value
    return out


# Each preset changes an earlier one (ModelConfig.preset reads this dict as it fills).
PRESETS: dict[str, ModelConfig] = {"minkunet34": ModelConfig()}
PRESETS["minkunet18"] = ModelConfig.preset("minkunet34", minkunet={"blocks": (2, 2, 2, 2)})
# CPU-sized: tests, demos, smoke runs of the whole loop (0.42 M backbone parameters, ~0.1 s per scan on CPU).
PRESETS["tiny"] = ModelConfig.preset(
    "minkunet34", input={"voxel_size": 0.2},
    minkunet={"stem_width": 16, "widths": (16, 24, 32, 48), "blocks": (1, 1, 1, 1), "decoder_widths": (32, 24, 16, 16),
              "decoder_blocks": (1, 1, 1, 1)},
    decoder={"num_queries": 32, "hidden_dim": 32, "mask_dim": 32, "rounds": 1, "attention_strides": (16, 8),
             "heads": 4, "ffn_dim": 64})
# WaffleIron on 0.1 m voxels (the paper's downsampling): WI-48-256, the 24-layer setting of the indoor study, and
# a CPU-sized one with the tiny decoder.
PRESETS["waffleiron48"] = ModelConfig.preset("minkunet34", backbone="waffleiron", input={"voxel_size": 0.1})
PRESETS["waffleiron24"] = ModelConfig.preset("waffleiron48", waffleiron={"depth": 24})
PRESETS["waffleiron_tiny"] = ModelConfig.preset("tiny", backbone="waffleiron",
                                               waffleiron={"depth": 6, "width": 32, "cell": 1.0})
# Real time on one CPU core (issue 25; chosen by `sal-ros bench model` and the held-out oracle protocol, table in
# docs/performance.md): tiny's layout on 0.5 m voxels (a 124.7k-point scan gives ~11.0k voxels instead of ~31.8k)
# with a narrower encoder and decoder: 0.4-0.5x tiny's CPU time on one thread since the per-point and kernel-map
# work was rewritten. Held out (five seeds each) it keeps ~80 % of tiny's class-agnostic PQ, in the camera frustum
# and on the whole scan; of the candidates at or under 50 ms (0.4 / 0.6 m, tiny's widths) none kept more in both.
PRESETS["realtime"] = ModelConfig.preset("tiny", input={"voxel_size": 0.5},
                                         minkunet={"stem_width": 8, "widths": (16, 16, 24, 32), "decoder_widths": (24, 16, 16, 16)})

__all__ = ["ModelConfig", "InputConfig", "MinkUNetConfig", "WaffleIronConfig", "DecoderConfig", "TrainingConfig",
           "PRESETS", "SECTIONS", "FLAT_NAMES", "nested_settings",
           "preset_settings", "split_specs"]
