"""``sal-ros pseudolabel DATASET``: lift 2D masks and CLIP tokens onto every lidar frame of a dataset.

    sal-ros pseudolabel ../shared/data/semantickitti/sequences/00 --masks sam2 \\
        --sam2-checkpoint sam2.1_hiera_tiny.pt --clip-model ViT-B-16 --clip-pretrained openai --out pl/00

DATASET is a FrameStore folder (output defaults to DATASET/pseudolabels) or a dataset folder sal_ros reads
(SemanticKITTI sequence or root, nuScenes sample folder, KITTI object; --out required: raw data stays untouched).
One ``<key>.npz`` per frame is written atomically; a second run skips finished frames (resume); files made with
another configuration are refused unless --overwrite. ``--backend ray`` runs the workers on a private local Ray
instance, or with ``--ray-address`` (or RAY_ADDRESS) on a running cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sal_ros.core.errors import SensorDataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--out", type=Path, help="output folder (default DATASET/pseudolabels for a FrameStore)")
    parser.add_argument("--select", help="sequences and scans of a dataset with sequences, e.g. 00,05:0-4")
    m = parser.add_argument_group("2D masks")
    m.add_argument("--masks", choices=["slic", "sam", "sam2", "sam2_lidar", "geometric"], default="sam2",
                   help="sam2_lidar: SAM2-AMML, SAM 2 prompted at projected lidar clusters (--sam2-* options); "
                        "geometric: lidar ground removal + clustering, no weights (--ground-*, --cluster-* options)")
    m.add_argument("--prompt-border-px", type=float, default=8.0, help="sam2_lidar: drop prompts this near the border")
    m.add_argument("--prompt-boundary-px", type=float, default=4.0,
                   help="sam2_lidar: drop prompts this near another cluster's projected points")
    m.add_argument("--prompt-fuse-iou", type=float, default=0.5, help="sam2_lidar: fuse masks overlapping this much")
    m.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml", help="hydra config in sam2")
    m.add_argument("--sam2-checkpoint", help="SAM 2 weights (.pt)")
    m.add_argument("--sam-model-type", default="vit_h", choices=["vit_b", "vit_l", "vit_h"])
    m.add_argument("--sam-checkpoint", help="SAM weights (.pth)")
    m.add_argument("--image-size", type=int, help="SAM / SAM 2 input size (random weights only; speed)")
    m.add_argument("--points-per-side", type=int, default=32, help="automatic mask generator point grid")
    m.add_argument("--pred-iou-thresh", type=float, default=0.8)
    m.add_argument("--stability-score-thresh", type=float, default=0.95)
    m.add_argument("--slic-segments", type=int, default=150)
    m.add_argument("--flatten-overlap", type=float, default=0.8, help="drop a mask this much inside a kept one")
    from sal_ros.pseudolabel.augmentation import add_arguments as add_augment_arguments

    add_augment_arguments(m)
    from sal_ros.pseudolabel import geometric

    geometric.add_arguments(m)
    t = parser.add_argument_group("CLIP tokens")
    t.add_argument("--clip-model", default="ViT-B-16", help="open_clip model name (must match the text encoder)")
    t.add_argument("--clip-pretrained", help="open_clip pretrained tag or weights file")
    t.add_argument("--clip-model-config", type=Path, help="extra open_clip model config (json file or folder)")
    t.add_argument("--token-method", choices=["mask_attention", "dense", "crop"], default="mask_attention")
    t.add_argument("--no-tokens", action="store_true", help="instances only (tokens of dimension 0)")
    t.add_argument("--random-weights", action="store_true",
                   help="allow SAM/SAM 2/CLIP without weights (smoke tests only: the labels mean nothing)")
    g = parser.add_argument_group("lifting and refinement")
    g.add_argument("--lifting", choices=["occlusion", "naive"], default="occlusion")
    g.add_argument("--min-depth", type=float, default=1.0)
    g.add_argument("--lidar-spacing-deg", type=float, nargs=2, metavar=("AZIMUTH", "ELEVATION"),
                   help="angle between neighbouring lidar samples, sizes the occlusion test (default: the dataset's "
                        "lidar, else KITTI's HDL-64E 0.18 0.33; nuScenes' HDL-32E is 0.33 1.33)")
    g.add_argument("--fusion-iou", type=float, default=0.3, help="merge instances across cameras above this IoU")
    g.add_argument("--no-refine", action="store_true", help="skip DBSCAN replace")
    g.add_argument("--refine-eps", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    g.add_argument("--refine-iou", type=float, default=0.5)
    g.add_argument("--min-points", type=int, default=5, help="drop pseudo-instances with fewer points")
    r = parser.add_argument_group("run")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--backend", choices=["local", "ray"], default="local")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="--backend ray: join a running cluster, 'auto' (the one `ray start` runs on this machine) or "
                        "HOST:PORT of its head; default $RAY_ADDRESS, else a private local instance. Dataset and "
                        "--out must be on a filesystem every node mounts at the same path")
    r.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    r.add_argument("--overwrite", action="store_true", help="redo finished frames")
    r.add_argument("--max-frames", type=int)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--consolidate", type=int, default=0, metavar="K",
                   help="then consolidate over the K scans each side, registered by their poses (--semantic: "
                        "per-voxel votes of static classes; instances: tracklets with one id and one token); "
                        "into OUT/consolidated, resumable; 0 = off")
    r.add_argument("--consolidate-voxel", type=float, default=0.2, help="metres, voting cell of --consolidate")
    from sal_ros.pseudolabel import semantic_labeler

    semantic_labeler.add_arguments(parser)


def config_from_args(args: argparse.Namespace):
    from sal_ros.pseudolabel.augmentation import options_from_args as augment_options
    from sal_ros.pseudolabel.engine import EngineConfig
    from sal_ros.pseudolabel.lifting import LiftConfig
    from sal_ros.pseudolabel.refine import RefineConfig

    if args.masks == "slic":
        mask_options = {"n_segments": args.slic_segments}
    elif args.masks == "geometric":
        from sal_ros.pseudolabel import geometric

        mask_options = geometric.options_from_args(args)
    else:
        sam2 = args.masks in ("sam2", "sam2_lidar")
        ckpt = args.sam2_checkpoint if sam2 else args.sam_checkpoint
        if not ckpt and not args.random_weights:
            raise ValueError(f"--masks {args.masks} needs --{'sam2' if sam2 else 'sam'}-checkpoint (or "
                             "--random-weights for a smoke test)")
        mask_options = {"checkpoint": ckpt, "image_size": args.image_size, "points_per_side": args.points_per_side,
                        "pred_iou_thresh": args.pred_iou_thresh,
                        "stability_score_thresh": args.stability_score_thresh}
        mask_options.update({"config": args.sam2_config} if sam2 else {"model_type": args.sam_model_type})
        if args.masks == "sam2_lidar":  # the automatic generator's grid settings do not apply
            mask_options = {k: v for k, v in mask_options.items() if k in ("checkpoint", "image_size", "config")}
            mask_options["prompts"] = {"border_px": args.prompt_border_px, "boundary_px": args.prompt_boundary_px,
                                       "fuse_iou": args.prompt_fuse_iou}
        mask_options = {k: v for k, v in mask_options.items() if v is not None}
    if not args.no_tokens and not args.clip_pretrained and not args.random_weights:
        raise ValueError("--clip-pretrained is needed for meaningful tokens (or --no-tokens / --random-weights)")
    token_options = {"model_config": str(args.clip_model_config)} if args.clip_model_config else {}
    return EngineConfig(
        masks=args.masks, mask_options=mask_options, flatten_overlap=args.flatten_overlap,
        augment=augment_options(args), tokens=not args.no_tokens,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, token_method=args.token_method,
        token_options=token_options,
        lift=LiftConfig(min_depth=args.min_depth, occlusion=args.lifting == "occlusion",
                        lidar_spacing_deg=_lidar_spacing(args)), fusion_iou=args.fusion_iou,
        refine=None if args.no_refine else RefineConfig(eps=tuple(args.refine_eps), iou_threshold=args.refine_iou),
        min_points=args.min_points, device=args.device)


def semantic_config(args: argparse.Namespace):
    from sal_ros.pseudolabel import semantic_labeler
    from sal_ros.pseudolabel.lifting import LiftConfig

    lift = LiftConfig(min_depth=args.min_depth, occlusion=args.lifting == "occlusion",
                      lidar_spacing_deg=_lidar_spacing(args))
    return semantic_labeler.config_from_args(args, lift)


def _lidar_spacing(args: argparse.Namespace) -> tuple[float, float]:
    from sal_ros.data.sources import source_kind
    from sal_ros.pseudolabel.lifting import lidar_spacing_for

    if args.lidar_spacing_deg is not None:
        return tuple(args.lidar_spacing_deg)
    return lidar_spacing_for(source_kind(args.dataset))


def main(args: argparse.Namespace) -> int:
    from sal_ros.pseudolabel.engine import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.ray_address and args.backend != "ray":
            raise ValueError("--ray-address needs --backend ray")
        config = semantic_config(args) if args.semantic else config_from_args(args)
        if args.semantic and args.out is None and (args.dataset / "frames").is_dir():
            args.out = args.dataset / "semantic_pseudolabels"  # a FrameStore keeps its instance labels apart
        summary = run(args.dataset, config, args.out, workers=args.workers, backend=args.backend,
                      overwrite=args.overwrite, max_frames=args.max_frames, progress=not args.no_progress,
                      ray_address=args.ray_address, select=args.select)
        consolidated = _consolidate(args, summary) if args.consolidate else None
    except (SensorDataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"sal-ros pseudolabel: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**vars(summary), **({"consolidated": consolidated} if consolidated else {})}))
    return 0 if not summary.failed else 1


def _consolidate(args: argparse.Namespace, summary) -> dict:
    from sal_ros.pseudolabel.consolidate import ConsolidationConfig, consolidate_folder

    config = ConsolidationConfig(enabled=True, window=args.consolidate, voxel=args.consolidate_voxel)
    out = Path(summary.out_dir)
    return {**consolidate_folder(args.dataset, out, out / "consolidated", config, args.overwrite,
                                 progress=not args.no_progress, semantic=args.semantic),
            "out_dir": str(out / "consolidated")}
