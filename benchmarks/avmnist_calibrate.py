"""Unimodal and late-fusion LeNet accuracies on a built AV-MNIST folder (MultiBench layout).

Used to calibrate the builder's noise defaults against the published bands (image-only ~65-75%,
audio-only ~42-66%, late fusion ~70-72%). Plain PyTorch on the MultiBench arrays, independent of
mmfuse's pipeline, so it measures the data, not our trainer:

    python benchmarks/avmnist_calibrate.py DATA_DIR --epochs 8 [--train-limit 20000]
    python benchmarks/avmnist_calibrate.py --mnist ../shared/data/mnist --pca 0.75,0.85,0.9 --epochs 5

The second form measures the image modality alone on the full MNIST (55,000 train / 5,000 val /
10,000 test) for several PCA-removal fractions, without building the audio.

The models are MultiBench's: LeNet(1, 6, 3) on images (48-d), LeNet(1, 6, 5) on spectrograms
(192-d), BatchNorm + ReLU + 2x2 max-pool per conv; late fusion concatenates them into an MLP
(240 -> 100 -> 10). Inputs are divided by 255 as MultiBench's loader does; Adam, lr 1e-3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmfuse.encoders.builtin import LeNet


class Model(nn.Module):
    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.image = LeNet(1, 6, 3) if use in ("image", "both") else None
        self.audio = LeNet(1, 6, 5) if use in ("audio", "both") else None
        width = (48 if self.image else 0) + (192 if self.audio else 0)
        self.head = nn.Sequential(nn.Linear(width, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.image is not None:
            parts.append(self.image(image))
        if self.audio is not None:
            parts.append(self.audio(audio))
        return self.head(torch.cat(parts, dim=1))


def load(folder: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = np.load(folder / "image" / f"{split}_data.npy", mmap_mode="r")
    audio = np.load(folder / "audio" / f"{split}_data.npy", mmap_mode="r")
    labels = np.load(folder / f"{split}_labels.npy")
    n = len(labels) if limit is None else min(limit, len(labels))
    return (torch.from_numpy(np.array(image[:n]) / 255.0).float().reshape(n, 1, 28, 28),
            torch.from_numpy(np.array(audio[:n]) / 255.0).float().unsqueeze(1),
            torch.from_numpy(labels[:n]).long())


def accuracy(model: Model, image: torch.Tensor, audio: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 500):
            correct += int((model(image[i:i + 500], audio[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
    model.train()
    return correct / len(labels)


def run(folder: Path, use: str, epochs: int, train_limit: int | None, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    image, audio, labels = load(folder, "train", None)
    n_val = max(1, round(len(labels) / 12))
    train = slice(0, len(labels) - n_val) if train_limit is None else slice(0, min(train_limit, len(labels) - n_val))
    val = slice(len(labels) - n_val, len(labels))
    test = load(folder, "test", None)
    model = Model(use)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    best_val, best_test, started = 0.0, 0.0, time.perf_counter()
    n = train.stop - train.start
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(image[idx], audio[idx]), labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
        val_acc = accuracy(model, image[val], audio[val], labels[val])
        if val_acc > best_val:
            best_val, best_test = val_acc, accuracy(model, *test)
    return {"val": best_val, "test": best_test, "seconds": time.perf_counter() - started}


def image_only_full(mnist: Path, fraction: float, epochs: int, seed: int) -> dict[str, float]:
    """Image LeNet on all of MNIST with ``fraction`` of the PCA energy removed, as the builder does."""
    from mmfuse.datasets.avmnist import _PCAEnergyRemoval, read_mnist

    train_images, train_labels = read_mnist(mnist, "train")
    test_images, test_labels = read_mnist(mnist, "test")
    pca = _PCAEnergyRemoval.fit(train_images, fraction)

    def prep(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pca.apply(images) / 255.0).float().reshape(len(images), 1, 28, 28)

    image, test_image = prep(train_images), prep(test_images)
    labels, test_y = torch.from_numpy(train_labels), torch.from_numpy(test_labels)
    dummy = torch.zeros(len(labels), 1, 1, 1)
    torch.manual_seed(seed)
    model = Model("image")
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    best_val, best_test, started = 0.0, 0.0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(55000)
        for i in range(0, 55000, 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(image[idx], dummy[idx]), labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
        val_acc = accuracy(model, image[55000:], dummy[55000:], labels[55000:])
        if val_acc > best_val:
            best_val = val_acc
            best_test = accuracy(model, test_image, torch.zeros(len(test_y), 1, 1, 1), test_y)
    return {"pca_components_kept": pca.kept, "val": best_val, "test": best_test,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--mnist", type=Path, default=None, help="image-only on full MNIST (see above)")
    parser.add_argument("--pca", default="0.75", help="PCA-removal fractions for --mnist")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use", default="image,audio,both")
    args = parser.parse_args()
    if args.mnist is not None:
        for fraction in (float(f) for f in args.pca.split(",")):
            print(json.dumps({"pca_removed": fraction,
                              **image_only_full(args.mnist, fraction, args.epochs, args.seed)}), flush=True)
        return
    if args.folder is None:
        parser.error("give a built folder, or --mnist")
    results = {use: run(args.folder, use, args.epochs, args.train_limit, args.seed) for use in args.use.split(",")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
