"""What every pretrained encoder shares: fine-tuning control, dtype, and the restore contract.

The adapters (``hf.py``: hf_text, hf_image, hf_audio, sentence_transformers; ``timm_image.py``;
``ge2e.py``) wrap a pretrained ``backbone`` and turn its outputs into ``Features``. This module
decides which backbone parameters train:

- ``frozen``: nothing trains; the backbone stays in eval mode (dropout off, BatchNorm statistics
  fixed) even while the model trains, and runs under ``no_grad`` so no activations are kept;
- ``full``: everything trains;
- ``last_n``: only the last ``n_layers`` blocks of the backbone's main layer stack train, plus
  whatever follows that stack (final norm, conv head); embeddings and earlier blocks are frozen.

A saved model keeps every backbone weight in its ``model.safetensors``; the architecture files go
to ``encoders/<modality>/`` (see ``MultimodalModel.save_pretrained``), and on restore the encoder
context's ``assets`` points there, so the original hub name or folder is never needed again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfuse.core.contracts import EncoderContext
from mmfuse.core.errors import ConfigError
from mmfuse.encoders.base import Encoder

Trainable = Literal["frozen", "full", "last_n"]
DType = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRETRAINED_ENCODERS = ("ge2e_audio", "hf_audio", "hf_image", "hf_text", "sentence_transformers", "timm_image")
"""Registered encoders that load a pretrained model; tests/test_pretrained.py covers them (they need
model files, so the generic contract tests in tests/test_encoders.py leave them out)."""
_LAYER_STACK_NAMES = ("layer", "layers", "blocks", "stages", "block", "resblocks")


def require_kind(context: EncoderContext, kind: str, name: str) -> None:
    if context.kind != kind:
        raise ConfigError(f"encoder '{name}' reads {kind} but the modality is of kind '{context.kind}'")


class PretrainedEncoder(Encoder):
    """Base class: a pretrained ``backbone`` with fine-tuning control.

    Subclasses build ``self.backbone`` before calling ``setup`` and run it inside
    ``self.backbone_context()`` so frozen backbones cost no autograd memory.
    """

    backbone: Any  # an nn.Module; Any because HF/timm models add attributes mypy cannot see

    def setup(self, name: str, trainable: Trainable, n_layers: int, dtype: DType) -> None:
        self.trainable = trainable
        self.dtype = DTYPES[dtype]
        # Always cast: transformers 5 may load a checkpoint in its stored dtype (fp16 weights on the hub).
        self.backbone.to(self.dtype)
        set_trainable(self.backbone, trainable, n_layers, name)
        if self.frozen:
            self.backbone.eval()

    @property
    def frozen(self) -> bool:
        """True when no backbone weight trains (the feature cache may then store its outputs)."""
        return self.trainable == "frozen"

    def train(self, mode: bool = True) -> PretrainedEncoder:
        """Frozen backbones stay in eval mode: their dropout and BatchNorm statistics never change."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    @contextlib.contextmanager
    def backbone_context(self) -> Iterator[None]:
        if self.frozen:
            with torch.no_grad():
                yield
        else:
            yield

    def to_backbone_dtype(self, x: Tensor) -> Tensor:
        return x.to(self.dtype) if x.is_floating_point() else x

    channels_last: bool = False

    def use_channels_last(self, enabled: bool) -> None:
        """NHWC weights (and inputs, see ``pixels_for_backbone``): faster convolutions on tensor cores."""
        self.channels_last = enabled
        if enabled:
            self.backbone.to(memory_format=torch.channels_last)

    def pixels_for_backbone(self, pixels: Tensor) -> Tensor:
        """Image inputs in the backbone's dtype and memory format."""
        pixels = self.to_backbone_dtype(pixels)
        return pixels.contiguous(memory_format=torch.channels_last) if self.channels_last else pixels


def set_trainable(backbone: nn.Module, trainable: Trainable, n_layers: int, name: str) -> None:
    """Sets ``requires_grad`` on the backbone's parameters as ``trainable`` asks."""
    if trainable == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if trainable == "frozen":
        return
    if trainable != "last_n":
        raise ConfigError(f"encoder '{name}': trainable must be frozen, full or last_n, got '{trainable}'")
    prefix, layers = layer_stack(backbone)
    if prefix is None:
        raise ConfigError(f"encoder '{name}': trainable last_n needs a backbone with a stack of layers; "
                          f"none found in {type(backbone).__name__} (use frozen or full)")
    if not 1 <= n_layers <= len(layers):
        raise ConfigError(f"encoder '{name}': n_layers must be between 1 and {len(layers)} "
                          f"(the backbone has {len(layers)} layers), got {n_layers}")
    for layer in layers[len(layers) - n_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    # What comes after the stack in the forward pass (final norm, conv head) trains with it;
    # parameters are registered in forward order in HF and timm models, so "after" is by position.
    stack_ids = {id(p) for layer in layers for p in layer.parameters()}
    seen_stack = False
    for pname, p in backbone.named_parameters():
        if id(p) in stack_ids:
            seen_stack = True
        elif seen_stack and not pname.startswith(prefix + "."):
            p.requires_grad_(True)


def layer_stack(backbone: nn.Module) -> tuple[str | None, list[nn.Module]]:
    """The backbone's main stack of blocks: the largest ModuleList/Sequential named like one.

    BERT/ViT ``encoder.layer``, wav2vec2/Whisper ``encoder.layers``, ConvNeXt/ResNet
    ``encoder.stages``, timm ``blocks``/``stages``; timm ResNets (``layer1``..``layer4``) use
    their four stages.
    """
    best: tuple[str | None, list[nn.Module], int] = (None, [], 0)
    for mname, module in backbone.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or not len(module):
            continue
        if mname.rsplit(".", 1)[-1] not in _LAYER_STACK_NAMES:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best[2]:
            best = (mname, list(module), size)
    if best[0] is not None:
        return best[0], best[1]
    stages = [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    if len(stages) == 4:
        return "layer", stages
    return None, []
