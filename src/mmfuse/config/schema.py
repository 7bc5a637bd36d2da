"""The experiment config: one YAML file, validated by pydantic, with errors that name the key.

An unknown key is an error naming it and the closest valid key; registry names (encoders, fusion,
task) are checked against their registries, and their options against the factory's signature.
Relative data paths in a YAML file resolve against that file's folder, so a config works from any
cwd; command-line paths and output folders resolve against the cwd (see ``load_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from mmfuse.config.balance import balance_options
from mmfuse.config.prep import (
    AudioPrep,
    AugmentConfig,
    FeaturesPrep,
    ImagePrep,
    TextPrep,
    VideoPrep,
)
from mmfuse.config.strict import StrictModel
from mmfuse.core.errors import ConfigError
from mmfuse.core.locations import check_location, is_url
from mmfuse.core.registry import ENCODERS, FUSIONS, TASKS, Registry

ModalityKind = Literal["text", "image", "audio", "features", "video"]


class ModalitySpec(StrictModel):
    """A modality: its kind and the manifest column holding it.

    ``from_video: true`` (audio only) reads the audio track of the video file the column names,
    so one ``video`` column can feed both a video and an audio modality.
    """

    kind: ModalityKind
    column: str
    from_video: bool = False

    @model_validator(mode="after")
    def _from_video_is_audio(self) -> ModalitySpec:
        if self.from_video and self.kind != "audio":
            raise ValueError(f"from_video reads a video's audio track: it needs kind 'audio', not '{self.kind}'")
        return self

    @model_serializer(mode="wrap")
    def _omit_from_video_default(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leaves ``from_video: false`` out, so configs, saved models and cache keys of runs without
        video dump exactly as before the field existed."""
        data: dict[str, Any] = handler(self)
        if not self.from_video:
            data.pop("from_video", None)
        return data


class SynthConfig(StrictModel):
    """Use the embedded synthetic tri-modal data set (generated once, cached)."""

    n_samples: int = Field(3000, ge=20)
    seed: int = 0
    missing_rate: float = Field(0.0, ge=0.0, lt=1.0)
    cache_dir: Path | None = None


class DataConfig(StrictModel):
    manifest: Path | None = Field(None, description="one manifest with a split column")
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None
    synthetic: SynthConfig | None = None
    split_column: str = "split"
    id_column: str = "id"
    target_column: str = "label"
    modalities: dict[str, ModalitySpec] = Field(default_factory=dict)
    text: TextPrep = Field(default_factory=TextPrep)
    image: ImagePrep = Field(default_factory=ImagePrep)
    audio: AudioPrep = Field(default_factory=AudioPrep)
    features: FeaturesPrep = Field(default_factory=FeaturesPrep)
    video: VideoPrep = Field(default_factory=VideoPrep)
    on_error: Literal["raise", "skip"] = "raise"
    allow_overlap: bool = Field(False, description="let an id appear in more than one of train/val/test "
                                "(a warning instead of an error)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="carved from train when no val split")
    batch_size: int = Field(32, gt=0)
    num_workers: int = Field(0, ge=0)
    cache: bool = Field(False, description="store frozen encoders' outputs on disk and read them back")
    cache_dir: Path | None = Field(None, description="feature cache folder (default $MMFUSE_CACHE/features "
                                                     "or ~/.cache/mmfuse/features)")
    in_memory: bool = Field(False, description="fast path: preprocessed splits as cached memory-mapped tensors, "
                            "batches sliced from them (on the GPU when training there)")
    in_memory_cache: Path | None = Field(None, description="cache folder of the in-memory tensors "
                                         "(default $MMFUSE_CACHE/arrays or ~/.cache/mmfuse/arrays)")
    pack: str | None = Field(None, description="a pack written by `mmfuse data pack`, a folder or a URL (s3://, gs://, "
                             "https://, file://; read through fsspec into a bounded local cache): train, evaluate "
                             "and bench read its preprocessed shards instead of preprocessing the manifests")
    pack_cache_gb: float | None = Field(None, gt=0, description="with a pack URL: most GiB of its shards kept in the "
                                        "local cache ($MMFUSE_CACHE/packs), least recently read removed first "
                                        "(default 20)")
    pack_order: Literal["samples", "shards"] = Field(
        "samples", description="with data.pack: samples = every epoch one permutation of all samples (as without a "
        "pack); shards = each rank reads only its own share of the shards, in an order drawn per epoch, samples "
        "shuffled within windows of data.pack_window shards (for packs larger than a node's cache)")
    pack_window: int = Field(4, ge=1, description="with pack_order shards: shards whose samples are shuffled together")
    check_sources: bool = Field(False, description="with data.pack: also compare the pack with the manifests and "
                                "every raw file's digest (a pack is self-contained; this finds raw data edited "
                                "in place since packing)")
    pack_strict_versions: bool = Field(False, description="with data.pack: refuse a pack made with other library "
                                       "versions (by default they are named in a warning)")
    mode: Literal["eager", "lazy"] = Field(
        "eager", description="eager: every split preprocessed once, held in memory; lazy: each sample decoded "
        "from its raw files in the loader workers whenever it is read (vocabulary and labels still fitted first)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="training-time augmentations (train split only), off by default")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        sources = [self.manifest is not None, self.train is not None, self.synthetic is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of 'manifest' (with a split column), 'train' (+ val/test) "
                             "or 'synthetic'")
        if self.pack is not None and self.in_memory:
            raise ValueError("data.pack streams preprocessed shards from disk and data.in_memory holds every split "
                             "in memory: give one of them")
        if self.pack_order == "shards" and self.pack is None:
            raise ValueError("data.pack_order shards orders the shards of a pack: it needs data.pack")
        return self

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_location(cls, value: Any) -> Any:
        """A URL of an allowed protocol stays a URL (``pipe:`` and unknown protocols are refused here, before
        anything is opened); a path is kept as text, ``~`` expanded."""
        if value is None:
            return None
        text = str(value)
        if is_url(text):
            try:
                return check_location(text)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return str(Path(text).expanduser())

    @model_validator(mode="after")
    def _lazy_and_augment(self) -> DataConfig:
        if self.mode == "lazy":
            for name, on in (("pack", self.pack is not None), ("in_memory", self.in_memory), ("cache", self.cache)):
                if on:
                    raise ValueError(f"data.mode lazy decodes raw files per sample as they are read and data.{name} "
                                     "reads samples preprocessed beforehand: give one of them")
        if self.augment.active:
            for name, on in (("in_memory", self.in_memory), ("cache", self.cache)):
                if on:
                    raise ValueError(f"data.augment changes every training sample each epoch, but data.{name} "
                                     "reuses fixed tensors for it: turn one of them off")
            if self.augment.audio is not None and self.audio.features == "waveform" and (
                    self.augment.audio.time_masks or self.augment.audio.freq_masks):
                raise ValueError("data.augment.audio masks the log-mel, but data.audio.features is waveform")
        return self


class ComponentConfig(BaseModel):
    """A registry name plus its options; options are validated against the registered factory.

    A subclass's own fields besides ``name`` are its registry's common options when the registry
    lists them (``fusion.out_dim``, ``task.head_*``): each component takes some or all of them, and
    setting one it does not take is an error (see ``set_common``). A dump leaves out those the
    component does not take, so a saved config loads back under the same check.
    """

    model_config = ConfigDict(extra="allow")
    registry: ClassVar[Registry[Any] | None] = None
    """The registry of the component kind; its ``common`` names the fields above that it checks."""
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def set_common(self) -> list[str]:
        """The common options this config sets explicitly; a default alone is not a setting."""
        common = self.registry.common if self.registry is not None else ()
        return [key for key in common if key in self.model_fields_set]

    @model_serializer(mode="wrap")
    def _omit_untaken_common(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.registry is not None and self.registry.common and self.name in self.registry:
            for key in set(self.registry.common) - set(self.registry.common_options(self.name)):
                data.pop(key, None)
        return data


class EncoderConfig(ComponentConfig):
    """An encoder: registry name + options, and ``freeze`` (no parameter of it trains).

    A frozen encoder also stays in eval mode (no dropout), so its outputs are a fixed function of
    the input: what ``data.cache`` needs to store them once and reuse them. ``init_from`` starts the
    encoder from the weights of the same modality's encoder in a saved mmfuse model folder.
    """

    registry: ClassVar[Registry[Any] | None] = ENCODERS
    freeze: bool = False
    init_from: Path | None = Field(None, description="saved mmfuse model folder whose encoder of this "
                                   "modality gives the starting weights")


class FusionConfig(ComponentConfig):
    registry: ClassVar[Registry[Any] | None] = FUSIONS
    name: str = "concat"
    out_dim: int = Field(128, gt=0)


class TaskConfig(ComponentConfig):
    registry: ClassVar[Registry[Any] | None] = TASKS
    name: str = "classification"
    head_hidden: int = Field(0, ge=0, description="hidden width of the MLP head; 0 = linear")
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class OptimConfig(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    encoder_lr: float | None = Field(None, gt=0, description="learning rate of the encoders; null = lr")
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["none", "cosine"] = "none"
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate warm-up from 0, "
                              "before the scheduler (constant or cosine decay over the remaining steps)")
    gradient_clip: float | None = Field(1.0, gt=0)


class TrainerConfig(StrictModel):
    max_epochs: int = Field(20, gt=0)
    patience: int | None = Field(5, gt=0, description="early-stopping patience in epochs; null = off")
    monitor: str | None = Field(None, description="validation metric to select the best model")
    stop_at: float | None = Field(None, description="stop as soon as the monitored metric reaches this value")
    precision: Literal["32", "bf16"] = "32"
    accelerator: str = "auto"
    devices: int | str = Field(1, description="devices per machine: 1 (default: no surprise multi-process "
                               "run), N, or 'auto' for all of them; more than one starts DDP")
    num_nodes: int = Field(1, gt=0, description="machines (torchrun --nnodes / SLURM nodes)")
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true", "fsdp"] = Field(
        "auto", description="how several devices train one model: ddp (a copy per device; 'auto' picks it), "
        "fsdp (parameters sharded across GPUs: large pretrained encoders)")
    accumulate_grad_batches: int = Field(1, gt=0, description="batches whose gradients add up to one "
                                         "optimizer step (an effective batch of batch_size x this x devices)")
    logger: Literal["csv", "tensorboard", "mlflow", "wandb"] = Field(
        "csv", description="where training curves go; all write into the run folder, offline")

    @model_validator(mode="after")
    def _fsdp_needs_gpus(self) -> TrainerConfig:
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ValueError("strategy 'fsdp' shards parameters across GPUs and needs accelerator gpu (or auto "
                             "on a GPU machine); on the CPU use strategy ddp")
        return self

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        """An int > 0, 'auto', or device indices such as '0,1' (Lightning's forms)."""
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"must be >= 1 or 'auto', got {value}")
            return value
        text = value.strip()
        if text == "auto" or (all(part.strip().isdigit() for part in text.split(",") if part.strip()) and text):
            return text
        raise ValueError(f"must be a count, 'auto' or device indices like '0,1', got '{value}'")
    modality_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="per-sample drop rate per modality")
    unimodal_loss_weight: float = Field(
        0.0, ge=0.0, description="weight of per-modality auxiliary head losses (keeps every encoder learning)")
    calibration: Literal["none", "temperature", "per_subset"] = Field(
        "per_subset", description="classification: after training, fit temperatures on the validation split "
        "so probabilities are honest; per_subset = one per set of present modalities (a missing modality "
        "then lowers the confidence), temperature = one for all, none = the raw softmax")
    contribution_check: bool = Field(
        True, description="classification: after training, compute each modality's Shapley value on validation "
        "accuracy (up to 2,000 samples) and say when one adds next to nothing (mmfuse.engine.contribution)")
    output_dir: Path = Path("runs/experiment")
    overwrite: bool = Field(False, description="replace a finished run in output_dir (CLI: --overwrite); "
                            "otherwise training into it stops before any work")
    threads: int | None = Field(None, gt=0, description="CPU threads of torch's intra-op pool while training "
                                "and evaluating; null = torch's default (one per core)")
    progress_bar: bool = True
    verbose: bool = Field(False, description="show Lightning's info messages and warnings")
    log_every_n_steps: int = Field(10, gt=0)
    checkpoint_every_n_steps: int | None = Field(
        None, gt=0, description="also write checkpoints/last.ckpt every N optimizer steps (it is always written "
        "at the end of each epoch); null = at epoch ends only")
    on_nonfinite: Literal["raise", "skip"] = Field(
        "raise", description="a NaN/inf loss or gradient: 'raise' stops the run naming the step and the batch's "
        "sample ids; 'skip' leaves that optimizer step out (weights and optimiser state unchanged) and counts it")
    balance: Literal["none", "ogm_ge", "grad_blend", "agm"] = Field(
        "none", description="modality-imbalance remedy: ogm_ge (gradient modulation), grad_blend (Gradient-"
        "Blending loss weights), agm (adaptive gradient modulation); see mmfuse.engine.balance")
    balance_options: dict[str, Any] = Field(default_factory=dict, description="options of trainer.balance, "
                                            "e.g. {alpha: 0.5} (see mmfuse.config.balance)")

    @model_validator(mode="after")
    def _balance_options(self) -> TrainerConfig:
        balance_options(self.balance, self.balance_options)
        return self


def builds_fusion(task: str) -> bool:
    """Whether task ``task`` has the model build a fusion: a contrastive task projects each modality
    itself (trait ``uses_fusion``), so a config's ``fusion`` section has nothing to configure. True
    for a name the registry does not know (that is an error of its own)."""
    return task not in TASKS or bool(TASKS.trait(task, "uses_fusion"))


def outputs_decisions(fusion: str) -> bool:
    """Whether fusion ``fusion`` outputs the task's predictions itself (``late``, a decision-level
    fusion): no MLP head follows it, so the task's head options (all of TASKS' common options) do
    not apply. False for a name the registry does not know."""
    return fusion in FUSIONS and bool(getattr(FUSIONS.get(fusion), "decision_level", False))


class ExperimentConfig(StrictModel):
    """The whole experiment. What does not apply to the chosen components is refused when set
    (``mmfuse.config.loading.check_components``) and left out of a dump: ``fusion`` for a task that
    builds none, ``task.head_*`` after a fusion that outputs decisions."""

    seed: int = 0
    data: DataConfig
    encoders: dict[str, EncoderConfig]
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _modalities_match_encoders(self) -> ExperimentConfig:
        if not self.encoders:
            raise ValueError("'encoders' must name at least one modality")
        for modality in self.encoders:
            if modality not in self.data.modalities:
                if modality not in ("text", "image", "audio", "video"):
                    raise ValueError(
                        f"modality '{modality}' needs an entry in data.modalities (kind and column)"
                    )
                self.data.modalities[modality] = ModalitySpec(kind=modality, column=modality)  # type: ignore[arg-type]
        for modality in list(self.data.modalities):
            if modality not in self.encoders:
                raise ValueError(f"data.modalities.{modality} has no encoder in 'encoders'")
        return self

    @model_serializer(mode="wrap")
    def _omit_what_does_not_apply(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A dump loads back under the same checks: it leaves out what the config may not set."""
        data: dict[str, Any] = handler(self)
        if not builds_fusion(self.task.name):
            data.pop("fusion", None)
        elif outputs_decisions(self.fusion.name) and isinstance(data.get("task"), dict):
            for key in TASKS.common:
                data["task"].pop(key, None)
        return data

    @property
    def modalities(self) -> list[str]:
        return sorted(self.encoders)
