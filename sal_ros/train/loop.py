"""What every trainer of sal_ros runs on (``train``, the semantic student, ``pretrain``): torchrun processes, AdamW
with warm-up + cosine decay, step-indexed batches, every RNG's state, the training state file with exact resume
(``TrainingRun.save`` / ``resume``), the metrics log and the step loop.

Exact resume: the batch of step ``s`` is a pure function of (seed, s) (``batch_indices``), a trainer's random
draws come from generators seeded by (seed, step), and the training state saves optimizer, scheduler, the torch,
CUDA, numpy and python RNG states, the step, the config and the process count, all as tensors and plain data
(read with ``torch.load(weights_only=True)``). Stopping after step k (``fit(stop_at=k)``) and resuming gives
bit-identical weights to an uninterrupted run; a resume whose config (schedule, data, model, loss, seed) or
process count differs from the saved run is refused (``ResumeError``).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # what torch.load(weights_only=True) raises on anything but data

import numpy as np
import torch

from sal_ros.core.files import atomic_write
from sal_ros.model.checkpoint import CheckpointError

METRICS_FILE = "metrics.jsonl"
# Settings that do not change the trajectory, so a resume may change them.
RESUME_FREE = ("out_dir", "checkpoint_every", "log_every", "device", "self_training")


class ResumeError(ValueError):
    """The saved run cannot be continued with this config; the text names what differs."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    steps: int = 100
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    batch_size: int = 2  # per process
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU



# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment; single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world > 1:
        import torch.distributed as tdist

        value = value.clone()
        tdist.all_reduce(value)
    return value


# ---------------------------------------------------------------------------------------------- schedule / data
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from ~0 to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distributed(module: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when more than one process trains, else itself."""
    if dist.world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def optimizer_and_schedule(module: torch.nn.Module, o: "OptimConfig"):
    """AdamW and its warm-up + cosine schedule (one factor per step)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, o.steps, o.min_lr_ratio))


def apply_gradients(module: torch.nn.Module, optimizer, scheduler, loss: torch.Tensor,
                    grad_clip: float) -> tuple[float, float]:
    """One optimizer step on ``loss`` with gradient clipping; returns (the step's learning rate, gradient norm)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip) if grad_clip > 0 else torch.tensor(0.0)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    return lr, float(grad_norm)


def batch_indices(step: int, batch_size: int, dist: Dist, n: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, index) pairs for this rank at ``step``: a seeded permutation per epoch, split across ranks."""
    global_bs = batch_size * dist.world
    out = []
    for j in range(dist.rank * batch_size, (dist.rank + 1) * batch_size):
        pos = step * global_bs + j
        epoch = pos // n
        perm = np.random.default_rng([seed, epoch, 1]).permutation(n)
        out.append((epoch, int(perm[pos % n])))
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and tuples only, so the training state loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_train_state(path: Path, required: tuple[str, ...] = ("step", "model", "config")) -> dict:
    """The saved training state, read as data only (weights_only): a file planted in a run folder runs no code.
    States written before the RNG state was stored as tensors hold numpy arrays, allowed as plain data too.
    Anything else (not a regular file, corrupt, not a mapping with ``required``) is a ResumeError naming it."""
    from sal_ros.core.files import check_regular_file

    numpy_data = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct]
    try:
        check_regular_file(path, None, "training state")
        with torch.serialization.safe_globals(numpy_data):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:300]
        raise ResumeError(f"refusing to resume from {path}: the file is not plain data (tensors, numbers, "
                          f"strings) and loading it could run code; delete it or start a new run with --out "
                          f"({first})") from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # torch: RuntimeError on a corrupt zip
        raise ResumeError(f"cannot resume from {path}: not a readable training state ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None
    missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise ResumeError(f"cannot resume from {path}: not a training state (no {', '.join(missing)})")
    return state


def state_file(out: Path, state: dict, state_path: Path, key: str = "model") -> Path:
    """The file a training state names under ``key``: a plain file name in the run folder ``out``. A planted
    ``../../weights.pt`` or an absolute path is refused, so a state never reads outside its run."""
    name = state.get(key)
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ResumeError(f"refusing to resume from {state_path}: its {key!r} entry {name!r} is not a file name in "
                          f"the run folder {out}")
    return out / name



def fit_steps(trainer, stop_at: int | None, desc: str, plot) -> list[dict]:
    """The step loop of a trainer (``train``, the semantic student, ``pretrain``): ``train_step`` until
    ``stop_at`` (default: the schedule's end), metrics.jsonl every ``log_every`` steps, ``save`` and curves every
    ``checkpoint_every`` steps and where it stops; tqdm on the main process."""
    from tqdm import tqdm

    cfg, main = trainer.cfg, trainer.dist.main
    end = cfg.optim.steps if stop_at is None else min(stop_at, cfg.optim.steps)
    log = trainer.out / METRICS_FILE
    if main:  # lines past the start step are from a run killed before its next checkpoint: they are redone
        truncate_metrics(log, trainer.step)
    records = []
    bar = tqdm(total=end, initial=trainer.step, desc=desc, unit="step", disable=not (trainer.progress and main))
    t0 = time.perf_counter()
    while trainer.step < end:
        rec = trainer.train_step()
        rec["time_s"] = time.perf_counter() - t0
        records.append(rec)
        if main and (trainer.step % cfg.log_every == 0 or trainer.step == end):
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
        bar.update(1)
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == end:
            trainer.save()
            if main:
                plot(log, trainer.out / "curves.png")
    bar.close()
    return records


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)



def config_diff(saved: dict, now: dict) -> list[str]:
    """'key: saved X, now Y' for every trajectory setting that differs (nested keys dotted)."""
    # a JSON round trip makes tuples and lists compare equal (betas, augment ranges)
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    return _diff({k: v for k, v in saved.items() if k not in RESUME_FREE},
                 {k: v for k, v in now.items() if k not in RESUME_FREE})


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines from steps after the resumed one (they will be redone)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write(path, "".join(ln + "\n" for ln in lines))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------- the run
class TrainingRun:
    """Device and processes, the run folder, optimizer and schedule, and checkpoints that resume exactly: what
    the trainers share. A subclass names its files (``STATE_FILE``, ``LAST_FILE``, ``checkpoint_path``), writes
    and reads its weights (``write_weights``, ``read_weights``) and defines ``train_step``; ``attach`` gives the
    run its module once built."""

    STATE_FILE = "train_state.pt"
    LAST_FILE = "model_last.pt"

    def __init__(self, cfg, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        self.out = Path(cfg.out_dir)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.step = 0

    def attach(self, module: torch.nn.Module) -> None:
        """``module`` on the device (``self.module``), DDP-wrapped when several processes train (``self.model``),
        and its optimizer and schedule."""
        self.module = module.to(self.device)
        self.model = distributed(self.module, self.dist, self.device)
        self.optimizer, self.scheduler = optimizer_and_schedule(self.module, self.cfg.optim)
        self.amp = self.cfg.optim.amp and self.device.type == "cuda"

    @property
    def state_path(self) -> Path:
        return self.out / self.STATE_FILE

    def checkpoint_path(self, step: int) -> Path:
        raise NotImplementedError

    def write_weights(self, path: Path) -> None:
        raise NotImplementedError

    def read_weights(self, path: Path) -> None:
        """Load the weights file ``path`` into the module; a CheckpointError names what is wrong with it."""
        raise NotImplementedError

    def save(self) -> Path | None:
        """Weights file + training state (rank 0). The state is written last: it names a complete weights file;
        ``LAST_FILE`` is then swapped to the same bytes (a hard link, atomically)."""
        if not self.dist.main:
            return None
        path = self.checkpoint_path(self.step)
        self.write_weights(path)
        state = {"step": self.step, "model": path.name, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "config": self.cfg.to_dict(),
                 "world": self.dist.world}
        atomic_write(self.state_path, lambda f: torch.save(state, f))
        tmp = self.out / f".{self.LAST_FILE}.tmp"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, self.out / self.LAST_FILE)
        return path

    def resume(self) -> int:
        """Load the training state in out_dir; returns the step to continue from (0 if there is none)."""
        if not self.state_path.exists():
            return 0
        state = load_train_state(self.state_path)
        self.check_resumable(state)
        try:
            self.read_weights(state_file(self.out, state, self.state_path))
        except CheckpointError as exc:
            raise ResumeError(f"cannot resume from {self.state_path}: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "rng" in state:
            set_rng_state(state["rng"])
        else:  # a pretrain state written before every RNG was saved
            torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        if self.dist.main:
            truncate_metrics(self.out / METRICS_FILE, self.step)
        return self.step

    def check_resumable(self, state: dict) -> None:
        """Raise ResumeError unless continuing ``state`` with this config reproduces the uninterrupted run."""
        diffs = config_diff(state["config"], self.cfg.to_dict())
        world = int(state.get("world", 1))
        if world != self.dist.world:
            diffs.append(f"processes: saved {world}, now {self.dist.world}")
        if diffs:
            raise ResumeError(
                f"cannot resume {self.state_path} (step {state['step']}): the config differs from the saved run "
                f"({'; '.join(diffs)}). Resume with the saved settings, or start a new run with --out. "
                f"To stop a run early and continue it later, use --stop-at K: it keeps the schedule")
