"""``mmfuse data ...``: build the embedded, example and AV-MNIST data sets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mmfuse.cli.app import console, data_app, err_console, friendly_errors


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    n_samples: Annotated[int, typer.Option("--n", help="Number of samples.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    missing_rate: Annotated[float, typer.Option(help="Chance each modality of a sample is absent.")] = 0.0,
) -> None:
    """Write the embedded synthetic tri-modal data set (PNG + WAV + JSONL manifest)."""
    from mmfuse.datasets.synth import generate_synthetic

    started = time.perf_counter()
    manifest = generate_synthetic(out, n_samples=n_samples, seed=seed, missing_rate=missing_rate)
    console.print(f"wrote {n_samples} samples to [bold]{manifest}[/] in {time.perf_counter() - started:.1f} s")


@data_app.command("features-example")
@friendly_errors
def data_features_example(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    n_samples: Annotated[int, typer.Option("--n", help="Number of samples.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write a small MOSI-shaped set of pre-extracted features (.npy per sample and per split)."""
    from mmfuse.datasets.feature_example import generate_feature_example

    manifest = generate_feature_example(out, n_samples=n_samples, seed=seed)
    console.print(f"wrote {n_samples} samples to [bold]{manifest}[/]; "
                  "train with: mmfuse train configs/features-example.yaml --set data.manifest=" + str(manifest))


def _audio_augment(noise: str, snr: str, babble_clips: int | None = None) -> Any:
    """The AV-MNIST builders' speech augmentation from the shared --noise / --snr options."""
    from mmfuse.core.errors import DataError
    from mmfuse.datasets.avmnist import AudioAugment

    if noise not in ("babble", "white", "none"):
        raise DataError(f"--noise must be babble, white or none, got '{noise}'")
    extra = {} if babble_clips is None else {"babble_clips": babble_clips}
    return AudioAugment(noise=noise, snr_db=_snr_range(snr), **extra)  # type: ignore[arg-type]


def _snr_range(value: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        from mmfuse.core.errors import DataError

        raise DataError(f"--snr must be 'low,high' in dB (e.g. -8,2), got '{value}'") from None
    return low, high


_PCA_REMOVED_HELP = "Fraction of MNIST PCA variance removed: only the leading components carrying the rest stay."
# The options both AV-MNIST builders share.
MnistFolder = Annotated[Path, typer.Option(help="MNIST folder (IDX files, .gz or not, or torchvision's MNIST/raw).")]
FsddSource = Annotated[Path, typer.Option(help="FSDD repo folder, its recordings/ folder, or the upstream archive.")]
OutFolder = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
BuildSeed = Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")]
MnistLimit = Annotated[int | None, typer.Option(help="Only the first N MNIST train (N/6 test) images.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a non-empty output folder.")]
PcaRemoved = Annotated[float, typer.Option(help=_PCA_REMOVED_HELP)]
SnrRange = Annotated[str, typer.Option(help="SNR range in dB of the noise added to the speech, 'low,high'.")]
NoiseName = Annotated[str, typer.Option(help="babble (other FSDD clips), white or none.")]


@data_app.command("avmnist")
@friendly_errors
def data_avmnist(
    mnist: MnistFolder,
    fsdd: FsddSource,
    out: OutFolder,
    seed: BuildSeed = 0,
    pca_removed: PcaRemoved = 0.75,
    snr: SnrRange = "-8,2",
    noise: NoiseName = "babble",
    babble_clips: Annotated[int, typer.Option(help="Clips summed into one babble noise.")] = 4,
    limit: MnistLimit = None,
    overwrite: Overwrite = False,
) -> None:
    """Build AV-MNIST (CentralNet/MultiBench recipe): MultiBench's .npy layout + an mmfuse manifest."""
    from mmfuse.datasets.avmnist import AVMnistRecipe, build_avmnist

    recipe = AVMnistRecipe(seed=seed, pca_removed=pca_removed, limit=limit,
                           augment=_audio_augment(noise, snr, babble_clips))
    started = time.perf_counter()
    manifest = build_avmnist(mnist, fsdd, out, recipe, overwrite=overwrite, log=console.print)
    seconds = time.perf_counter() - started
    console.print(f"wrote [bold]{manifest}[/] (+ MultiBench layout, SHA256SUMS) in {seconds:.1f} s")


@data_app.command("avmnist-arith")
@friendly_errors
def data_avmnist_arith(
    mnist: MnistFolder,
    fsdd: FsddSource,
    out: OutFolder,
    seed: BuildSeed = 0,
    pca_removed: PcaRemoved = 0.0,
    snr: SnrRange = "10,30",
    noise: NoiseName = "white",
    limit: MnistLimit = None,
    overwrite: Overwrite = False,
) -> None:
    """Build avmnist-arith: image digit a, spoken digit b, an operation phrase; label (a op b) mod 10."""
    from mmfuse.datasets.avmnist_arith import ArithRecipe, build_avmnist_arith

    recipe = ArithRecipe(seed=seed, pca_removed=pca_removed, limit=limit, augment=_audio_augment(noise, snr))
    started = time.perf_counter()
    manifest = build_avmnist_arith(mnist, fsdd, out, recipe, overwrite=overwrite, log=console.print)
    console.print(f"wrote [bold]{manifest}[/] (+ SHA256SUMS) in {time.perf_counter() - started:.1f} s")


@data_app.command("pack")
@friendly_errors
def data_pack(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML whose data to pack.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Pack folder, or a URL (s3://bucket/prefix...).")],
    workers: Annotated[int | None, typer.Option(
        help="Preprocessing processes (default: the usable cores: CPU affinity and cgroup quota).", min=1)] = None,
    shard_size: Annotated[int, typer.Option(help="Samples per shard.", min=1)] = 1000,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Replace a finished pack (or one of other data).")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set data.on_error=skip")] = None,
    shard_index: Annotated[int | None, typer.Option(help="Pack only part I of --shard-count (0-based).", min=0)] = None,
    shard_count: Annotated[int | None, typer.Option(help="Parts the shard plan is split into.", min=1)] = None,
    finalize: Annotated[bool, typer.Option("--finalize", help="Write pack.json once every part is packed.")] = False,
    engine: Annotated[str, typer.Option(help="local (a process pool) or ray (Ray Data tasks).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")] = None,
) -> None:
    """Preprocess every split once, in parallel, into WebDataset shards that training streams (data.pack).

    Fits vocabulary and labels on train as training does; a killed pack continues where it stopped
    when run again; a finished pack is kept unless --rebuild. Many machines pack one folder with
    --shard-index/--shard-count, then --finalize; --engine ray packs on a Ray cluster.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mmfuse.config import load_config

    cfg = load_config(config, list(set_ or []))
    part = _part(shard_index, shard_count, finalize, engine, rebuild)
    columns = (TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    started = time.perf_counter()
    first: list[int] = []  # samples already packed by an interrupted run: not part of this run's rate
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("pack", total=None, rate="")

        def progress(done: int, total: int) -> None:
            if not first:
                first.append(done)
            seconds = time.perf_counter() - started
            rate = f"{(done - first[0]) / seconds:,.0f} samples/s" if done > first[0] and seconds > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        result = _pack(cfg, out, workers, rebuild, shard_size, progress, part, finalize, engine, address)
    counts = ", ".join(f"{split} {n}" for split, n in sorted(result.counts.items()))
    for message in result.messages:
        console.print(f"[yellow]{message}[/]", highlight=False, soft_wrap=True)
    if result.already_packed:
        checked = "listed in its pack.json" if "://" in out else "verified whole"
        console.print(f"[bold]{out}[/] is already a pack of this data ({counts}); its {result.shards_kept} shards "
                      f"{checked}; --rebuild to redo it")
        return
    if finalize:
        console.print(f"finalized [bold]{out}[/]: {counts} samples in {result.shards_kept} shards")
        return
    kept = f", {result.shards_kept} kept" if result.shards_kept else ""
    if part is not None:
        console.print(f"packed part {part[0]} of {part[1]} ({counts} samples) into [bold]{out}[/] "
                      f"({result.shards_written} shards written{kept}); `--finalize` once every part is done")
        return
    console.print(f"packed {counts} samples into [bold]{out}[/] ({result.shards_written} shards written{kept}) "
                  f"in {time.perf_counter() - started:.1f} s")
    for split, reasons in result.skipped.items():
        for reason, count in reasons.items():
            console.print(f"[yellow]skipped {count} sample(s) in {split}:[/] {reason}", highlight=False)


def _part(index: int | None, count: int | None, finalize: bool, engine: str, rebuild: bool) -> tuple[int, int] | None:
    """(index, count) of a pack in parts, after refusing options that do not go with it."""
    from mmfuse.core.errors import ConfigError

    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be local or ray, got '{engine}'")
    if (index is None) != (count is None):
        raise ConfigError("--shard-index and --shard-count go together")
    if (index is not None or finalize) and (engine != "local" or rebuild):
        raise ConfigError("a pack in parts (--shard-index/--shard-count, --finalize) uses the local engine and "
                          "never --rebuild (a part must not delete other parts' shards)")
    if index is not None and finalize:
        raise ConfigError("--finalize runs after the parts, without --shard-index/--shard-count")
    return None if index is None or count is None else (index, count)


def _pack(cfg: Any, out: str, workers: int | None, rebuild: bool, shard_size: int, progress: Any,
          part: tuple[int, int] | None, finalize: bool, engine: str, address: str | None) -> Any:
    """The one packing call the options ask for: a URL, a part, the finalize, or a whole local or Ray pack."""
    from mmfuse.core.errors import ConfigError
    from mmfuse.core.locations import is_url
    from mmfuse.engine.pack import pack_data
    from mmfuse.engine.pack_parts import finalize_pack, pack_part

    if is_url(out):
        from mmfuse.engine.pack_upload import pack_to_url

        if part is not None or finalize:
            raise ConfigError("a pack in parts is written to a shared folder (--out DIR), not a URL: finalize it, "
                              "then copy it (aws s3 sync) or pack the URL in one command (--engine ray for a cluster)")
        ray = None
        if engine == "ray":
            from mmfuse.engine.pack_ray import ray_runner

            ray = lambda url: ray_runner(address, upload=url)  # noqa: E731
        return pack_to_url(cfg, out, workers, rebuild, shard_size, progress, ray)
    if part is not None:
        return pack_part(cfg, Path(out), part[0], part[1], workers, shard_size, progress)
    if finalize:
        return finalize_pack(cfg, Path(out), shard_size)
    if engine == "ray":
        from mmfuse.engine.pack_ray import ray_runner

        return pack_data(cfg, Path(out), workers, rebuild, shard_size, progress, runner=ray_runner(address))
    return pack_data(cfg, Path(out), workers=workers, rebuild=rebuild, shard_size=shard_size, progress=progress)


@data_app.command("verify")
@friendly_errors
def data_verify(pack: Annotated[Path, typer.Argument(help="Pack folder (from `mmfuse data pack`).")]) -> None:
    """Hash every shard of a pack and compare it with its index: names each damaged shard and member.

    Exits 1 when anything is damaged; `mmfuse data pack` with the pack's config and --out repairs it.
    """
    from mmfuse.engine.pack_verify import verify_pack

    started = time.perf_counter()
    result = verify_pack(pack)
    for why in result.damaged.values():
        err_console.print(f"[bold red]damaged:[/] {why}", highlight=False, soft_wrap=True)
    if result.damaged:
        err_console.print(f"{len(result.damaged)} of {result.shards} shards of {pack} are damaged; repair them with "
                          f"`mmfuse data pack -c CONFIG --out {pack}` (the config it was packed from)", highlight=False)
        raise typer.Exit(1)
    console.print(f"{pack}: all {result.shards} shards match their digests ({time.perf_counter() - started:.1f} s)")
