"""Captioning: a small Transformer decoder writes text conditioned on the other modalities.

The decoder cross-attends to a memory made of the fused vector (one token) and every modality's
encoder tokens (projected to the decoder width, tagged with a learned modality embedding, padding
and absent modalities masked out), so it can read both the fused summary and local detail.
Training uses teacher forcing (cross-entropy of the next word); prediction uses greedy decoding or
beam search (``beam_size``). The caption is the target column and must not also be an input.

The word vocabulary is fitted on the training captions and saved with the model (``state``).
Metrics are corpus BLEU and chrF from sacrebleu on greedy captions, next to the same scores of a
constant-caption baseline: the most frequent training caption, predicted for every sample.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import sacrebleu
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric, MetricCollection

from mmfuse.core.contracts import Batch, Features
from mmfuse.core.errors import ConfigError
from mmfuse.core.registry import TASKS
from mmfuse.tasks.base import FusedModel, Task

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class CaptionDecoder(nn.Module):
    """tokens (B, L) + memory -> next-word logits (B, L, V); pre-norm Transformer decoder."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_length: int,
                 memory_dims: dict[str, int], code_dim: int, dropout: float) -> None:
        super().__init__()
        self.modalities = sorted(memory_dims)
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.position = nn.Embedding(max_length + 1, dim)
        self.code = nn.Linear(code_dim, dim)
        self.memory_proj = nn.ModuleDict({m: nn.Linear(memory_dims[m], dim) for m in self.modalities})
        self.modality_embed = nn.Embedding(len(self.modalities) + 1, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)

    def memory(self, code: Tensor, features: dict[str, Features]) -> tuple[Tensor, Tensor]:
        """(B, 1 + sum T_m, dim) memory and its (B, S) padding mask (True = ignore)."""
        parts = [self.code(code)[:, None] + self.modality_embed.weight[0]]
        valid = [torch.ones(len(code), 1, dtype=torch.bool, device=code.device)]
        for i, m in enumerate(self.modalities, start=1):
            f = features[m]
            parts.append(self.memory_proj[m](f.tokens.float()) + self.modality_embed.weight[i])
            valid.append(f.mask & f.present[:, None])
        return torch.cat(parts, dim=1), ~torch.cat(valid, dim=1)

    def forward(self, tokens: Tensor, memory: Tensor, memory_pad: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))[None]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
        y = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_pad)
        return self.out(self.norm(y)).float()


class CaptionMetric(Metric):
    """Corpus BLEU / chrF (sacrebleu) of generated captions, and of the constant-caption baseline."""

    full_state_update = False
    hypotheses: list[str]
    references: list[str]

    def __init__(self, constant: str) -> None:
        super().__init__()
        self.constant = constant
        self.add_state("hypotheses", default=[], dist_reduce_fx=None)
        self.add_state("references", default=[], dist_reduce_fx=None)

    def update(self, hypotheses: list[str], references: list[str]) -> None:  # type: ignore[override]
        self.hypotheses.extend(hypotheses)
        self.references.extend(references)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        refs = [self.references]
        constant = [self.constant] * len(self.references)
        return {
            "bleu": torch.tensor(sacrebleu.corpus_bleu(self.hypotheses, refs).score),
            "chrf": torch.tensor(sacrebleu.corpus_chrf(self.hypotheses, refs).score),
            "constant_bleu": torch.tensor(sacrebleu.corpus_bleu(constant, refs).score),
            "constant_chrf": torch.tensor(sacrebleu.corpus_chrf(constant, refs).score),
        }


class CaptioningTask(Task):
    name = "captioning"

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.1,
                 max_length: int = 24, min_freq: int = 1, beam_size: int = 1, length_penalty: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        if dim % heads:
            raise ConfigError(f"task captioning: dim ({dim}) must be divisible by heads ({heads})")
        if beam_size < 1:
            raise ConfigError(f"task.beam_size must be >= 1, got {beam_size}")
        self.dim, self.layers, self.heads, self.dropout = dim, layers, heads, dropout
        self.max_length, self.min_freq = max_length, min_freq
        self.beam_size, self.length_penalty, self.label_smoothing = beam_size, length_penalty, label_smoothing
        self.vocab: list[str] = []
        self.constant = ""
        self._ids: dict[str, int] = {}

    @property
    def monitor(self) -> tuple[str, str]:
        return "bleu", "max"

    def fit(self, targets: list[Any]) -> None:
        """Word vocabulary of the training captions (ties alphabetical) and the most frequent caption."""
        texts = [str(t) for t in targets if t is not None and t == t and str(t).strip()]  # t == t: not NaN
        if not texts:
            raise ValueError("captioning found no captions in the training data")
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted((w for w, n in counts.items() if n >= self.min_freq), key=lambda w: (-counts[w], w))
        self.vocab = SPECIALS + kept
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        captions = Counter(" ".join(words(t)) for t in texts)
        self.constant = min(captions, key=lambda c: (-captions[c], c))

    def encode_target(self, raw: Any) -> Tensor:
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or not str(raw).strip():
            raise ValueError("the caption is empty")  # a JSON NaN / empty CSV cell is no caption, not "nan"
        ids = [self._ids.get(w, UNK) for w in words(str(raw))][: self.max_length - 1]
        return torch.tensor([BOS, *ids, EOS])

    def collate_targets(self, targets: list[Tensor]) -> Tensor:
        return nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=PAD)

    def decode_ids(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.vocab[i])
        return " ".join(out)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"bleu": CaptionMetric(self.constant)})

    def state(self) -> dict[str, Any]:
        return {"vocab": self.vocab, "constant": self.constant}

    def load_state(self, state: dict[str, Any]) -> None:
        self.vocab = list(state["vocab"])
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.constant = str(state["constant"])

    def build_head(self, model: FusedModel) -> nn.Module:
        assert model.fusion is not None
        if not self.vocab:
            raise ConfigError("task captioning has no vocabulary: fit it on the training captions first")
        columns = {spec.column: m for m, spec in model.preprocessor.modalities.items()}
        if model.target_column in columns:
            raise ConfigError(f"captioning target column '{model.target_column}' is also the input of modality "
                              f"'{columns[model.target_column]}': the model would see the caption it must write")
        dims = {m: model.encoder_dims[m] for m in model.modalities}
        return CaptionDecoder(len(self.vocab), self.dim, self.layers, self.heads, self.max_length, dims,
                              model.fusion.out_dim, self.dropout)

    @staticmethod
    def _decoder(model: FusedModel) -> CaptionDecoder:
        assert isinstance(model.head, CaptionDecoder)
        return model.head

    def memory(self, model: FusedModel, batch: Batch) -> tuple[Tensor, Tensor]:
        assert model.fusion is not None
        features = model.encode(batch)
        return self._decoder(model).memory(model.fusion(features), features)

    def forward(self, model: FusedModel, batch: Batch) -> Tensor:
        """(B, L) greedy caption ids (BOS excluded; EOS then padding after the end)."""
        return self.greedy(model, *self.memory(model, batch))

    def step_loss(self, model: FusedModel, batch: Batch) -> Tensor:
        assert batch.target is not None, "captioning needs captions to train"
        memory, pad = self.memory(model, batch)
        logits = self._decoder(model)(batch.target[:, :-1], memory, pad)
        return F.cross_entropy(logits.flatten(0, 1), batch.target[:, 1:].flatten(), ignore_index=PAD,
                               label_smoothing=self.label_smoothing)

    def eval_step(self, model: FusedModel, batch: Batch, metrics: MetricCollection) -> Tensor:
        assert batch.target is not None, "captioning needs captions to evaluate"
        memory, pad = self.memory(model, batch)
        logits = self._decoder(model)(batch.target[:, :-1], memory, pad)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.target[:, 1:].flatten(), ignore_index=PAD)
        hypotheses = [self.decode_ids(row) for row in self.greedy(model, memory, pad).tolist()]
        references = [self.decode_ids(row) for row in batch.target.tolist()]
        metrics["bleu"].update(hypotheses, references)
        return loss

    def greedy(self, model: FusedModel, memory: Tensor, pad: Tensor) -> Tensor:
        decoder = self._decoder(model)
        tokens = torch.full((len(memory), 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(len(memory), dtype=torch.bool, device=memory.device)
        for _ in range(self.max_length):
            step = decoder(tokens, memory, pad)[:, -1].argmax(dim=-1)
            step = torch.where(done, torch.full_like(step, PAD), step)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
            done |= step == EOS
            if bool(done.all()):
                break
        return tokens[:, 1:]

    def beam_search(self, model: FusedModel, memory: Tensor, pad: Tensor, beam: int) -> list[list[int]]:
        """Beam search per sample; score = sum of log-probabilities / length ** length_penalty.

        Stops when the best finished caption beats every live beam (log-probabilities only
        decrease, so no live beam can overtake it when length_penalty is 0). With beam 1 this is
        exactly greedy decoding.
        """
        decoder = self._decoder(model)
        results = []
        for i in range(len(memory)):
            beams: list[tuple[list[int], float]] = [([BOS], 0.0)]
            finished: list[tuple[list[int], float]] = []
            for _ in range(self.max_length):
                seqs = torch.tensor([b[0] for b in beams], device=memory.device)
                logp = decoder(seqs, memory[i:i + 1].expand(len(beams), -1, -1),
                               pad[i:i + 1].expand(len(beams), -1))[:, -1].log_softmax(dim=-1)
                total = torch.tensor([b[1] for b in beams], device=memory.device)[:, None] + logp
                top = total.flatten().topk(min(2 * beam, total.numel()))
                live: list[tuple[list[int], float]] = []
                for score, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    source, token = divmod(index, logp.shape[1])
                    seq = [*beams[source][0], token]
                    (finished if token == EOS else live).append((seq, score))
                    if len(live) == beam:
                        break
                beams = live
                best_done = max((self._normalised(s, q) for q, s in finished), default=-math.inf)
                if not beams or (self.length_penalty == 0 and best_done >= max(s for _, s in beams)):
                    break
            candidates = finished + beams
            best = max(candidates, key=lambda c: self._normalised(c[1], c[0]))
            results.append(best[0][1:])
        return results

    def _normalised(self, score: float, seq: list[int]) -> float:
        return score / (max(1, len(seq) - 1) ** self.length_penalty) if self.length_penalty else score

    def predict(self, model: FusedModel, batch: Batch) -> list[dict[str, Any]]:
        memory, pad = self.memory(model, batch)
        if self.beam_size == 1:
            rows = self.greedy(model, memory, pad).tolist()
        else:
            rows = self.beam_search(model, memory, pad, self.beam_size)
        return [{"caption": self.decode_ids(row), "search": "greedy" if self.beam_size == 1 else
                 f"beam {self.beam_size}"} for row in rows]


@TASKS.register("captioning", common=(), why="a transformer decoder (dim, layers, dropout), no MLP head")
def captioning(dim: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.1, max_length: int = 24,
               min_freq: int = 1, beam_size: int = 1, length_penalty: float = 0.0,
               label_smoothing: float = 0.0) -> Task:
    return CaptioningTask(dim=dim, layers=layers, heads=heads, dropout=dropout, max_length=max_length,
                          min_freq=min_freq, beam_size=beam_size, length_penalty=length_penalty,
                          label_smoothing=label_smoothing)
