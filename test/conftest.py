"""Test environment: DDS stays on loopback in a private domain, and real data comes from ../shared/data."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sal_ros.env import claim_free_ros_domain  # noqa: E402 - needs the path above; imports no ROS

# Must happen before anything imports rclpy. Each run holds its own free domain for the whole session (a lock per
# domain, skipping domains a running DDS participant uses): a second clone's suite, a robot stack or a `ros2` shell
# on this machine never meets this run's nodes, whatever ROS_DOMAIN_ID the caller exported. Every node and
# subprocess inherits it; a test that needs another domain claims one the same way.
SESSION_DOMAIN = claim_free_ros_domain()
os.environ["ROS_DOMAIN_ID"] = str(SESSION_DOMAIN.domain_id)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds.xml")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # ray (pseudo-label backend) never reports usage
# Tests never download weights: a pretrained tag asked for by mistake fails at once instead of fetching.
os.environ["HF_HUB_OFFLINE"] = "1"
# text embedding caches of nodes and benches started by tests stay out of the user's ~/.cache
os.environ["SAL_ROS_CACHE"] = tempfile.mkdtemp(prefix="sal_ros_test_cache_")

DATA_DIR = Path(os.environ.get("SAL_DATA", REPO.parent / "shared" / "data"))


def require_data(*parts: str) -> Path:
    """Path inside ../shared/data; CI fails without it, elsewhere the test skips with the reason."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        msg = f"real sample data missing: {path} (set SAL_DATA or provide ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def data_dir() -> Path:
    return require_data()


@pytest.fixture
def semantickitti_dir() -> Path:
    return require_data("semantickitti")


@pytest.fixture
def nuscenes_dir() -> Path:
    return require_data("nuscenes_mini")


def require_rclpy():
    """Import rclpy, or skip where ROS is not installed: the core suite must run without it. CI installs it, so
    there a broken rclpy (a missing RMW library, say) fails the ROS tests instead of skipping them."""
    if os.environ.get("CI"):
        import rclpy

        return rclpy
    return pytest.importorskip("rclpy", reason="rclpy not importable")


def semantickitti_embeddings():
    """The seeded tiny text encoder's embeddings of the SemanticKITTI class names (config/vocabulary_semantickitti.yaml):
    a real vocabulary for Segmenter tests that compare two paths on the real scan."""
    from sal_ros.model.text_encoder import tiny_text_encoder
    from sal_ros.model.vocabulary import Vocabulary

    names = Vocabulary.from_yaml(REPO / "config" / "vocabulary_semantickitti.yaml").class_names
    return tiny_text_encoder().encode(Vocabulary.from_prompts(names))


def save_tiny_checkpoint(path: Path) -> Path:
    """The tiny preset with seeded random weights, saved as a checkpoint naming the tiny text encoder: what the
    command-level tests run the node and `sal-ros eval` with."""
    import torch

    from sal_ros.model.config import ModelConfig
    from sal_ros.model.checkpoint import save_checkpoint
    from sal_ros.model.sal import SALModel
    from sal_ros.model.text_encoder import tiny_text_encoder

    torch.manual_seed(0)
    return save_checkpoint(path, SALModel(ModelConfig.preset("tiny")).eval(), text_encoder_identity=tiny_text_encoder())


def wait_until(predicate, what: str, *, progress=None, stall_s: float = 120.0, check=None, poll_s: float = 0.01):
    """Poll `predicate` until it returns something truthy, and return that. The wait follows progress, not the
    clock: it fails only after `stall_s` seconds in which `progress()` (any comparable snapshot: a log's length, a
    count of messages, a step number) did not change, so a machine under load only makes it slower. `check()` is
    called each round to fail at once (a child process that died, say)."""
    import time

    last, since = (progress() if progress else None), time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        now = time.monotonic()
        if progress is not None:
            current = progress()
            if current != last:
                last, since = current, now
        if now - since > stall_s:
            raise AssertionError(f"no progress for {stall_s:.0f} s waiting for {what} (last progress: {last!r})")
        time.sleep(poll_s)


def call_service(client, request, wait, resend_s: float = 5.0, attempts: int = 6):
    """A ROS service call that survives a lost response: ROS 2 drops a response sent before the server has matched
    the client's response reader (and a loaded machine makes that likely), so a request still unanswered after
    ``resend_s`` is sent again, the interval doubling, at most ``attempts`` times in all; the wait itself is
    ``wait(predicate, what)``, the rig's progress-following wait. Only for requests that may be applied twice
    (setting a parameter to a value, reading one)."""
    import time

    wait(client.service_is_ready, f"service {client.srv_name}")
    futures, last = [], [0.0]

    def answered():
        done = next((f for f in futures if f.done()), None)
        if done is None and len(futures) < attempts and time.monotonic() - last[0] > resend_s * 2 ** (len(futures) - 1):
            futures.append(client.call_async(request))
            last[0] = time.monotonic()
        return done

    future = wait(answered, f"{client.srv_name} response")
    for other in futures:
        if other is not future:
            client.remove_pending_request(other)
    return future.result()


class Spinner:
    """An executor spun on a thread until :meth:`stop`, which joins that thread before the executor and the nodes
    are torn down: a node destroyed under a spinning executor raised InvalidHandle in the spin thread. An entity a
    test destroys while the executor builds its wait set (``destroy_subscription``) raises the same there; that
    round is dropped and the spinning goes on (``executor.spin`` died of it, and every later wait of the test
    stalled with nothing received)."""

    def __init__(self, executor) -> None:
        import threading

        self.executor = executor
        self.dropped_rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="test_spinner", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.impl.implementation_singleton import rclpy_implementation

        while not self._stop.is_set() and self.executor.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except rclpy_implementation.InvalidHandle:
                self.dropped_rounds += 1  # the destroyed entity is out of the next round's wait set

    def stop(self, *nodes) -> None:
        """Stop spinning, wait for the thread and the callbacks in flight, then destroy ``nodes``."""
        self._stop.set()
        self._thread.join(120.0)  # one spin_once: bounded by the callback in hand
        assert not self._thread.is_alive(), "the spin thread did not end"
        self.executor.shutdown()
        for node in nodes:
            node.destroy_node()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc: progress of a child that works but
    answers nothing yet (loading a model, in a slow frame on a loaded machine). 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """``wait_until`` for a node running in this process: its CPU time is the progress, so the wait fails only
    after ``timeout`` s in which this process used less than a second of CPU (stuck, not slow)."""
    return wait_until(predicate, what, progress=lambda: int(cpu_seconds(os.getpid())), stall_s=timeout)


class Sensors:
    """Real KITTI frame 000000 as ROS messages: cloud, mono image, camera_info, and its static calibration."""

    def __init__(self, tmp_path):
        import numpy as np
        from PIL import Image

        from sal_ros.core.calibration import read_semantickitti_calib, write_static_extrinsics
        from sal_ros.nodes.messages import rclpy_types

        seq = require_data("semantickitti", "sequences", "00")
        scan = np.fromfile(seq / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)
        self.xyz, self.intensity = scan[:, :3].copy(), scan[:, 3].copy()
        self.image = np.asarray(Image.open(seq / "image_0" / "000000.png").convert("L"))
        self.calib = read_semantickitti_calib(seq / "calib.txt", image_size=self.image.shape[::-1])
        self.calib_file = tmp_path / "extrinsics.yaml"
        write_static_extrinsics(self.calib_file, self.calib, "velodyne")
        self.types = rclpy_types()

    def cloud(self, stamp_ns, xyz=None, intensity=None):
        from sal_ros.core.pointcloud2 import encode_cloud

        xyz = self.xyz if xyz is None else xyz
        intensity = self.intensity if intensity is None else intensity
        return encode_cloud({"xyz": xyz, "intensity": intensity}, "velodyne", stamp_ns, self.types)

    def image_msg(self, stamp_ns, image=None):
        from sal_ros.core.image import encode_image

        return encode_image(self.image if image is None else image, "mono8", "cam0", stamp_ns, self.types)

    def info(self, stamp_ns):
        from sensor_msgs.msg import CameraInfo

        from sal_ros.core.msgtypes import make_header

        msg = CameraInfo(**self.calib["image_0"].camera.to_camera_info_fields())
        msg.header = make_header("cam0", stamp_ns, self.types)
        return msg


def kitti_sequence(tmp_path: Path, n: int) -> Path:
    """A SemanticKITTI sequence of n scans: symlinks to the two real scans (no data copied)."""
    src = require_data("semantickitti", "sequences", "00")
    seq = tmp_path / "sequences" / "00"
    for sub in ("velodyne", "labels", "image_0"):
        (seq / sub).mkdir(parents=True)
    ext = {"velodyne": ".bin", "labels": ".label", "image_0": ".png"}
    for i in range(n):
        for sub, e in ext.items():
            (seq / sub / f"{i:06d}{e}").symlink_to(src / sub / f"{i % 2:06d}{e}")
    (seq / "calib.txt").symlink_to(src / "calib.txt")
    (seq / "times.txt").write_text("".join(f"{0.1 * i:.6e}\n" for i in range(n)))
    return seq


# A Ray head (the private instance too) probes the cloud metadata address 169.254.169.254 and posts a "usage stats
# disabled" note over HTTP even with usage stats off (Ray 2.60, usage_stats_head); through a dead loopback proxy
# those requests fail without leaving the machine. Ray's own gRPC ignores proxies; loopback is exempt.
RAY_LOOPBACK_ENV = {**{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
                    "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1",
                    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_loopback(monkeypatch) -> None:
    """In-process Ray on loopback only (RAY_LOOPBACK_ENV), and a private instance whatever RAY_ADDRESS says."""
    for key, value in RAY_LOOPBACK_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def assert_summaries_describe_the_labels(points, out):
    """Each instance summary of a Segmentation counts, scores and boxes exactly the points that carry its id."""
    import numpy as np

    ids = np.unique(out.instance[out.instance > 0])
    assert sorted(i.instance_id for i in out.instances) == ids.tolist()
    for inst in out.instances:
        mine = out.instance == inst.instance_id
        assert inst.num_points == int(mine.sum())
        assert (out.label[mine] == inst.label).all()
        assert inst.score == pytest.approx(float(out.score[mine].mean()), rel=1e-5)
        z = points[mine, 2]
        half = inst.box.size[2] / 2
        np.testing.assert_allclose([inst.box.center[2] - half, inst.box.center[2] + half], [z.min(), z.max()],
                                   atol=1e-3)


TRAIN_STEPS, TRAIN_WARMUP = 6, 2  # the tiny distillation runs of the training tests


@pytest.fixture(scope="module")
def pseudolabel_dir(tmp_path_factory):
    """(sequence, pseudo-label folder) for the training tests: the real SemanticKITTI frames with their ground-truth
    instances in the camera frustum as pseudo-labels and random unit tokens (the engine's CLIP tokens would cost
    minutes on CPU, and the trainer does not care where tokens come from)."""
    import numpy as np

    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.data.labels import semantickitti
    from sal_ros.data.pseudolabels import PseudoLabels, pseudolabel_path, save_pseudolabels
    from sal_ros.model.sal import ModelConfig
    from sal_ros.train.dataset import ground_truth_scan

    seq = require_data("semantickitti", "sequences", "00")
    out = tmp_path_factory.mktemp("pl")
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(19, ModelConfig.preset("tiny").decoder.token_dim)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    for frame in load_semantickitti(seq):
        scan = ground_truth_scan(frame, semantickitti(), tokens)
        k = len(scan.tokens)
        save_pseudolabels(pseudolabel_path(out, frame.key), PseudoLabels(
            scan.instance.astype(np.uint32), scan.tokens, np.ones(k, np.float32), np.ones(k, np.uint32),
            scan.in_frustum, {"camera_names": ["image_0"], "source": "ground truth (test)"}))
    return seq, out


def train_config(tmp_path: Path, pl, out: str, batch_size: int, steps: int = TRAIN_STEPS) -> Path:
    """A config/train_tiny.yaml run on ``pseudolabel_dir`` on the CPU, written to ``tmp_path/<out>.yaml``."""
    import yaml

    seq, pl_dir = pl
    cfg = yaml.safe_load((REPO / "config" / "train_tiny.yaml").read_text())
    cfg.update(out_dir=out, device="cpu", checkpoint_every=2,
               sources=[{"frames": str(seq), "pseudolabels": str(pl_dir)}])
    cfg["data"]["max_points"] = 4000
    cfg["optim"].update(steps=steps, warmup_steps=TRAIN_WARMUP, batch_size=batch_size)
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def eval_online(*args, timeout=240):
    """`sal-ros eval online ARGS` as a child process on localhost DDS; the CompletedProcess."""
    import subprocess

    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    return subprocess.run([sys.executable, "-m", "sal_ros.cli", "eval", "online", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def eval_online_rig(tmp_path_factory):
    """For `sal-ros eval online`: the converted 2-frame bag, a tiny random-weight checkpoint and node params
    naming both."""
    import yaml

    seq = require_data("semantickitti", "sequences", "00")
    require_rclpy()
    from sal_ros.data.convert import CLOUD_TOPIC, EXTRINSICS_FILE, convert, image_topic, info_topic
    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER

    root = tmp_path_factory.mktemp("eval_online")
    bag = root / "bag"
    convert(seq, bag, progress=False)
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {
            "cloud_topic": CLOUD_TOPIC, "cameras": ["image_0"],
            "camera": {"image_0": {"image_topic": image_topic("image_0"), "info_topic": info_topic("image_0")}},
            "calibration": {"source": "static", "file": str(bag / EXTRINSICS_FILE)},
            "sync": {"match_threshold": 0.03, "timeout": 0.5},
            "stats_period": 1.0,
        }},
        "sal_segmenter": {"ros__parameters": {
            "model": {"checkpoint": str(checkpoint), "device": "cpu"},
            "text_encoder": {"model": TINY_TEXT_ENCODER, "pretrained": ""},
            "prompts": ["car", "road", "tree"],
            "score_threshold": 0.0,
            "qos": {"outputs": {"reliability": "reliable", "depth": 5}},
        }},
    }))
    return type("Rig", (), {"root": root, "bag": bag, "params": params})


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the node runs: two threads on a loaded 2-core machine made model tests 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
