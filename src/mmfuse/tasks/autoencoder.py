"""Multimodal autoencoder: a fused code of the present modalities reconstructs every modality.

Encoders -> fusion -> one code (B, F); per modality, decoders map the code back to

* the modality's pooled encoder features ("features"), always, and
* the modality's own input, for the built-in encoders: pixels (image_cnn), the per-clip
  standardised log-mel (audio_cnn), the bag of words (text_gru / text_transformer).

Training hides random modalities of each sample (``drop_rate``; one always stays) and asks the code
of what is left to reconstruct *every* modality the sample really has, so a missing modality is
imputed from the others (``mmfuse predict --impute audio``).

Why the feature target cannot be gamed. Reconstructing an encoder's own output invites collapse:
an encoder that outputs a constant makes the feature loss zero. Three things prevent that here:
(1) the feature targets are stop-gradient (the encoder is never trained to make them easier);
(2) they are standardised per sample (layer norm without parameters), so shrinking the features'
scale does not shrink the loss, and a constant vector standardises to nothing useful;
(3) for built-in encoders the input reconstruction anchors the encoders to the data: the code
must carry the pixels / mel / words, and it only sees them through the encoders. A frozen
(pretrained) encoder cannot collapse at all, so its features are a fair target without (3).

Reported per modality and target, with the modality present and absent (imputed): the MSE, the
MSE of predicting the evaluation set's per-dimension mean (an oracle mean-prediction baseline)
and their ratio, the NMSE (< 1 beats the baseline; 0 is perfect). ``model(batch)`` returns the
fused code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric, MetricCollection

from mmfuse.core.contracts import Batch, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.layers import mlp
from mmfuse.core.registry import TASKS
from mmfuse.data.text import Tokenizer
from mmfuse.tasks.base import FusedModel, Task

# Built-in encoder -> the input it can be asked to reconstruct.
INPUT_TARGETS = {"image_cnn": "pixels", "audio_cnn": "mel", "text_gru": "words", "text_transformer": "words"}
_INPUT_KEYS = {"pixels": "pixels", "mel": "mel", "words": "input_ids"}  # the batch input each target reads


def hide(features: dict[str, Features], keep: dict[str, Tensor]) -> dict[str, Features]:
    """The features with ``keep[m]`` (B,) as the new presence: hidden rows become absent zeros."""
    out = {}
    for m, f in features.items():
        present = f.present & keep[m]
        k = present.to(f.pooled.dtype)
        out[m] = Features(tokens=f.tokens * k[:, None, None], mask=f.mask & present[:, None],
                          pooled=f.pooled * k[:, None], present=present)
    return out


def standardise_mel(mel: Tensor, frame_mask: Tensor) -> Tensor:
    """Per-clip zero mean / unit variance over valid frames (as audio_cnn sees it); padding is 0."""
    weights = frame_mask[:, None, :].to(mel.dtype)
    count = (weights.sum(dim=(1, 2), keepdim=True) * mel.shape[1]).clamp(min=1.0)
    mean = (mel * weights).sum(dim=(1, 2), keepdim=True) / count
    var = (((mel - mean) * weights) ** 2).sum(dim=(1, 2), keepdim=True) / count
    return (mel - mean) / (var + 1e-5).sqrt() * weights


class AutoencoderHead(nn.Module):
    """code (B, F) -> per target name ('audio.features', 'audio.mel', ...) a flat (B, K) prediction."""

    def __init__(self, code_dim: int, sizes: dict[str, int], hidden: int, dropout: float) -> None:
        super().__init__()
        self.decoders = nn.ModuleDict({
            name.replace(".", "__"): mlp(code_dim, hidden, size, dropout) for name, size in sorted(sizes.items())
        })
        self.initialised: Tensor
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_biases(self, targets: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Data-dependent init: each decoder starts by predicting the first batch's mean target
        (bag-of-words: the logit of each word's frequency). Without it, the decoders spend their
        first few hundred steps just walking their biases to the mean (measured on small data)."""
        for name, (target, weight) in targets.items():
            mean = (target * weight).sum(dim=0) / weight.sum(dim=0).clamp(min=1.0)
            if name.endswith(".words"):
                mean = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
            decoder: nn.Module = self.decoders[name.replace(".", "__")]
            last = [m for m in decoder.modules() if isinstance(m, nn.Linear)][-1]
            last.bias.copy_(mean.to(last.bias.dtype))
        self.initialised.fill_(True)

    def forward(self, code: Tensor, name: str) -> Tensor:
        decoder: nn.Module = self.decoders[name.replace(".", "__")]
        return decoder(code).float()


def _state(key: str, stat: str) -> str:
    return f"{key}.{stat}".replace(".", "__")


class ReconstructionMetric(Metric):
    """Per target and condition: MSE, the mean-prediction baseline's MSE, and NMSE = their ratio.

    Keeps, per output dimension, the sum of squared errors, the sums of the target and its square
    and the count (elements can be masked, e.g. padding frames), so the baseline is the per-dim mean
    of the whole evaluation set, computed exactly in one pass.
    """

    full_state_update = False

    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.keys = [f"{name}.{cond}" for name in sorted(sizes) for cond in ("present", "absent")]
        for key in self.keys:
            size = sizes[key.rsplit(".", 1)[0]]
            for stat in ("sse", "sum", "sq", "n"):
                self.add_state(_state(key, stat), default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, key: str, pred: Tensor, target: Tensor, weight: Tensor) -> None:  # type: ignore[override]
        w = weight.double()
        t = target.double()
        for stat, value in (("sse", ((pred.double() - t) ** 2 * w)), ("sum", t * w), ("sq", t * t * w), ("n", w)):
            setattr(self, _state(key, stat), getattr(self, _state(key, stat)) + value.sum(dim=0))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out: dict[str, Tensor] = {}
        absent_nmse = []
        for key in self.keys:
            n = getattr(self, _state(key, "n"))
            if float(n.sum()) == 0:
                continue
            sse, s, sq = (getattr(self, _state(key, stat)) for stat in ("sse", "sum", "sq"))
            baseline_sse = (sq - s * s / n.clamp(min=1)).clamp(min=0).sum()
            name = key.replace(".", "_")
            mse = sse.sum() / n.sum()
            out[f"{name}_mse"] = mse.float()
            out[f"{name}_baseline_mse"] = (baseline_sse / n.sum()).float()
            nmse = (sse.sum() / baseline_sse.clamp(min=1e-12)).float()
            out[f"{name}_nmse"] = nmse
            if key.endswith(".absent"):
                absent_nmse.append(nmse)
        out["nmse_absent"] = torch.stack(absent_nmse).mean() if absent_nmse else torch.tensor(float("nan"))
        return out


class AutoencoderTask(Task):
    name = "autoencoder"

    def __init__(self, drop_rate: float = 0.5, hidden: int = 256, dropout: float = 0.0,
                 input_targets: bool = True, input_weight: float = 1.0) -> None:
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"task.drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate, self.hidden, self.dropout = drop_rate, hidden, dropout
        self.input_targets, self.input_weight = input_targets, input_weight
        self.modalities: list[str] = []
        self.sizes: dict[str, int] = {}
        self.inputs: dict[str, str] = {}  # modality -> 'pixels' | 'mel' | 'words'
        self.image_norm: tuple[list[float], list[float]] = ([0.5], [0.5])  # per-channel (or one) mean, std
        self.image_shape = (3, 32, 32)
        self.vocab: dict[str, list[str]] = {}
        self.impute: list[str] = []
        """Set at prediction time (``mmfuse predict --impute``): hide these and output only them."""

    @property
    def raw_input_modalities(self) -> list[str]:
        """The modalities whose pixels / mel / words are reconstruction targets (set by ``build_head``)."""
        return sorted(self.inputs)

    # targets come from the inputs: the target column is not used
    @property
    def monitor(self) -> tuple[str, str]:
        return "nmse_absent", "min"

    def fit(self, targets: list[Any]) -> None:
        return None

    def encode_target(self, raw: Any) -> Tensor:
        return torch.zeros(())

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        return None

    def metrics(self) -> MetricCollection:
        return MetricCollection({"nmse_absent": ReconstructionMetric(self.sizes)})

    def build_head(self, model: FusedModel) -> nn.Module:
        assert model.fusion is not None
        self.modalities = list(model.modalities)
        if len(self.modalities) < 2:
            raise ConfigError("task autoencoder needs at least two modalities (one is imputed from the others)")
        prep = model.preprocessor
        self.sizes, self.inputs = {}, {}
        for m in self.modalities:
            self.sizes[f"{m}.features"] = model.encoder_dims[m]
            target = INPUT_TARGETS.get(model.encoder_names[m]) if self.input_targets else None
            if target == "pixels":
                self.sizes[f"{m}.pixels"] = prep.image.channels * prep.image.size ** 2
                mean, std = prep.image.mean, prep.image.std
                self.image_norm = (list(mean) if isinstance(mean, tuple) else [mean],
                                   list(std) if isinstance(std, tuple) else [std])
                self.image_shape = (prep.image.channels, prep.image.size, prep.image.size)
            elif target == "mel":
                self.sizes[f"{m}.mel"] = prep.audio.n_mels * prep.audio.max_frames
            elif target == "words" and isinstance(prep.tokenizers.get(m), Tokenizer):
                self.vocab[m] = list(prep.tokenizers[m].vocab)  # type: ignore[union-attr]
                self.sizes[f"{m}.words"] = len(self.vocab[m])
            if target and f"{m}.{target}" in self.sizes:
                self.inputs[m] = target
        return AutoencoderHead(model.fusion.out_dim, self.sizes, self.hidden, self.dropout)

    @staticmethod
    def _head(model: FusedModel) -> AutoencoderHead:
        assert isinstance(model.head, AutoencoderHead)
        return model.head

    def input_target(self, model: FusedModel, batch: Batch, m: str) -> tuple[Tensor, Tensor]:
        """(B, K) flat input target of modality m and its (B, K) element weights (0 = ignore)."""
        kind = self.inputs[m]
        inputs = batch.inputs[m]
        if kind == "pixels":
            pixels = inputs["pixels"].flatten(1).float()
            return pixels, torch.ones_like(pixels)
        if kind == "mel":
            frames = model.preprocessor.audio.max_frames
            mel, mask = inputs["mel"][:, :, :frames].float(), inputs["frame_mask"][:, :frames]
            mel = standardise_mel(mel, mask)
            pad = frames - mel.shape[2]
            mel, mask = F.pad(mel, (0, pad)), F.pad(mask, (0, pad))
            weight = mask[:, None, :].expand_as(mel).float()
            return mel.flatten(1), weight.flatten(1)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        bag = torch.zeros(len(ids), self.sizes[f"{m}.words"], device=ids.device)
        bag.scatter_(1, ids * mask, 1.0)
        bag[:, 0] = 0.0  # the padding id is not a word
        return bag, torch.ones_like(bag)

    def reconstruct(self, model: FusedModel, features: dict[str, Features], keep: dict[str, Tensor],
                    ) -> dict[str, Tensor]:
        """Predictions (B, K) per target name from the code of the kept modalities (words as logits)."""
        assert model.fusion is not None
        code = model.fusion(hide(features, keep))
        head = self._head(model)
        return {name: head(code, name) for name in self.sizes}

    def _targets(self, model: FusedModel, batch: Batch,
                 features: dict[str, Features]) -> dict[str, tuple[Tensor, Tensor]]:
        """(target, element weight) per target name; rows where the modality is absent weigh 0."""
        out = {}
        for m in self.modalities:
            present = features[m].present.float()[:, None]
            target = F.layer_norm(features[m].pooled.detach().float(), (features[m].dim,))
            out[f"{m}.features"] = (target, present.expand_as(target))
            # Inputs can be absent from the batch when a frozen encoder's outputs come from the
            # feature cache: then only the feature target is trained.
            if m in self.inputs and _INPUT_KEYS[self.inputs[m]] in batch.inputs.get(m, {}):
                value, weight = self.input_target(model, batch, m)
                out[f"{m}.{self.inputs[m]}"] = (value, weight * present)
        return out

    def _loss(self, preds: dict[str, Tensor], targets: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        losses = []
        for name, (target, weight) in targets.items():
            if name.endswith(".words"):
                err = F.binary_cross_entropy_with_logits(preds[name], target, reduction="none")
            else:
                err = (preds[name] - target) ** 2
            scale = 1.0 if name.endswith(".features") else self.input_weight
            losses.append(scale * (err * weight).sum() / weight.sum().clamp(min=1.0))
        return torch.stack(losses).sum()

    def forward(self, model: FusedModel, batch: Batch) -> Tensor:
        """(B, fusion.out_dim) fused code of the present modalities."""
        assert model.fusion is not None
        return model.fusion(model.encode(batch))

    def step_loss(self, model: FusedModel, batch: Batch) -> Tensor:
        from mmfuse.core.masking import drop_modalities

        features = model.encode(batch)
        present = {m: features[m].present for m in self.modalities}
        keep = drop_modalities(present, self.drop_rate) if model.training else present
        targets = self._targets(model, batch, features)
        head = self._head(model)
        if model.training and not bool(head.initialised):
            head.init_biases(targets)
        return self._loss(self.reconstruct(model, features, keep), targets)

    def eval_step(self, model: FusedModel, batch: Batch, metrics: MetricCollection) -> Tensor:
        features = model.encode(batch)
        present = {m: features[m].present for m in self.modalities}
        targets = self._targets(model, batch, features)
        preds = self.reconstruct(model, features, present)
        loss = self._loss(preds, targets)
        metric = metrics["nmse_absent"]
        for name, (target, weight) in targets.items():
            metric.update(f"{name}.present", self._output(name, preds[name]), target, weight)
        for m in self.modalities:
            others = torch.stack([present[o] for o in self.modalities if o != m], dim=1).any(dim=1)
            imputed = self.reconstruct(model, features, {o: present[o] & (o != m) for o in self.modalities})
            for name, (target, weight) in targets.items():
                if name.startswith(f"{m}."):
                    metric.update(f"{name}.absent", self._output(name, imputed[name]), target,
                                  weight * others.float()[:, None])
        return loss

    @staticmethod
    def _output(name: str, pred: Tensor) -> Tensor:
        return pred.sigmoid() if name.endswith(".words") else pred

    def predict(self, model: FusedModel, batch: Batch) -> list[dict[str, Any]]:
        """Per sample and modality: the reconstruction (present) or the imputation (absent).

        With ``impute`` set, those modalities are hidden even where given, and only they are output.
        """
        features = model.encode(batch)
        present = {m: features[m].present & (m not in self.impute) for m in self.modalities}
        preds = self.reconstruct(model, features, present)
        results = []
        for i in range(batch.size):
            item: dict[str, Any] = {}
            for m in self.impute or self.modalities:
                out: dict[str, Any] = {"imputed": not bool(present[m][i]),
                                       "features": _rounded(preds[f"{m}.features"][i])}
                kind = self.inputs.get(m)
                if kind == "pixels":
                    mean, std = self.image_norm
                    pixels = preds[f"{m}.pixels"][i].reshape(self.image_shape).cpu()
                    pixels = (pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
                    out["pixels"] = _rounded(pixels)
                elif kind == "mel":
                    mels = model.preprocessor.audio.n_mels
                    out["mel"] = _rounded(preds[f"{m}.mel"][i].reshape(mels, -1))
                elif kind == "words":
                    probs = preds[f"{m}.words"][i].sigmoid()
                    words = [(self.vocab[m][j], float(probs[j])) for j in torch.nonzero(probs >= 0.5).flatten()
                             if j > 1]
                    out["words"] = [w for w, _ in sorted(words, key=lambda x: -x[1])]
                item[m] = out
            results.append({"reconstructions": item})
        return results


def _rounded(values: Tensor) -> Any:
    return torch.round(values.float().cpu(), decimals=4).tolist()


@TASKS.register("autoencoder", common=(), why="its decoders take hidden and dropout; there is no MLP head")
def autoencoder(drop_rate: float = 0.5, hidden: int = 256, dropout: float = 0.0, input_targets: bool = True,
                input_weight: float = 1.0) -> Task:
    return AutoencoderTask(drop_rate=drop_rate, hidden=hidden, dropout=dropout, input_targets=input_targets,
                           input_weight=input_weight)
