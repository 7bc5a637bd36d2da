"""``encoders.<modality>.init_from``: start an encoder from the weights of a saved model's encoder.

Why: an encoder that has already learned its modality (trained alone, or aligned to the other
modalities by a contrastive run) gives fusion something to combine from the first step; on tasks
where each modality alone is at chance, a randomly initialised fusion can otherwise stall there
(issue 16). Only that encoder's tensors are taken; the fusion and head start fresh.

The source must be an mmfuse model folder (``save_pretrained``) with an encoder for the same
modality key, built by the same encoder (same registry name, tensors of the same names and shapes),
and read its inputs the same way: the same modality kind and, for text, the same vocabulary (the
same ids must mean the same words), for images and audio the same preprocessing settings, for
features the same width. Anything else is a ``ConfigError`` naming the folder and what differs.
Weights are read from ``model.safetensors`` only (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.model import CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE, MultimodalModel, check_model_folder


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); the model folder is corrupt") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def _preprocessing_differences(modality: str, kind: str, saved: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """What makes the saved encoder read this modality's inputs differently, or None."""
    saved_kind = saved.get("modalities", {}).get(modality, {}).get("kind")
    if saved_kind != kind:
        return f"the modality '{modality}' is of kind '{saved_kind}' there, '{kind}' here"
    if kind == "text":
        if saved.get("tokenizers", {}).get(modality) != ours["tokenizers"].get(modality):
            return (f"the text tokenizer/vocabulary of '{modality}' differs (token ids would mean other words; "
                    "train on the same training split or the same pretrained tokenizer)")
        return None
    if kind == "features":
        width, theirs = ours["feature_dims"].get(modality), saved.get("feature_dims", {}).get(modality)
        return None if width == theirs else f"the feature width of '{modality}' is {theirs} there, {width} here"
    if saved.get(kind) != ours[kind]:
        keys = sorted(k for k in ours[kind] if saved.get(kind, {}).get(k) != ours[kind][k])
        return f"data.{kind} preprocessing differs ({', '.join(keys)})"
    return None


def init_encoder_from(model: MultimodalModel, modality: str, source: str | Path) -> None:
    """Copies the ``modality`` encoder's weights of the model saved in ``source`` into ``model``."""
    folder = Path(source)
    where = f"encoders.{modality}.init_from {folder}"
    try:
        check_model_folder(folder)
    except MMFuseError as exc:  # a missing file; say which option pointed there
        raise ConfigError(f"{where}: {exc}") from None
    spec = _json(folder / CONFIG_FILE).get("encoders", {})
    if modality not in spec:
        raise ConfigError(f"{where}: that model has no encoder for modality '{modality}' "
                          f"(it has: {', '.join(sorted(spec)) or 'none'})")
    ours_name = model.spec.encoders[modality].name
    if spec[modality].get("name") != ours_name:
        raise ConfigError(f"{where}: its '{modality}' encoder is '{spec[modality].get('name')}', this config's "
                          f"is '{ours_name}'")
    prep = _json(folder / PREPROCESSING_FILE).get("preprocessor", {})
    difference = _preprocessing_differences(modality, model.preprocessor.kind(modality), prep,
                                            model.preprocessor.state())
    if difference:
        raise ConfigError(f"{where}: {difference}")
    try:
        weights = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {WEIGHTS_FILE} ({exc})") from None
    prefix = f"encoders.{modality}."
    theirs = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    encoder = model.encoders[modality]
    expected = encoder.state_dict()
    for key, value in expected.items():
        if key not in theirs:
            raise ConfigError(f"{where}: lacks tensor '{prefix}{key}'; the encoders differ in architecture "
                              "(compare their options)")
        if tuple(theirs[key].shape) != tuple(value.shape):
            raise ConfigError(f"{where}: tensor '{prefix}{key}' has shape {tuple(theirs[key].shape)} there, "
                              f"{tuple(value.shape)} here; the encoders' options differ")
    extra = sorted(set(theirs) - set(expected))
    if extra:
        raise ConfigError(f"{where}: has tensor '{prefix}{extra[0]}' that this encoder does not; the encoders' "
                          "options differ")
    encoder.load_state_dict({k: v.to(expected[k].dtype) for k, v in theirs.items()})


def warm_start_encoders(model: MultimodalModel, config: ExperimentConfig) -> list[str]:
    """Applies every ``encoders.<m>.init_from`` of the config; returns the modalities warm-started."""
    done = []
    for modality in model.modalities:
        source = config.encoders[modality].init_from
        if source is not None:
            init_encoder_from(model, modality, source)
            done.append(modality)
    return done
