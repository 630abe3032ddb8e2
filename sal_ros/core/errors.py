"""One error family for bad sensor input, so callers (nodes) can catch it and keep running."""


class SensorDataError(ValueError):
    """A message or file does not hold what it claims (bad layout, encoding, sizes, calibration)."""


class MalformedMessageError(SensorDataError):
    """A ROS message (PointCloud2, Image, CameraInfo, ...) is malformed; the text names the problem."""


class CalibrationError(SensorDataError):
    """Calibration is missing, unreadable or inconsistent."""
