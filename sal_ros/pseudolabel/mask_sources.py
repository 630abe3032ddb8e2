"""The 2D mask sources by name: slic, sam, sam2 (masks.py), sam2_lidar, SAM2-AMML's lidar-prompted masks
(amml.py), geometric, lidar ground removal + clustering rendered into the image (geometric.py), and oracle,
ground-truth segments rendered into the image (oracle.py); they build on masks.py: the registry sits above them. A
source with ``generate_for_frame(frame) -> {camera: Masks}`` makes all of a frame's masks at once (it needs more
than the image: ground truth)."""
from __future__ import annotations

from sal_ros.core.registry import Registry
from sal_ros.pseudolabel.amml import Sam2LidarMasks
from sal_ros.pseudolabel.geometric import GeometricMasks
from sal_ros.pseudolabel.masks import MaskSource, Sam2Masks, SamMasks, SlicMasks
from sal_ros.pseudolabel.masks import mask_source_identity  # noqa: F401 - callers import it from the registry
from sal_ros.pseudolabel.oracle import OracleMasks

SOURCES: Registry = Registry("mask source")  # each takes its own keyword options
for _name, _source in (("slic", SlicMasks), ("sam", SamMasks), ("sam2", Sam2Masks), ("sam2_lidar", Sam2LidarMasks),
                       ("geometric", GeometricMasks), ("oracle", OracleMasks)):
    SOURCES.register(_name, _source)


def build_mask_source(kind: str, **kwargs) -> MaskSource:
    """``kind`` slic | sam | sam2 | sam2_lidar | geometric | oracle; keyword arguments go to the source (None values are dropped)."""
    source = SOURCES.lookup(kind)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if kind == "geometric" and isinstance(kwargs.get("intersect"), str):  # the image masks that split its clusters
        kwargs["intersect"] = build_mask_source(kwargs["intersect"], **kwargs.pop("intersect_options", None) or {})
    return source(**kwargs)

