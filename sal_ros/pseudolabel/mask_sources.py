"""The 2D mask sources by name: slic, sam, sam2 (masks.py), sam2_lidar, SAM2-AMML's lidar-prompted masks
(amml.py), and geometric, lidar ground removal + clustering rendered into the image (geometric.py); the last two
build on masks.py: the registry sits above them."""
from __future__ import annotations

from sal_ros.pseudolabel.amml import Sam2LidarMasks
from sal_ros.pseudolabel.geometric import GeometricMasks
from sal_ros.pseudolabel.masks import MaskSource, Sam2Masks, SamMasks, SlicMasks
from sal_ros.pseudolabel.masks import mask_source_identity  # noqa: F401 - callers import it from the registry

SOURCES = {"slic": SlicMasks, "sam": SamMasks, "sam2": Sam2Masks, "sam2_lidar": Sam2LidarMasks,
           "geometric": GeometricMasks}


def build_mask_source(kind: str, **kwargs) -> MaskSource:
    """``kind`` slic | sam | sam2 | sam2_lidar | geometric; keyword arguments go to the source (None values are dropped)."""
    if kind not in SOURCES:
        raise ValueError(f"unknown mask source {kind!r}; known: {', '.join(SOURCES)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if kind == "geometric" and isinstance(kwargs.get("intersect"), str):  # the image masks that split its clusters
        kwargs["intersect"] = build_mask_source(kwargs["intersect"], **kwargs.pop("intersect_options", None) or {})
    return SOURCES[kind](**kwargs)

