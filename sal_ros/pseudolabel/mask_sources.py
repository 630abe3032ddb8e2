"""The 2D mask sources by name: slic, sam, sam2 (masks.py), sam2_lidar, SAM2-AMML's lidar-prompted masks
(amml.py, which builds on masks.py: the registry sits above both), and oracle, ground-truth segments rendered into
the image (oracle.py). A source with ``generate_for_frame(frame) -> {camera: Masks}`` makes all of a frame's masks
at once (it needs more than one image: ground truth, the points)."""
from __future__ import annotations

from sal_ros.pseudolabel.amml import Sam2LidarMasks
from sal_ros.pseudolabel.masks import MaskSource, Sam2Masks, SamMasks, SlicMasks
from sal_ros.pseudolabel.oracle import OracleMasks

SOURCES = {"slic": SlicMasks, "sam": SamMasks, "sam2": Sam2Masks, "sam2_lidar": Sam2LidarMasks, "oracle": OracleMasks}


def build_mask_source(kind: str, **kwargs) -> MaskSource:
    """``kind`` slic | sam | sam2 | sam2_lidar; keyword arguments go to the source (None values are dropped)."""
    if kind not in SOURCES:
        raise ValueError(f"unknown mask source {kind!r}; known: {', '.join(SOURCES)}")
    return SOURCES[kind](**{k: v for k, v in kwargs.items() if v is not None})


def mask_source_identity(source) -> dict:
    ident = getattr(source, "identity", None)
    if ident is None:
        ident = {"source": source.name, **{k: v for k, v in vars(source).items() if isinstance(v, (int, float, str))}}
    return ident
