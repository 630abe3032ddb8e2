"""Self-training (LOSC's iterative fine-tuning): a trained student's confident predictions on its own training
scans become labels for the next round, above all on the points no camera sees (the teacher never labels them, so
the crop keeps them out of round 0 and the student only ever learns the ~90 degrees a camera sees).

Round r >= 1 (``relabel``): the round r-1 student runs on every training scan (the whole scan). A point outside the
labelled region (``in_frustum``; with ``outside_only: false`` any point without a label) is labelled when its best
query's fused score (sigmoid(mask) x P(object), the node's score) reaches ``threshold`` and that query owns at least
``min_points`` such points. A query whose points inside the frustum mostly carry one teacher instance extends that
instance (an object cut by the frustum edge is completed with the teacher's id and token); any other becomes a new
instance with the student's own token. The labelled region grows by the new points, so the crop lets them in.
The student of round r-1 is fine-tuned on these labels for ``steps`` steps (``data`` overrides apply: FrankenFrustum
is off by default, since the labelled regions now span the scan and rotated copies would overlap).

Each round lives in ``<out_dir>/round_<r>`` (its own exact resume; ``done.json`` once finished): a rerun continues
where it stopped. Settings: the training yaml's ``self_training`` section (``SelfTrainConfig``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sal_ros.core.files import atomic_write
from sal_ros.core.settings import known_settings
from sal_ros.model.inference import fuse_queries
from sal_ros.train.dataset import DistillDataset, LabeledScan
from sal_ros.train.loop import resolve_device
from sal_ros.train.trainer import TrainConfig, Trainer, build_model, load_model_weights

DONE_FILE = "done.json"


@dataclass
class SelfTrainConfig:
    rounds: int = 0  # rounds after the first training (0 = off)
    threshold: float = 0.5  # a point's fused score must reach this to become a label
    min_points: int = 20  # a query needs this many confident new points to become (or extend) an instance
    outside_only: bool = True  # label only points outside the labelled region; False: every unlabelled point
    steps: int = 0  # fine-tuning steps per round (0: the recipe's optim.steps)
    data: dict = field(default_factory=lambda: {"franken_frustum": 1})  # data overrides for the rounds

    @classmethod
    def from_dict(cls, d: dict | None) -> "SelfTrainConfig":
        cfg = cls(**known_settings(cls, d, "self_training"))
        if cfg.rounds < 0 or not 0.0 < cfg.threshold <= 1.0 or cfg.min_points < 1 or cfg.steps < 0:
            raise ValueError(f"self_training: rounds >= 0, 0 < threshold <= 1, min_points >= 1, steps >= 0; got "
                             f"{asdict(cfg)}")
        return cfg


@torch.inference_mode()
def predict(model, scan: LabeledScan, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The student on a whole scan: per point its best query and fused score, and (Q, D) unit query tokens."""
    model.eval()
    vin = model.prepare(torch.from_numpy(scan.points).to(device), torch.from_numpy(scan.intensity).to(device))
    pred = model.decode(model.backbone(vin.voxels), 1, all_layers=False)[-1]
    query_v, score_v = fuse_queries(pred.masks[0], pred.objectness[0])
    p2v = vin.point_to_voxel[0]
    tokens = torch.nn.functional.normalize(pred.tokens[0].float(), dim=-1)
    return query_v[p2v].cpu().numpy(), score_v[p2v].float().cpu().numpy(), tokens.cpu().numpy()


def relabel(scan: LabeledScan, query: np.ndarray, score: np.ndarray, tokens: np.ndarray,
            cfg: SelfTrainConfig) -> tuple[LabeledScan, dict]:
    """The scan with the student's confident predictions added as labels (see the module text), and counts."""
    open_ = ~scan.in_frustum if cfg.outside_only else scan.instance == 0
    candidate = open_ & (score >= cfg.threshold)
    instance, new_tokens = scan.instance.copy(), [scan.tokens]
    next_id, extended, created = len(scan.tokens) + 1, 0, 0
    counts = np.bincount(query[candidate], minlength=len(tokens))
    for q in np.flatnonzero(counts >= cfg.min_points):
        points = candidate & (query == q)
        teacher = scan.instance[(query == q) & (scan.instance > 0)]
        if teacher.size:
            ids, n = np.unique(teacher, return_counts=True)
            if n.max() * 2 > teacher.size:  # mostly one teacher instance: the same object, carried on
                instance[points] = ids[n.argmax()]
                extended += 1
                continue
        instance[points] = next_id
        new_tokens.append(tokens[q][None].astype(np.float32))
        next_id, created = next_id + 1, created + 1
    added = instance != scan.instance
    out = replace(scan, instance=instance, tokens=np.concatenate(new_tokens), in_frustum=scan.in_frustum | added)
    return out, {"points": int(added.sum()), "open_points": int(open_.sum()), "extended": extended,
                 "created": created}


def round_config(cfg: TrainConfig, st: SelfTrainConfig, r: int) -> TrainConfig:
    """Round ``r``'s training config: its folder, the rounds' steps and data overrides, no further rounds."""
    d = cfg.to_dict()
    d["out_dir"] = str(Path(cfg.out_dir) / f"round_{r}")
    d["self_training"] = {}
    d["data"] = {**d["data"], **st.data}
    if st.steps:
        d["optim"]["steps"] = st.steps
    return TrainConfig.from_dict(d)


def run_round(cfg: TrainConfig, scans: list[LabeledScan], previous: Path, r: int, progress: bool = True) -> dict:
    """Round ``r``: relabel ``scans`` with the student in ``previous`` and fine-tune it; cached in its folder."""
    st = SelfTrainConfig.from_dict(cfg.self_training)
    rc = round_config(cfg, st, r)
    out = Path(rc.out_dir)
    done = out / DONE_FILE
    if done.exists():
        return json.loads(done.read_text())
    device = resolve_device(rc.device)
    token_dim = next((s.tokens.shape[1] for s in scans if len(s.tokens)), None)
    model = build_model(rc.model, token_dim)
    load_model_weights(previous, model)
    model.to(device)
    relabelled, totals = [], {"points": 0, "open_points": 0, "extended": 0, "created": 0}
    from tqdm import tqdm

    for scan in tqdm(scans, desc=f"relabel round {r}", unit="scan", disable=not progress):
        new, counts = relabel(scan, *predict(model, scan, device), st)
        relabelled.append(new)
        totals = {k: totals[k] + counts[k] for k in totals}
    trainer = Trainer(rc, DistillDataset(relabelled, rc.data, seed=rc.seed), progress=progress, model=model)
    trainer.resume()
    records = trainer.fit()
    info = {"round": r, "checkpoint": str(out / "model_last.pt"), "from": str(previous), "steps": rc.optim.steps,
            "labels": {**totals, "share_of_open": totals["points"] / max(totals["open_points"], 1)},
            "final_loss": records[-1]["loss"] if records else None}
    atomic_write(done, json.dumps(info, indent=1))
    return info


def self_train(cfg: TrainConfig, scans: list[LabeledScan], first: Path, progress: bool = True,
               on_round=None) -> list[dict]:
    """Every round after the student ``first`` (round 0), each from the one before; ``on_round(info)`` after each
    (e.g. to score it). Returns the rounds' infos."""
    st = SelfTrainConfig.from_dict(cfg.self_training)
    rounds, previous = [], Path(first)
    for r in range(1, st.rounds + 1):
        info = run_round(cfg, scans, previous, r, progress)
        if on_round is not None:
            on_round(info)
        rounds.append(info)
        previous = Path(info["checkpoint"])
    return rounds

