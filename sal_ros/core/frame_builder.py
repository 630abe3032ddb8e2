"""Synced camera messages -> CameraViews of a Frame: the one rule set of the nodes (nodes/inputs.py) and the bag
reader (data/bag.py), so offline frames are built exactly as on the robot.

A camera's model comes from its latest CameraInfo (built once per message, with the rectification of a
rectified topic), else from a static calibration's intrinsics; its extrinsics from an ``ExtrinsicsSource`` at the
cloud stamp. A camera without a model, a transform, a decodable image or an image of the model's size is left out
of the frame with its reason: the frame goes on (the node counts and warns, the bag reader warns once).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sal_ros.core.camera import CameraModel, image_size_problem, size_problem
from sal_ros.core.errors import SensorDataError
from sal_ros.core.image import image_dimensions, read_image
from sal_ros.core.msgtypes import stamp_to_ns
from sal_ros.core.tf import ExtrinsicsSource
from sal_ros.core.types import CameraView, Frame


class FrameBuilder:
    """``cameras``: name -> its settings (``rectified``, ``info_topic``); ``infos``: name -> the latest CameraInfo,
    written by the caller (a reference swap: callbacks may store while the builder reads)."""

    def __init__(self, cameras: Mapping[str, Any], extrinsics: ExtrinsicsSource | None, extrinsics_error: str = "",
                 infos: dict[str, Any] | None = None) -> None:
        self.cameras = cameras
        self.extrinsics = extrinsics
        self.extrinsics_error = extrinsics_error  # why there is no source, for the missing-transform reason
        self.infos = {} if infos is None else infos
        self._models: dict[str, tuple[Any, tuple[CameraModel, np.ndarray]]] = {}  # name -> (info msg, model)

    def camera_model(self, name: str) -> tuple[CameraModel, np.ndarray] | None:
        """The CameraModel of camera ``name`` and the 4x4 from the camera's TF frame to the frame the model
        projects from (identity unless the topic is rectified); cached per info message."""
        info = self.infos.get(name)
        if info is None:  # static calibration files may carry intrinsics
            calib = getattr(self.extrinsics, "calibrations", {}).get(name)
            return None if getattr(calib, "camera", None) is None else (calib.camera, np.eye(4))
        cached = self._models.get(name)
        if cached is not None and cached[0] is info:
            return cached[1]
        rectified = self.cameras[name].rectified
        model = (CameraModel.from_camera_info(info, rectified=rectified),
                 CameraModel.rectification(info) if rectified else np.eye(4))
        self._models[name] = (info, model)
        return model

    def camera_view(self, name: str, image_msg: Any, frame: Frame) -> tuple[CameraView | None, str, str]:
        """One synced image -> (CameraView, "", "") or (None, reason, text) when the camera is left out."""
        try:
            model_and_rect = self.camera_model(name)
        except SensorDataError as exc:
            return None, "bad_camera_info", f"camera {name}: {exc}"
        if model_and_rect is None:
            return None, "no_camera_info", f"camera {name}: no CameraInfo yet on {self.cameras[name].info_topic}"
        model, rectification = model_and_rect
        camera_frame = str(image_msg.header.frame_id)
        T = None if self.extrinsics is None else self.extrinsics.lookup(camera_frame, frame.frame_id, frame.stamp_ns)
        if T is None:
            errors = getattr(self.extrinsics, "last_error", {})
            why = self.extrinsics_error or errors.get((camera_frame, frame.frame_id), "no transform")
            return None, "missing_transform", (f"camera {name}: {why} (lidar frame '{frame.frame_id}' -> camera "
                                               f"frame '{camera_frame}' at the cloud stamp)")
        try:  # the size in the header first: a compressed image that is not the camera's is never decoded
            header_size = image_dimensions(image_msg)
            wrong_size = None if header_size is None else size_problem(*header_size, model)
            if wrong_size is not None:
                return None, wrong_size[0], f"camera {name}: {wrong_size[1]}"
            image = read_image(image_msg)
        except SensorDataError as exc:
            return None, "malformed_image", f"camera {name}: {exc}"
        wrong_size = image_size_problem(image, model)
        if wrong_size is not None:
            return None, wrong_size[0], f"camera {name}: {wrong_size[1]}"
        # A rectified view's extrinsics end in the rectified frame, so every consumer projects it with plain K.
        view = CameraView(name=name, image=image, camera=model, T_cam_lidar=rectification @ np.asarray(T, np.float64),
                          stamp_ns=stamp_to_ns(image_msg.header.stamp), frame_id=camera_frame)
        return view, "", ""
