"""The experiment config: one YAML file, validated by pydantic, with errors that name the key.

``schema`` holds the typed sections (``prep`` the per-modality preprocessing and augmentation ones,
``strict`` their common base, ``balance`` the remedies' options); ``loading`` reads YAML, applies
overrides and checks registry names; ``presets`` lists the named configs shipped in the package.
"""

from mmfuse.config.loading import apply_override, check_components, load_config, validate_config
from mmfuse.config.prep import (
    AudioAugment,
    AudioPrep,
    AugmentConfig,
    FeaturesPrep,
    ImageAugment,
    ImagePrep,
    TextAugment,
    TextPrep,
    VideoPrep,
)
from mmfuse.config.schema import (
    ComponentConfig,
    DataConfig,
    EncoderConfig,
    ExperimentConfig,
    FusionConfig,
    ModalitySpec,
    OptimConfig,
    SynthConfig,
    TaskConfig,
    TrainerConfig,
)
from mmfuse.config.strict import StrictModel

__all__ = [
    "AudioAugment", "AudioPrep", "AugmentConfig", "ComponentConfig", "DataConfig", "EncoderConfig",
    "ExperimentConfig", "FeaturesPrep", "FusionConfig", "ImageAugment", "ImagePrep", "ModalitySpec", "OptimConfig",
    "StrictModel", "SynthConfig", "TaskConfig", "TextAugment", "TextPrep", "TrainerConfig", "VideoPrep",
    "apply_override", "check_components", "load_config", "validate_config"
]
