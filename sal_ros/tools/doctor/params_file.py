"""Checks of what a params file names: the checkpoint (and the text encoder it was trained with), the
vocabulary, the static calibration of the cameras."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sal_ros.tools.doctor.report import FAIL, INFO, OK, WARN, Check


def params_checks(path: Path) -> tuple[dict[str, Any] | None, list[Check]]:
    """The segmenter's values from ``path`` (defaults filled in), and checks of what they name."""
    from sal_ros.nodes import params as P

    try:
        raw = P.load_params_file(path, P.SEGMENTER_NODE)
    except ValueError as exc:
        return None, [Check("params file", FAIL, str(exc), "fix the file")]
    unknown = P.unknown_names(P.SEGMENTER_NODE, raw)
    values = {s.name: s.default for s in P.all_specs(P.SEGMENTER_NODE, raw)}
    values.update(raw)
    checks = [Check("params file", WARN if unknown else OK,
                    f"{path}: unknown parameter(s) {unknown}" if unknown else f"{path}: {len(raw)} value(s)",
                    "the node refuses unknown names: see `sal-ros run --list-params`")]
    checks += [check_checkpoint(values), check_vocabulary(values), check_calibration(values)]
    return values, checks


def check_checkpoint(values: dict[str, Any]) -> Check:
    from sal_ros.model.checkpoint import CheckpointError, load_checkpoint
    from sal_ros.model.open_clip_models import encoder_identity

    path = values.get("model.checkpoint") or ""
    if not path:
        return Check("checkpoint", WARN, "model.checkpoint is empty: a tiny RANDOM model runs (meaningless labels)",
                     "set model.checkpoint to a trained SAL checkpoint")
    try:
        _, meta = load_checkpoint(path)
    except CheckpointError as exc:
        return Check("checkpoint", FAIL, str(exc), "the node cannot start with it: point at a sal_ros checkpoint")
    trained = (meta.get("text_encoder") or {}).get("identity")
    wanted = encoder_identity(values["text_encoder.model"], values["text_encoder.pretrained"] or None)
    detail = f"{path}: {meta['model_config'].decoder.num_queries} queries, {meta['token_dim']}-d tokens, trained with text " \
             f"encoder {trained or 'not recorded'}"
    if trained and trained != wanted:
        return Check("checkpoint", WARN, detail + f"; the params give {wanted}",
                     "class names only mean something with the encoder the model was trained with: set "
                     "text_encoder.model / text_encoder.pretrained to match")
    return Check("checkpoint", OK, detail)


def check_vocabulary(values: dict[str, Any]) -> Check:
    from sal_ros.model.vocabulary import Vocabulary, VocabularyError

    source = values.get("vocabulary_file") or ""
    try:
        vocabulary = Vocabulary.from_yaml(source) if source else Vocabulary.from_prompts(list(values["prompts"]))
    except (VocabularyError, OSError, ValueError) as exc:
        return Check("vocabulary", FAIL, f"{source or 'prompts'}: {exc}", "the node refuses it: fix the file/prompts")
    names = [c.name for c in vocabulary.classes]
    return Check("vocabulary", OK, f"{source or 'prompts'}: {len(names)} class(es): {', '.join(names[:8])}"
                 f"{' ...' if len(names) > 8 else ''}")


def check_calibration(values: dict[str, Any]) -> Check:
    from sal_ros.core.calibration import read_static_extrinsics
    from sal_ros.core.errors import CalibrationError

    cameras = list(values.get("cameras") or [])
    if not cameras:
        return Check("cameras", OK, "none configured: lidar-only (no overlays)")
    if values["calibration.source"] == "tf":
        return Check("cameras", INFO, f"{cameras}: extrinsics from TF (`--live` checks the transforms)")
    path = values.get("calibration.file") or ""
    if not path:
        return Check("cameras", FAIL, "calibration.source is static but calibration.file is empty",
                     "name the static extrinsics YAML (sal-ros convert writes extrinsics.yaml)")
    try:
        calib = read_static_extrinsics(path)
    except CalibrationError as exc:
        return Check("cameras", FAIL, str(exc), "fix the calibration file")
    by_frame = {c.frame_id for c in calib.values()}
    unmatched = [c for c in cameras if c not in calib]
    detail = f"{path}: {sorted(calib)} for cameras {cameras}"
    if unmatched:
        return Check("cameras", WARN, detail + f"; {unmatched} not in the file by name",
                     f"they then match by their images' frame_id, one of {sorted(by_frame)} (`--live` checks it)")
    return Check("cameras", OK, detail)

