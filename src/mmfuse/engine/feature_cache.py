"""The feature cache: a frozen encoder's outputs, computed once per sample and read back from disk.

With ``data.cache: true`` every encoder must be frozen (``encoders.<m>.freeze: true``, or a
pretrained encoder with ``trainable: frozen`` and nothing else trainable). Before training,
``cache_datasets`` replaces each sample's inputs by its encoder's ``Features`` (tokens trimmed to
the last valid step, mask, pooled); the model then skips those encoders (``MultimodalModel.encode``),
so an epoch costs only fusion + head. Later epochs, other fusion methods, other seeds and
``mmfuse bench`` runs find the stored outputs and run no encoder at all.

Keys (BLAKE2b):

- the **encoder key** names a folder: encoder name, options, class, output width, the context it
  was built from, the modality's preprocessing settings, a format version, a hash of every weight
  in the encoder's ``state_dict``, the versions of mmfuse, torch, transformers and timm (from
  their metadata: nothing heavy is imported), and the identity of the encoder's code (the files
  of the modules defining its classes, its submodules' classes and their bases, and the helpers
  those modules import: ``mmfuse.core.identity.code_identity``). New weights (another seed for a
  randomly initialised encoder, a fine-tuned checkpoint), other settings, an upgraded library or
  an edited encoder give a new folder.
- the **sample key**: a hash of the sample's preprocessed input tensors for that modality. Those
  are a function of the input file's bytes and the preprocessing (fitted vocabulary included), so
  a changed file changes its key; an unchanged file whose decoded input is identical keeps it
  (the encoder output would be identical too).

Storage: ``<cache_dir>/<encoder key>/<pack>.safetensors``, each pack holding many samples
(``tokens`` (sum T, D), ``mask`` (sum T,), ``pooled`` (N, D), ``lengths`` (N,)) with their sample
keys in the metadata. A pack is written to a temporary file and renamed (atomic); two processes
that fill the same cache at once write two packs with identical entries, which is harmless. The
index is rebuilt from the packs' headers, so there is no shared index file to corrupt. Delete the
folder to reclaim space; nothing else refers to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmfuse.core.atomic import atomic_file
from mmfuse.core.cache_home import cache_dir
from mmfuse.core.errors import ConfigError, DataError
from mmfuse.core.identity import code_identity, library_versions
from mmfuse.data.dataset import CACHED_MASK, CACHED_POOLED, CACHED_TOKENS, Collator, MultimodalDataset, Sample
from mmfuse.data.preprocess import ModalityInputs, Preprocessor

if TYPE_CHECKING:
    from mmfuse.config import EncoderConfig
    from mmfuse.encoders.base import Encoder
    from mmfuse.model import MultimodalModel

FORMAT = "mmfuse-feature-cache-v1"
PACK_SUFFIX = ".safetensors"


def default_cache_dir() -> Path:
    """``$MMFUSE_CACHE/features`` when set, else ``~/.cache/mmfuse/features``."""
    return cache_dir("features")


def _update(digest: Any, name: str, tensor: Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)


def sample_key(inputs: ModalityInputs) -> str:
    """Hash of one sample's preprocessed inputs for one modality (file bytes + preprocessing)."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(inputs):
        _update(digest, name, inputs[name])
    return digest.hexdigest()


def weights_hash(encoder: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(encoder.state_dict().items()):
        _update(digest, name, tensor)
    return digest.hexdigest()


VERSIONED = ("torch", "transformers", "timm")
"""Libraries whose code runs inside encoders: their versions are keyed, their files are not hashed."""


def encoder_code(encoder: torch.nn.Module) -> str:
    """The identity of the code an encoder runs (``code_identity`` of its submodules' classes)."""
    return code_identity({type(module) for module in encoder.modules()}, VERSIONED)


def encoder_key(modality: str, encoder: Encoder, config: EncoderConfig, preprocessor: Preprocessor) -> str:
    """The identity of an encoder's outputs: what it is, how its inputs are made, its weights, its code."""
    kind = preprocessor.kind(modality)
    settings: Any = getattr(preprocessor, kind, None)
    payload = {
        "format": FORMAT,
        "torch": torch.__version__,
        "libraries": library_versions(VERSIONED),
        "code": encoder_code(encoder),
        "encoder": config.name,
        "options": config.options,
        "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "out_dim": encoder.out_dim,
        # ``assets`` (where a restored model's files are) says nothing about the outputs: the weights do.
        "context": {k: v for k, v in dataclasses.asdict(preprocessor.context(modality)).items() if k != "assets"},
        "modality": preprocessor.modalities[modality].model_dump(),
        "preprocessing": settings.model_dump(mode="json") if hasattr(settings, "model_dump") else None,
        "weights": weights_hash(encoder),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


@dataclass
class CacheStats:
    """What one ``cache_datasets`` call did, per modality: entries found, computed, and the time."""

    hits: dict[str, int] = dataclasses.field(default_factory=dict)
    computed: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


class FeatureStore:
    """The packs of one encoder key: lookup by sample key, and atomic writes of new packs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, Path] = {}
        if folder.is_dir():
            for pack in sorted(folder.glob(f"*{PACK_SUFFIX}")):
                try:
                    with safe_open(str(pack), framework="pt") as handle:
                        meta = handle.metadata() or {}
                except Exception:  # a foreign or damaged file: ignore it, it will be recomputed
                    continue
                if meta.get("format") != FORMAT:
                    continue
                for key in json.loads(meta.get("keys", "[]")):
                    self._index.setdefault(key, pack)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def load(self, keys: Iterable[str]) -> dict[str, dict[str, Tensor]]:
        """Entries {tokens (T, D), mask (T,), pooled (D,)} of the given keys (all must be present)."""
        by_pack: dict[Path, list[str]] = {}
        for key in keys:
            by_pack.setdefault(self._index[key], []).append(key)
        out: dict[str, dict[str, Tensor]] = {}
        for pack, wanted in by_pack.items():
            try:
                tensors = load_file(str(pack))
                with safe_open(str(pack), framework="pt") as handle:
                    pack_keys = json.loads((handle.metadata() or {})["keys"])
            except Exception as exc:
                raise DataError(f"feature cache pack {pack} is unreadable ({exc}); delete it to recompute") from None
            position = {k: i for i, k in enumerate(pack_keys)}
            starts = torch.cat([torch.zeros(1, dtype=torch.long), tensors["lengths"].cumsum(0)])
            for key in wanted:
                i = position[key]
                lo, hi = int(starts[i]), int(starts[i + 1])
                out[key] = {CACHED_TOKENS: tensors["tokens"][lo:hi], CACHED_MASK: tensors["mask"][lo:hi],
                            CACHED_POOLED: tensors["pooled"][i]}
        return out

    def write(self, entries: dict[str, dict[str, Tensor]], meta: dict[str, str]) -> None:
        """One new pack with ``entries`` (temp file + rename: readers never see half a pack)."""
        if not entries:
            return
        keys = sorted(entries)
        tensors = {
            "tokens": torch.cat([entries[k][CACHED_TOKENS] for k in keys]).contiguous(),
            "mask": torch.cat([entries[k][CACHED_MASK] for k in keys]).contiguous(),
            "pooled": torch.stack([entries[k][CACHED_POOLED] for k in keys]).contiguous(),
            "lengths": torch.tensor([len(entries[k][CACHED_TOKENS]) for k in keys], dtype=torch.long),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        with atomic_file(self.folder / f"{name}{PACK_SUFFIX}") as tmp:
            save_file(tensors, str(tmp), metadata={**meta, "format": FORMAT, "keys": json.dumps(keys)})
        for key in keys:
            self._index[key] = self.folder / f"{name}{PACK_SUFFIX}"


def check_frozen(model: MultimodalModel) -> None:
    """Every encoder must have no trainable parameter, else its cached outputs would go stale."""
    for modality in model.modalities:
        encoder = model.encoders[modality]
        trainable = encoder.trainable_parameter_names()  # type: ignore[operator]
        if trainable:
            name = model.spec.encoders[modality].name
            raise ConfigError(
                f"data.cache needs frozen encoders, but encoders.{modality} ('{name}') has "
                f"{len(trainable)} trainable parameter tensor(s) (e.g. '{trainable[0]}'); set "
                f"encoders.{modality}.freeze: true (or trainable: frozen for a pretrained encoder), "
                "or turn data.cache off"
            )


def _valid_length(mask: Tensor) -> int:
    """Steps up to the last valid one (at least 1): trailing padding is not stored."""
    valid = torch.nonzero(mask).flatten()
    return int(valid[-1]) + 1 if len(valid) else 1


@torch.no_grad()
def _compute(encoder: Encoder, collator: Collator, modality: str, inputs: list[ModalityInputs],
             batch_size: int, device: torch.device) -> list[dict[str, Tensor]]:
    out = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator.collate_modality(modality, list(chunk)).items()}
        present = torch.ones(len(chunk), dtype=torch.bool, device=device)
        features = encoder(batch, present)
        for i in range(len(chunk)):
            steps = _valid_length(features.mask[i])
            out.append({CACHED_TOKENS: features.tokens[i, :steps].cpu().clone(),
                        CACHED_MASK: features.mask[i, :steps].cpu().clone(),
                        CACHED_POOLED: features.pooled[i].cpu().clone()})
    return out


def cache_datasets(model: MultimodalModel, datasets: dict[str, MultimodalDataset], cache_dir: Path | None = None,
                   batch_size: int = 64, device: str | torch.device | None = None,
                   ) -> tuple[dict[str, MultimodalDataset], CacheStats]:
    """The same splits with every encoder's inputs replaced by its (cached) outputs.

    Missing entries are computed with the encoder in eval mode under ``no_grad`` (on ``device``,
    default: CUDA when available) and written to the cache before anything is returned.
    """
    check_frozen(model)
    started = time.perf_counter()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    collator = Collator(model.preprocessor, None)
    stats = CacheStats()
    replaced: dict[str, dict[int, dict[str, ModalityInputs]]] = {name: {} for name in datasets}
    for modality in model.modalities:
        encoder = model.encoders[modality]
        key = encoder_key(modality, encoder, model.spec.encoders[modality], model.preprocessor)  # type: ignore[arg-type]
        store = FeatureStore(root / key)
        keys: dict[str, dict[int, str]] = {}
        pending: dict[str, ModalityInputs] = {}
        for name, dataset in datasets.items():
            keys[name] = {}
            for i, sample in enumerate(dataset.samples):
                inputs = sample.inputs.get(modality)
                if inputs is None:
                    continue
                k = sample_key(inputs)
                keys[name][i] = k
                if k not in store and k not in pending:
                    pending[k] = inputs
        stats.computed[modality] = len(pending)
        stats.hits[modality] = len({k for per in keys.values() for k in per.values()}) - len(pending)
        if pending:
            was_training, home = encoder.training, next(iter(encoder.parameters()), torch.empty(0)).device
            encoder.eval().to(target)
            try:
                computed = _compute(encoder, collator, modality, list(pending.values()), batch_size, target)  # type: ignore[arg-type]
            finally:
                encoder.to(home).train(was_training)
            store.write(dict(zip(pending, computed, strict=True)),
                        {"modality": modality, "encoder": model.spec.encoders[modality].name})
        entries = store.load({k for per in keys.values() for k in per.values()})
        for name, per in keys.items():
            for i, k in per.items():
                replaced[name].setdefault(i, {})[modality] = entries[k]
    out = {}
    for name, dataset in datasets.items():
        cached = MultimodalDataset([], model.preprocessor, None)
        cached.report = dataset.report
        cached.samples = [
            Sample(s.id, {m: replaced[name].get(i, {}).get(m) for m in s.inputs}, s.target)
            for i, s in enumerate(dataset.samples)
        ]
        out[name] = cached
    stats.seconds = time.perf_counter() - started
    return out, stats
