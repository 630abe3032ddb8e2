"""CameraModel and project_points against hand-written reference formulas (one point at a time, math module)."""
import math

import numpy as np
import pytest

from sal_ros.core.camera import CameraModel, Projection, project_points
from sal_ros.core.errors import CalibrationError, MalformedMessageError, SensorDataError
from sal_ros.core.msgtypes import rosbags_types
from sal_ros.nodes.messages import rclpy_types

K = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
PLUMB_BOB = [-0.28, 0.07, 0.001, -0.0015, -0.008]
RATIONAL = [0.4, -0.1, 0.0012, -0.0008, 0.01, 0.7, -0.05, 0.02]
FISHEYE = [0.02, -0.005, 0.001, -0.0002]


def _camera_points(n=2000, seed=0):
    """Points in the camera frame spread over a wide field of view (|x/z|, |y/z| < 0.8), T = identity."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.5, 40.0, n)
    xy = rng.uniform(-0.8, 0.8, (n, 2)) * z[:, None]
    return np.column_stack([xy, z])


def _reference_uv(point, camera):
    """OpenCV's projectPoints / fisheye::projectPoints formulas, written out for one point."""
    x, y = point[0] / point[2], point[1] / point[2]
    D = list(camera.D) + [0.0] * 8
    if camera.distortion_model == "equidistant":
        r = math.sqrt(x * x + y * y)
        th = math.atan(r)
        th_d = th * (1 + D[0] * th**2 + D[1] * th**4 + D[2] * th**6 + D[3] * th**8)
        s = th_d / r if r > 0 else 1.0
        xd, yd = x * s, y * s
    else:
        k1, k2, p1, p2, k3, k4, k5, k6 = D[:8]
        r2 = x * x + y * y
        radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    Km = camera.K
    return Km[0, 0] * xd + Km[0, 1] * yd + Km[0, 2], Km[1, 1] * yd + Km[1, 2]


@pytest.mark.parametrize("model,D", [("none", []), ("plumb_bob", PLUMB_BOB), ("rational_polynomial", RATIONAL),
                                     ("equidistant", FISHEYE)])
def test_distortion_models_match_reference_formulas(model, D):
    camera = CameraModel(K=K, width=640, height=480, D=D, distortion_model=model)
    pts = _camera_points()
    proj = project_points(pts, np.eye(4), camera)
    # only compare inside the model's trusted domain (the guard is tested separately)
    domain = np.hypot(pts[:, 0] / pts[:, 2], pts[:, 1] / pts[:, 2]) < camera.max_undistorted_radius
    assert domain.mean() > 0.9
    ref = np.array([_reference_uv(p, camera) for p in pts[domain]])
    np.testing.assert_allclose(proj.uv[domain], ref, rtol=0, atol=1e-9)
    inside = (ref[:, 0] >= 0) & (ref[:, 0] < 640) & (ref[:, 1] >= 0) & (ref[:, 1] < 480)
    np.testing.assert_array_equal(proj.valid[domain], inside)
    assert 0 < inside.sum() < domain.sum()  # the sample straddles the image border


def test_distortion_is_not_a_no_op():
    pts = _camera_points()
    pinhole = project_points(pts, np.eye(4), CameraModel(K=K, width=640, height=480)).uv
    for model, D in [("plumb_bob", PLUMB_BOB), ("rational_polynomial", RATIONAL), ("equidistant", FISHEYE)]:
        uv = project_points(pts, np.eye(4), CameraModel(K=K, width=640, height=480, D=D, distortion_model=model)).uv
        assert np.abs(uv - pinhole).max() > 5.0, model


@pytest.mark.parametrize("model,n", [("plumb_bob", 5), ("rational_polynomial", 8)])
def test_zero_distortion_equals_pinhole(model, n):
    pts = _camera_points()
    pinhole = project_points(pts, np.eye(4), CameraModel(K=K, width=640, height=480))
    zero = project_points(pts, np.eye(4), CameraModel(K=K, width=640, height=480, D=np.zeros(n),
                                                      distortion_model=model))
    np.testing.assert_array_equal(zero.uv, pinhole.uv)
    np.testing.assert_array_equal(zero.valid, pinhole.valid)
    # and the pinhole formula itself, u = fx x/z + cx
    np.testing.assert_allclose(pinhole.uv[:, 0], 500 * pts[:, 0] / pts[:, 2] + 320, rtol=0, atol=1e-9)
    np.testing.assert_allclose(pinhole.uv[:, 1], 480 * pts[:, 1] / pts[:, 2] + 240, rtol=0, atol=1e-9)


def test_equidistant_with_zero_coefficients_is_not_pinhole():
    camera = CameraModel(K=K, width=640, height=480, D=np.zeros(4), distortion_model="equidistant")
    uv = project_points(np.array([[1.0, 0.0, 1.0]]), np.eye(4), camera).uv
    assert uv[0, 0] == pytest.approx(320 + 500 * math.pi / 4)  # r_d = theta, not tan(theta)


def test_points_beyond_the_fold_back_radius_are_invalid():
    # k1 = -0.5: r_d = r (1 - r^2/2) rises until r = sqrt(2/3) and then falls back towards the centre.
    camera = CameraModel(K=K, width=640, height=480, D=[-0.5, 0, 0, 0, 0], distortion_model="plumb_bob")
    assert camera.max_undistorted_radius == pytest.approx(math.sqrt(2 / 3), abs=2e-3)
    far = np.array([[1.5, 0.0, 1.0], [0.5, 0.0, 1.0]])  # r = 1.5 (folded) and r = 0.5 (fine)
    proj = project_points(far, np.eye(4), camera)
    assert 0 <= proj.uv[0, 0] < 640  # the folded point would land inside the image ...
    assert proj.valid.tolist() == [False, True]  # ... but is not trusted


def test_validity_depth_bounds_and_nan():
    camera = CameraModel(K=[[512.0, 0, 256], [0, 512, 128], [0, 0, 1]], width=512, height=256)
    pts = np.array([
        [0.0, 0.0, 5.0],  # centre
        [0.0, 0.0, -5.0],  # behind
        [0.0, 0.0, 0.0],  # at the optical centre
        [np.nan, 0.0, 5.0],
        [-2.5, -1.25, 5.0],  # u = 0, v = 0 exactly: inside
        [2.5, 0.0, 5.0],  # u = 512 = width exactly: outside
        [0.0, 0.0, 0.5],  # closer than min_depth below
    ])
    proj = project_points(pts, np.eye(4), camera, min_depth=1.0)
    assert proj.valid.tolist() == [True, False, False, False, True, False, False]
    assert np.isnan(proj.uv[1]).all() and np.isnan(proj.uv[2]).all()
    assert proj.depth.tolist()[:3] == [5.0, -5.0, 0.0]
    assert project_points(pts, np.eye(4), camera).valid[6]  # min_depth 0 keeps it


def test_projection_unpacks_and_pixels_floor_inside_image():
    camera = CameraModel(K=K, width=640, height=480)
    pts = _camera_points(5000, seed=3)
    proj = project_points(pts.astype(np.float32), np.eye(4), camera)
    uv, depth, valid = proj
    assert isinstance(proj, Projection) and uv.dtype == np.float64 and valid.dtype == bool
    pix = proj.pixels()
    assert pix.dtype == np.int64 and pix.shape == (valid.sum(), 2)
    np.testing.assert_array_equal(pix, np.floor(uv[valid]).astype(int))
    assert (pix >= 0).all() and (pix[:, 0] < 640).all() and (pix[:, 1] < 480).all()
    np.testing.assert_array_equal(proj.indices, np.flatnonzero(valid))


def test_extrinsics_are_applied():
    camera = CameraModel(K=K, width=640, height=480)
    T = np.array([[0.0, -1, 0, 0.1], [0, 0, -1, 0.2], [1, 0, 0, -0.3], [0, 0, 0, 1]])  # lidar x forward -> z
    lidar = np.array([[10.0, 1.0, 0.5]])
    cam = T[:3, :3] @ lidar[0] + T[:3, 3]
    proj = project_points(lidar, T, camera)
    assert proj.depth[0] == pytest.approx(cam[2])
    assert proj.uv[0] == pytest.approx([500 * cam[0] / cam[2] + 320, 480 * cam[1] / cam[2] + 240])


def test_bad_shapes_raise():
    camera = CameraModel(K=K, width=640, height=480)
    with pytest.raises(SensorDataError, match=r"\(N, 3\)"):
        project_points(np.zeros((4, 4)), np.eye(4), camera)
    with pytest.raises(CalibrationError, match="4x4"):
        project_points(np.zeros((4, 3)), np.eye(3), camera)


# ---------------------------------------------------------------------------------------------- CameraInfo


def _info(types, **over):
    fields = dict(width=640, height=480, distortion_model="plumb_bob", d=list(PLUMB_BOB),
                  k=K.reshape(-1).tolist(), r=np.eye(3).reshape(-1).tolist(),
                  p=[450.0, 0, 330, 0, 0, 450.0, 250, 0, 0, 0, 1, 0])
    fields.update(over)
    roi = fields.pop("roi", None)
    msg = types.CameraInfo(**{k: v for k, v in fields.items() if k not in ("binning_x", "binning_y")})
    msg.binning_x, msg.binning_y = fields.get("binning_x", 0), fields.get("binning_y", 0)
    if roi is not None:
        msg.roi = types.RegionOfInterest(x_offset=roi[0], y_offset=roi[1], width=roi[2], height=roi[3])
    return msg


@pytest.fixture(params=["rclpy", "rosbags"])
def types(request):
    return rclpy_types() if request.param == "rclpy" else rosbags_types()


def test_from_camera_info_reads_both_backends(types):
    camera = CameraModel.from_camera_info(_info(types))
    np.testing.assert_array_equal(camera.K, K)
    np.testing.assert_array_equal(camera.D, PLUMB_BOB)
    assert (camera.width, camera.height, camera.distortion_model) == (640, 480, "plumb_bob")
    rect = CameraModel.from_camera_info(_info(types), rectified=True)
    assert rect.K[0, 0] == 450.0 and rect.K[0, 2] == 330 and not rect.is_distorted


def test_rectified_stereo_right_camera_projects_as_p_times_r(types):
    """image_rect of a stereo right camera: R rotates into the rectified frame, P carries Tx = -fx * baseline.
    The rectified model with the rectification folded into the extrinsics lands where P [R X; 1] says."""
    import transforms3d

    R = transforms3d.euler.euler2mat(0.01, -0.02, 0.015)
    P = np.array([[450.0, 0, 330, -450.0 * 0.54], [0, 450.0, 250, 0], [0, 0, 1, 0]])
    info = _info(types, r=R.reshape(-1).tolist(), p=P.reshape(-1).tolist())
    rect = CameraModel.from_camera_info(info, rectified=True)
    pts = _camera_points(2000, seed=3)
    proj = project_points(pts, CameraModel.rectification(info), rect)
    h = (P @ np.vstack([R @ pts.T, np.ones(len(pts))])).T
    expected = h[:, :2] / h[:, 2:]
    np.testing.assert_allclose(proj.uv[proj.valid], expected[proj.valid], rtol=0, atol=1e-9)
    assert proj.valid.sum() > 1000
    unset = _info(types, r=[0.0] * 9, p=[450.0, 0, 330, 0, 0, 450.0, 250, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(CameraModel.rectification(unset), np.eye(4))  # R left all zero: identity
    with pytest.raises(MalformedMessageError, match="r is not a rotation"):
        CameraModel.rectification(_info(types, r=[2.0, 0, 0, 0, 1, 0, 0, 0, 1]))
    with pytest.raises(MalformedMessageError, match="p: K has non-positive"):
        CameraModel.rectification(_info(types, p=[0.0] * 12))


def test_binning_and_roi_match_full_resolution_projection(types):
    full = CameraModel.from_camera_info(_info(types))
    cropped = CameraModel.from_camera_info(_info(types, binning_x=2, binning_y=4, roi=(100, 60, 400, 320)))
    assert (cropped.width, cropped.height) == (200, 80)
    pts = _camera_points(3000, seed=5)
    a = project_points(pts, np.eye(4), full)
    b = project_points(pts, np.eye(4), cropped)
    expected = (a.uv - [100, 60]) / [2, 4]  # image_geometry: shift by the ROI offset, then divide by binning
    np.testing.assert_allclose(b.uv, expected, rtol=0, atol=1e-9)
    inside = a.valid & (expected[:, 0] >= 0) & (expected[:, 0] < 200) & (expected[:, 1] >= 0) & (expected[:, 1] < 80)
    np.testing.assert_array_equal(b.valid, inside)
    assert 0 < b.valid.sum() < a.valid.sum()


@pytest.mark.parametrize("over,match", [
    (dict(k=[0.0] * 9), "focal"),
    (dict(k=[500.0, 0, 320, 0, 480, 240, 0, 0, 0]), "form"),
    (dict(k=[1.0] * 8), "9"),
    (dict(d=[0.1, 0.2, 0.0, 0.0]), "needs 5"),
    (dict(distortion_model="rational_polynomial"), "needs 8"),
    (dict(distortion_model="equidistant"), "needs 4"),
    (dict(width=0), "empty"),
    (dict(height=0), "empty"),
    (dict(distortion_model="kannala_brandt_9"), "unknown distortion model"),
    (dict(d=[np.nan, 0, 0, 0, 0]), "non-finite"),
    (dict(roi=(600, 0, 100, 100)), "roi"),
])
def test_from_camera_info_rejects_malformed(types, over, match):
    with pytest.raises(MalformedMessageError, match=match):
        CameraModel.from_camera_info(_info(types, **over))


def test_empty_model_without_coefficients_is_pinhole(types):
    camera = CameraModel.from_camera_info(_info(types, distortion_model="", d=[]))
    assert camera.distortion_model == "none" and not camera.is_distorted


@pytest.mark.parametrize("model,D", [("none", []), ("plumb_bob", PLUMB_BOB), ("rational_polynomial", RATIONAL),
                                     ("equidistant", FISHEYE)])
def test_camera_info_fields_round_trip(types, model, D):
    camera = CameraModel(K=K, width=640, height=480, D=D, distortion_model=model)
    fields = camera.to_camera_info_fields()
    back = CameraModel.from_camera_info(types.CameraInfo(**fields))
    np.testing.assert_array_equal(back.K, camera.K)
    assert (back.width, back.height) == (640, 480)
    pts = _camera_points(500)
    np.testing.assert_array_equal(project_points(pts, np.eye(4), back).uv, project_points(pts, np.eye(4), camera).uv)
    if model == "none":
        assert fields["distortion_model"] == "plumb_bob" and fields["d"] == [0.0] * 5
    assert fields["p"][:3] == K[0].tolist() and fields["p"][3] == 0.0


def test_camera_model_is_immutable_and_validated():
    camera = CameraModel(K=K, width=640, height=480)
    with pytest.raises(ValueError):
        camera.K[0, 0] = 1.0
    with pytest.raises(CalibrationError, match="needs 5"):
        CameraModel(K=K, width=640, height=480, D=[0.1], distortion_model="plumb_bob")
