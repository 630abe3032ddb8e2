"""``--backend ray``: per-frame workers as Ray actors, on a private local instance or on a running cluster.

Two users hand in their own worker functions: the pseudo-label engine (``sal-ros pseudolabel``) and the teacher
cache of pretraining (``sal-ros pretrain --cache-only``, sal_ros.pretrain.cache).

Address: ``--ray-address``, else ``RAY_ADDRESS``, else ``"local"``: a private instance on this machine's loopback,
stopped after the run. ``"local"`` is passed explicitly because Ray's default (None) joins whatever cluster
``ray start`` last ran on this machine. ``"auto"`` joins that cluster on purpose; ``HOST:PORT`` joins that head.

Each worker reserves CPUs (and one GPU with ``--device cuda``), so Ray places workers where those resources are
and never more on a node than it holds. Frames go to whichever placed worker is free; a worker the cluster cannot
place (yet) never holds a frame, so a run asking for more workers than fit ends when the placed ones are done.
Workers open the dataset and write ``--out`` by absolute path: on a cluster both must be on a filesystem every
node mounts at the same path, and every node needs sal_ros installed.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Callable, Iterator


log = logging.getLogger(__name__)

WAIT_LOG_S = 60.0  # say so when no worker has started for this long (the cluster may be busy or too small)


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or "local"


def is_loopback(address: str) -> bool:
    """``HOST:PORT`` (or a bare host) names this machine's loopback; no name lookup."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_resources(address: str, workers: int, device: str) -> tuple[int, int]:
    """(CPUs, GPUs) one worker reserves: a private instance splits this machine's cores; on a cluster one CPU
    each, so that Ray spreads workers over the nodes (ask for as many workers as the cluster has CPUs / GPUs)."""
    cpus = max(1, (os.cpu_count() or 1) // max(workers, 1)) if address == "local" else 1
    return cpus, int(device.startswith("cuda"))


def connect(address: str, workers: int, cpus: int):
    """Start or join Ray; returns (ray, whether this call connected, so the run disconnects)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    if address == "local" or is_loopback(address):
        # Ray maps 127.0.0.1 to the machine's interface address unless told it serves this machine only;
        # read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--backend ray needs the ray package (pip install 'ray==2.*')") from exc
    if ray.is_initialized():  # called from a Ray program: use its connection, leave it open
        return ray, False
    common = dict(log_to_driver=False, configure_logging=False)
    if address == "local":
        ray.init(address="local", num_cpus=workers * cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", **common)
        return ray, True
    try:
        ray.init(address=address, **common)
    except ConnectionError as exc:
        raise RuntimeError(f"cannot join the Ray cluster at {address}: {exc} (a cluster with token authentication "
                           "also needs RAY_AUTH_MODE=token and its token, as any Ray driver)") from exc
    return ray, True


def check_fits(ray, cpus: int, gpus: int, address: str) -> None:
    """Refuse at once where no node can ever host a worker; Ray would wait for one forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    have = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes) or "none"
    raise RuntimeError(f"no node of the Ray cluster ({address}) can host a worker with {cpus} CPU and {gpus} GPU "
                       f"(nodes: {have})" + ("; --device cuda needs a GPU node" if gpus else ""))


class FrameWorker:
    """One actor: builds the 2D models once (``init_worker``), then does the frames it is handed (``label_key``).

    The caller hands both in (the engine: the same functions its local process pool runs), so this module needs
    neither the engine nor the cache."""

    def __init__(self, init_worker: Callable, label_key: Callable, source_path: str, config: dict, out_dir: str,
                 threads: int) -> None:
        if config.get("device", "cpu").startswith("cuda"):
            # Ray makes the reserved GPU the only visible one: it is cuda:0 whatever index was asked for.
            config = {**config, "device": "cuda"}
        init_worker(source_path, config, out_dir, threads)
        self._label_key = label_key

    def ready(self) -> bool:
        return True

    def label(self, key: str) -> tuple[str, str | None]:
        return self._label_key(key)


def label(todo: list[str], args: tuple, workers: int, address: str | None, summary, init_worker: Callable,
          label_key: Callable) -> Iterator[tuple]:
    """Yield (key, error) per frame from Ray workers; ``summary.workers`` counts the workers that started."""
    address = resolve_address(address)
    cpus, gpus = worker_resources(address, workers, args[1].get("device", "cpu"))
    ray, connected = connect(address, max(workers, 1), cpus)
    actors = []
    try:
        check_fits(ray, cpus, gpus, address)
        actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(FrameWorker)
        actors = [actor.remote(init_worker, label_key, *args, cpus) for _ in range(max(workers, 1))]
        yield from _dispatch(ray, actors, todo, summary)
    finally:
        for a in actors:  # also the ones never placed, which would otherwise wait in the cluster's queue
            ray.kill(a)
        if connected:
            ray.shutdown()


def _dispatch(ray, actors: list, todo: list[str], summary) -> Iterator[tuple]:
    """Hand each frame to the next worker that is free; workers that never start are never waited for."""
    queue, busy = list(todo), 0
    waiting = {a.ready.remote(): (a, None) for a in actors}  # object ref -> (actor, frame key or None)
    while queue or busy:
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=WAIT_LOG_S)
        if not done:
            if not summary.workers:
                log.warning("no Ray worker has started for %.0f s: the cluster has no free resources", WAIT_LOG_S)
            continue
        a, key = waiting.pop(done[0])
        result = ray.get(done[0])  # raises when the worker could not start (its models failed to build)
        if key is None:
            summary.workers += 1
        else:
            busy -= 1
            yield result
        if queue:
            key = queue.pop(0)
            waiting[a.label.remote(key)] = (a, key)
            busy += 1
