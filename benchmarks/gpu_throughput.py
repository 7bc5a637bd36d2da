"""Training throughput and model FLOPs utilisation of a tri-modal pretrained-size model.

BERT-base + ViT-B/16 + wav2vec2-base sized encoders (random weights from the transformers default
configs, built through mmfuse's own ``hf_text`` / ``hf_image`` / ``hf_audio`` with ``init: random``)
fused with concat and mult by ``MultimodalModel``, trained with fused AdamW on synthetic batches
(text 128 tokens, 224x224 images, 5 s of 16 kHz audio by default). FLOPs of one forward+backward
are counted with ``torch.utils.flop_counter.FlopCounterMode``; MFU = FLOPs/s over the GPU's dense
bf16 peak (H100 SXM: 989 TFLOPS; ``--peak-tflops`` for others).

The library options that target the profile in issue 4 (wav2vec2's conv feature encoder is the
biggest cost; fp32 master weights under autocast are slower than bf16 weights) are flags here:
``--dtype bfloat16`` (encoder weights in bf16: ``dtype`` option), ``--freeze-feature-encoder``,
``--attn sdpa`` (``attn_implementation``), ``--channels-last`` (conv image models only: not ViT)
and ``--compile`` (torch.compile of the whole model).

    python benchmarks/gpu_throughput.py --batch 64 --dtype bfloat16 --freeze-feature-encoder --attn sdpa
    python benchmarks/gpu_throughput.py --tiny --device cpu --steps 2     # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

H100_BF16_DENSE_TFLOPS = 989.0


def build_folders(root: Path, tiny: bool) -> dict[str, Path]:
    """config.json (+ tokenizer / processor / feature extractor) per encoder, weights left random."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        ViTConfig,
        ViTImageProcessor,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
    )

    words = [f"w{i}" for i in range(200)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    if tiny:
        configs = {"text": BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64),
                   "image": ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64),
                   "audio": Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                                           conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                           num_conv_pos_embedding_groups=2)}
        size = 32
    else:
        configs = {"text": BertConfig(), "image": ViTConfig(), "audio": Wav2Vec2Config()}
        size = 224
    folders = {m: root / m for m in configs}
    for m, config in configs.items():
        config.save_pretrained(str(folders[m]))
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(folders["text"]))
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(str(folders["image"]))
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(str(folders["audio"]))
    return folders


def build_model(folders: dict[str, Path], fusion: str, args: argparse.Namespace) -> Any:
    from mmfuse.config import AudioPrep, EncoderConfig, FusionConfig, ImagePrep, ModalitySpec, TaskConfig, TextPrep
    from mmfuse.data.preprocess import Preprocessor
    from mmfuse.model import ModelSpec, MultimodalModel
    from mmfuse.tasks import TASKS

    prep = Preprocessor({m: ModalitySpec(kind=m, column=m) for m in args.encoders},  # type: ignore[arg-type]
                        TextPrep(max_length=args.text_len, tokenizer=str(folders["text"])),
                        ImagePrep(processor=str(folders["image"])),
                        AudioPrep(sample_rate=16000, features="waveform", max_seconds=args.audio_seconds))
    prep.fit([])
    task = TASKS.create("classification")
    task.fit([str(i) for i in range(10)])
    common: dict[str, Any] = {"init": "random", "trainable": "full", "dtype": args.dtype}
    if args.attn:
        common["attn_implementation"] = args.attn
    encoders = {
        "text": EncoderConfig(name="hf_text", model=str(folders["text"]), **common),
        "image": EncoderConfig(name="hf_image", model=str(folders["image"]), channels_last=args.channels_last,
                                 **common),
        "audio": EncoderConfig(name="hf_audio", model=str(folders["audio"]),
                                 freeze_feature_encoder=args.freeze_feature_encoder, **common),
    }
    options = {"mult": {"dim": 64 if args.tiny else 256, "layers": 1, "heads": 4}}.get(fusion, {})
    encoders = {m: e for m, e in encoders.items() if m in args.encoders}
    spec = ModelSpec(encoders=encoders, fusion=FusionConfig(name=fusion, out_dim=256, **options),
                     task=TaskConfig(name="classification"))
    return MultimodalModel(spec, prep, task), prep


def synthetic_batch(prep: Any, batch: int, args: argparse.Namespace, device: torch.device) -> Any:
    from mmfuse.core.contracts import Batch

    gen = torch.Generator().manual_seed(0)
    vocab = prep.tokenizers["text"].vocab_size if "text" in prep.tokenizers else 10
    samples = int(args.audio_seconds * 16000)
    size = prep.image.size
    ones = torch.ones(batch, dtype=torch.bool)
    inputs = {
        "text": {"input_ids": torch.randint(5, vocab, (batch, args.text_len), generator=gen),
                 "attention_mask": torch.ones(batch, args.text_len, dtype=torch.bool)},
        "image": {"pixels": torch.randn(batch, 3, size, size, generator=gen)},
        "audio": {"waveform": torch.randn(batch, samples, generator=gen) * 0.1,
                  "sample_mask": torch.ones(batch, samples, dtype=torch.bool)},
    }
    target = torch.randint(0, 10, (batch,), generator=gen)
    inputs = {m: v for m, v in inputs.items() if m in args.encoders}
    return Batch(inputs=inputs, present={m: ones for m in inputs}, target=target).to(device)


def measure(fusion: str, folders: dict[str, Path], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from mmfuse.config import OptimConfig
    from mmfuse.engine.module import parameter_groups

    torch.manual_seed(0)
    model, prep = build_model(folders, fusion, args)
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, OptimConfig(lr=1e-4)), lr=1e-4,
                                  fused=device.type == "cuda")
    batch = synthetic_batch(prep, args.batch, args, device)
    forward = torch.compile(model) if args.compile else model
    autocast = device.type == "cuda" and args.autocast

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model.task.loss(forward(batch), batch.target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    with FlopCounterMode(display=False) as counter:  # one eager forward+backward
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model.task.loss(model(batch), batch.target)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    sync()
    seconds = (time.perf_counter() - started) / args.steps
    if args.profile:  # where the time goes: the top operators of two more steps
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
            sync()
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile), flush=True)
    achieved = flops / seconds
    return {
        "fusion": fusion, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch, "dtype": args.dtype, "autocast": autocast, "compile": args.compile,
        "attn": args.attn, "freeze_feature_encoder": args.freeze_feature_encoder, "tiny": args.tiny,
        "encoders": "+".join(args.encoders),
        "step_ms": round(seconds * 1e3, 2), "samples_per_s": round(args.batch / seconds, 3),
        "gflops_per_step": round(flops / 1e9, 2), "achieved_tflops": round(achieved / 1e12, 3),
        "mfu": round(achieved / (args.peak_tflops * 1e12), 4), "loss": round(float(last), 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fusions", nargs="+", default=["concat", "mult"])
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="encoder weight dtype (bfloat16: pure-bf16 encoders, no autocast casts)")
    parser.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast on CUDA (Lightning's trainer.precision=bf16)")
    parser.add_argument("--attn", default=None, help="attn_implementation, e.g. sdpa or eager")
    parser.add_argument("--freeze-feature-encoder", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per run here")
    parser.add_argument("--encoders", nargs="+", choices=["text", "image", "audio"], default=["text", "image", "audio"],
                        help="measure a subset, e.g. --encoders audio (the issue's per-encoder numbers)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the top N operators of two profiled steps (torch.profiler)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.text_len, args.audio_seconds = min(args.text_len, 16), min(args.audio_seconds, 0.5)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_folders(Path(tmp), args.tiny)
        for fusion in args.fusions:
            row = measure(fusion, folders, args, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
