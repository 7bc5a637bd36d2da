"""``MultimodalModel`` = one encoder per modality + a fusion method + a task head.

It is a plain ``nn.Module`` usable without Lightning, and it saves/loads like a Hugging Face
model: ``save_pretrained(dir)`` writes ``config.json`` (architecture), ``preprocessing.json``
(vocabularies, audio/image settings, label names) and ``model.safetensors`` (weights);
``from_pretrained(dir)`` rebuilds it with bit-identical outputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pydantic
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmfuse.config import ComponentConfig, EncoderConfig, ExperimentConfig, FusionConfig, TaskConfig
from mmfuse.core.atomic import atomic_file, staged_folder, write_text_atomic
from mmfuse.core.contracts import Batch, Features
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.core.tracing import eager_all, eager_any
from mmfuse.core.version import __version__
from mmfuse.data.dataset import CACHED_MASK, CACHED_POOLED, CACHED_TOKENS
from mmfuse.data.preprocess import Preprocessor
from mmfuse.encoders import ENCODERS, Encoder, absent_features
from mmfuse.encoders.base import finish_features
from mmfuse.fusion import FUSIONS, Fusion
from mmfuse.tasks import TASKS, HeadTask, Task

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSING_FILE = "preprocessing.json"
ENCODER_ASSETS_DIR = "encoders"


class ModelSpec(BaseModel):
    """The architecture part of an experiment config: enough to rebuild the model."""

    model_config = ConfigDict(extra="forbid")
    encoders: dict[str, EncoderConfig]
    fusion: FusionConfig
    task: TaskConfig
    target_column: str = "label"

    @classmethod
    def from_experiment(cls, config: ExperimentConfig) -> ModelSpec:
        return cls(encoders=config.encoders, fusion=config.fusion, task=config.task,
                   target_column=config.data.target_column)


class MultimodalModel(nn.Module):
    def __init__(self, spec: ModelSpec, preprocessor: Preprocessor, task: Task, assets: Path | None = None) -> None:
        """``assets``: the folder of a saved model being restored (pretrained encoders rebuild their
        architecture from its ``encoders/<modality>`` files instead of their original source)."""
        super().__init__()
        self.spec = spec
        self._assets = assets
        self.preprocessor = preprocessor
        self.task = task
        self.modalities = sorted(spec.encoders)
        self.encoders = nn.ModuleDict({
            m: self._build_encoder(m, spec.encoders[m]) for m in self.modalities
        })
        for m in self.modalities:
            if spec.encoders[m].freeze:
                self.encoder(m).freeze()
        dims = self.encoder_dims
        decision_level = bool(getattr(FUSIONS.get(spec.fusion.name), "decision_level", False))
        if decision_level and not isinstance(task, HeadTask):
            raise ConfigError(f"fusion '{spec.fusion.name}' outputs decisions, not features; task "
                              f"'{task.name}' needs a feature-level fusion (e.g. concat)")
        out_dim = task.num_outputs if decision_level and isinstance(task, HeadTask) else spec.fusion.out_dim
        # Tasks that read per-modality features only (contrastive alignment) get no fusion at all.
        self.fusion: Fusion | None = (
            FUSIONS.create(spec.fusion.name, dims=dims, out_dim=out_dim, **spec.fusion.options)
            if task.uses_fusion else None
        )
        self.head: nn.Module = task.build_head(self)

    def _build_encoder(self, modality: str, config: ComponentConfig) -> Encoder:
        if modality not in self.preprocessor.modalities:
            raise MMFuseError(f"encoder for '{modality}' but the data has no such modality")
        context = self.preprocessor.context(modality)
        if self._assets is not None:
            context = dataclasses.replace(context, assets=str(self._assets / ENCODER_ASSETS_DIR / modality))
        return ENCODERS.create(config.name, context=context, **config.options)

    def encoder(self, modality: str) -> Encoder:
        """The encoder of ``modality`` (``self.encoders[modality]``, typed)."""
        encoder = self.encoders[modality]
        assert isinstance(encoder, Encoder)
        return encoder

    # ---- what a task reads of its model (mmfuse.tasks.base.FusedModel) ------------------------

    @property
    def encoder_dims(self) -> dict[str, int]:
        """Width of each modality's encoder features, in sorted modality order."""
        return {m: self.encoder(m).out_dim for m in self.modalities}

    @property
    def encoder_names(self) -> dict[str, str]:
        """The registry name of each modality's encoder."""
        return {m: self.spec.encoders[m].name for m in self.modalities}

    @property
    def task_config(self) -> TaskConfig:
        return self.spec.task

    @property
    def target_column(self) -> str:
        return self.spec.target_column

    @classmethod
    def from_config(cls, config: ExperimentConfig, preprocessor: Preprocessor, task: Task) -> MultimodalModel:
        return cls(ModelSpec.from_experiment(config), preprocessor, task)

    def encode(self, batch: Batch) -> dict[str, Features]:
        """Features per modality; modalities the batch lacks entirely become all-absent features.

        Skipping the encoder of a modality no row has is an eager shortcut (``eager_any``): a graph
        being exported runs every encoder and relies on the presence masks instead.
        """
        device = next(self.parameters()).device
        features = {}
        for m in self.modalities:
            encoder = self.encoder(m)
            if m in batch.inputs and eager_any(batch.present[m]):
                inputs = batch.inputs[m]
                if CACHED_POOLED in inputs:  # outputs of a frozen encoder, read from the feature cache
                    present = batch.present[m]
                    tokens, mask, pooled = inputs[CACHED_TOKENS], inputs[CACHED_MASK], inputs[CACHED_POOLED]
                    # With every row present, finish_features would only multiply by ones.
                    features[m] = (Features(tokens, mask, pooled, present) if eager_all(present)
                                   else finish_features(tokens, mask, pooled, present))
                else:
                    features[m] = encoder(inputs, batch.present[m])
            else:
                # batch.size only here: its len() would fix the batch size of an exported graph
                features[m] = absent_features(batch.size, encoder.out_dim, device, torch.float32)
        return features

    def forward(self, batch: Batch) -> Tensor:
        """Batch -> the task's main output: (B, num_outputs) logits or values for a ``HeadTask``."""
        return self.task.forward(self, batch)

    def predict(self, batch: Batch) -> list[dict[str, Any]]:
        """Decoded predictions, one dict per sample, with the modalities each one used."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            decoded = self.task.predict(self, batch)
        self.train(was_training)
        for i, item in enumerate(decoded):
            item["modalities"] = [m for m in self.modalities if m in batch.present and bool(batch.present[m][i])]
        return decoded

    # ---- saving -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes the model folder atomically: a crash never leaves a half-written model.

        Files get the permissions the umask gives (0644 under 022): ``save_file`` alone creates the
        weights 0600, which hid a shared model from everyone but its trainer.
        """
        directory = Path(directory)
        with staged_folder(directory) as staging:
            config = {"mmfuse_version": __version__, **self.spec.model_dump(mode="json")}
            write_text_atomic(staging / CONFIG_FILE, json.dumps(config, indent=2))
            prep = {"preprocessor": self.preprocessor.state(), "task": self.task.state()}
            write_text_atomic(staging / PREPROCESSING_FILE, json.dumps(prep, indent=2))
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            with atomic_file(staging / WEIGHTS_FILE) as weights:
                save_file(state, str(weights), metadata={"format": "pt"})
            self._save_assets(staging)
        return directory

    def _save_assets(self, folder: Path) -> None:
        """Pretrained tokenizers and encoder architectures (configs, processors), so that the folder
        alone rebuilds the model: no hub name, package or original folder is needed to load it."""
        self.preprocessor.save_assets(folder)
        for m in self.modalities:
            save_assets = getattr(self.encoder(m), "save_assets", None)
            if callable(save_assets):
                save_assets(folder / ENCODER_ASSETS_DIR / m)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MultimodalModel:
        """Rebuilds a saved model. A corrupt or incomplete folder (a truncated weights file, broken
        JSON, a missing key, tensors that do not fit the architecture) raises ``MMFuseError`` with one
        line naming the file and what is wrong: such folders come from interrupted copies and
        hand edits, and a user must learn which file to replace, not read a traceback."""
        directory = check_model_folder(directory)
        config_file, prep_file, weights_file = (directory / CONFIG_FILE, directory / PREPROCESSING_FILE,
                                                directory / WEIGHTS_FILE)
        spec = _read_spec(config_file)
        prep = _read_json(prep_file)
        try:
            preprocessor = Preprocessor.from_state(prep["preprocessor"], directory)
            task = TASKS.create(spec.task.name, **spec.task.options)
            task.load_state(prep["task"])
        except KeyError as exc:
            raise MMFuseError(f"{prep_file}: missing key {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
            raise MMFuseError(f"{prep_file}: invalid content: {_one_line(exc)}") from exc
        weights = _read_weights(weights_file)
        try:
            model = cls(spec, preprocessor, task, assets=directory)
        except MMFuseError as exc:
            raise type(exc)(f"{config_file}: {exc}") from None
        _check_weights(model, weights, weights_file)
        model.load_state_dict(weights)
        model.to(map_location)  # load_state_dict copies into the CPU-built parameters
        model.eval()
        return model


# ---- reading a saved folder ---------------------------------------------------------------------------


def check_model_folder(directory: str | Path) -> Path:
    """The folder, if it holds the three files of a saved model; else one line naming the missing one
    (cheap: a command can refuse a wrong folder before starting anything)."""
    directory = Path(directory)
    for name in (CONFIG_FILE, PREPROCESSING_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise MMFuseError(f"{directory} is not an mmfuse model folder: {name} is missing")
    return directory


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MMFuseError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                          "the file is corrupt or was edited by hand") from None
    except UnicodeDecodeError:
        raise MMFuseError(f"{path}: not valid JSON (not UTF-8 text); the file is corrupt") from None
    if not isinstance(data, dict):
        raise MMFuseError(f"{path}: the top level must be a JSON object, not {type(data).__name__}")
    return data


def _read_spec(path: Path) -> ModelSpec:
    """The architecture, with registry names and options checked as a YAML config's are."""
    config = _read_json(path)
    config.pop("mmfuse_version", None)
    try:
        spec = ModelSpec.model_validate(config)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MMFuseError(f"{path}: invalid model config: {problems}") from None
    try:
        for modality, encoder in spec.encoders.items():
            ENCODERS.validate_options(encoder.name, encoder.options, where=f"encoders.{modality}")
        FUSIONS.validate_options(spec.fusion.name, spec.fusion.options, where="fusion")
        TASKS.validate_options(spec.task.name, spec.task.options, where="task")
    except MMFuseError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return spec


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise MMFuseError(f"{path}: cannot read the weights ({_one_line(exc)}); the file is corrupt or "
                          "incomplete (an interrupted copy?)") from None


def _check_weights(model: nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """Names the first tensor that does not fit, instead of torch's multi-line report."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in weights:
            raise MMFuseError(f"{path}: lacks tensor '{key}' that {CONFIG_FILE} needs; the weights belong to "
                              "another model or the file is incomplete")
        if tuple(weights[key].shape) != tuple(value.shape):
            raise MMFuseError(f"{path}: tensor '{key}' has shape {tuple(weights[key].shape)} but {CONFIG_FILE} "
                              f"needs {tuple(value.shape)}; the weights belong to another model")
    for key in weights:
        if key not in expected:
            raise MMFuseError(f"{path}: has tensor '{key}' that {CONFIG_FILE} does not describe; the weights "
                              "belong to another model")
