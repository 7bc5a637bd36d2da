"""AV-MNIST training throughput: the fast in-memory path vs the per-sample DataLoader path.

MultiBench's AV-MNIST recipe (image LeNet 48-d + audio LeNet 192-d, concat -> MLP, and LMF) is
trained through ``mmfuse``'s own trainer twice per method, once with ``data.in_memory: false``
(per-sample tensors, DataLoader + collate per batch) and once with ``data.in_memory: true``
(tensors sliced per batch, moved to the GPU once), in one process so the ratio compares like
with like. Reported per run: one-off data preparation time, seconds per epoch (training +
validation, as MultiBench's own timing), training samples per second, test accuracy.

    python benchmarks/avmnist_throughput.py data/avmnist --epochs 2
    python benchmarks/avmnist_throughput.py data/avmnist --epochs 5 --device cuda   # bf16, batch 1024

On CUDA the defaults follow the issue's setting: bf16 autocast, batch 1024. Results go to
``--out`` as JSON and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mmfuse.config import load_config
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"concat": "avmnist-late.yaml", "lmf": "avmnist-lmf.yaml", "tfn": "avmnist-tfn.yaml"}


def measure(folder: Path, method: str, in_memory: bool, epochs: int, device: str, batch_size: int,
            out: Path) -> dict[str, object]:
    overrides = [
        f"data.manifest={folder.resolve() / 'manifest.jsonl'}", f"data.in_memory={str(in_memory).lower()}",
        f"data.batch_size={batch_size}", f"trainer.max_epochs={epochs}", "trainer.patience=null",
        "trainer.progress_bar=false", f"trainer.output_dir={out / f'{method}-{in_memory}'}",
        f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
        "trainer.precision=bf16" if device == "cuda" else "trainer.precision='32'",
    ]
    config = load_config(REPO / "configs" / RECIPES[method], overrides)
    started = time.perf_counter()
    data = prepare_data(config)
    prepare_seconds = time.perf_counter() - started
    result = fit(config, data, save=False)
    n_train = len(data.datasets["train"])
    return {
        "method": method, "path": "in_memory" if in_memory else "dataloader", "device": device,
        "batch_size": batch_size, "epochs": epochs, "train_samples": n_train,
        "prepare_seconds": round(prepare_seconds, 2),
        "seconds_per_epoch": round(result.train_seconds / epochs, 3),
        "samples_per_second": round(n_train * epochs / result.train_seconds, 1),
        "test_accuracy": None if result.test_metrics is None else round(result.test_metrics["accuracy"], 4),
    }


def loader_only(folder: Path, in_memory: bool, batch_size: int) -> dict[str, object]:
    """One pass over the training batches with no model: what the data path alone costs per epoch."""
    from mmfuse.data.dataset import Collator
    from mmfuse.engine.data import make_loader

    overrides = [f"data.manifest={folder.resolve() / 'manifest.jsonl'}", f"data.in_memory={str(in_memory).lower()}"]
    config = load_config(REPO / "configs" / RECIPES["concat"], overrides)
    data = prepare_data(config)
    loader = make_loader(data.datasets["train"], Collator(data.preprocessor, data.task), batch_size, True, 0)
    started = time.perf_counter()
    count = sum(batch.size for batch in loader)
    seconds = time.perf_counter() - started
    return {"path": "in_memory" if in_memory else "dataloader", "loader_only": True, "batch_size": batch_size,
            "train_samples": count, "seconds_per_epoch": round(seconds, 3),
            "samples_per_second": round(count / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder built by `mmfuse data avmnist`")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default="concat,lmf")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    parser.add_argument("--cache", type=Path, default=None, help="MMFUSE_CACHE for the in-memory arrays")
    parser.add_argument("--loader-only", action="store_true", help="time the batches alone, no model")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "avmnist-throughput.json")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    batch_size = args.batch_size or (1024 if device == "cuda" else 128)
    if args.cache is not None:
        os.environ["MMFUSE_CACHE"] = str(args.cache)
    runs_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "mmfuse-avmnist-throughput"
    rows = []
    if args.loader_only:
        rows = [loader_only(args.folder, in_memory, batch_size) for in_memory in (False, True)]
        print(json.dumps(rows, indent=1))
        print(f"data path alone: in-memory {rows[0]['seconds_per_epoch'] / rows[1]['seconds_per_epoch']:.1f}x "  # type: ignore[operator]
              "faster than the DataLoader path")
        args.methods = ""
    for method in filter(None, args.methods.split(",")):
        # The in-memory cache is built on the first in-memory run; warm it so both paths are timed
        # from preprocessed data (the DataLoader path preprocesses every sample in prepare_data).
        for in_memory in (False, True):
            rows.append(measure(args.folder, method, in_memory, args.epochs, device, batch_size, runs_dir))
            print(json.dumps(rows[-1]), flush=True)
    for method in filter(None, args.methods.split(",")):
        slow, fast = (next(r for r in rows if r["method"] == method and r["path"] == p)
                      for p in ("dataloader", "in_memory"))
        ratio = float(slow["seconds_per_epoch"]) / float(fast["seconds_per_epoch"])  # type: ignore[arg-type]
        print(f"{method}: in-memory epoch {ratio:.2f}x faster than the DataLoader path")
    machine = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
