"""The ``mmfuse`` command line: train, evaluate, predict, data, demo.

User errors (``MMFuseError``) print one red line and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mmfuse import __version__
from mmfuse.errors import MMFuseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal fusion over text, images and audio.")
data_app = typer.Typer(no_args_is_help=True, help="Build data sets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turns user errors into one clear line and a non-zero exit instead of a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MMFuseError as exc:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    """Lightning's info lines drown the output a user cares about; warnings stay visible in --debug."""
    if not _state["debug"]:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _version(value: bool) -> None:
    if value:
        console.print(f"mmfuse {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
) -> None:
    _state["debug"] = debug
    _quiet_libraries()


def _metrics_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    return table


@app.command()
@friendly_errors
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set trainer.max_epochs=5")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (trainer.output_dir).")] = None,
) -> None:
    """Train a model from a config; saves it to OUTPUT_DIR/model."""
    from mmfuse.config import load_config
    from mmfuse.training import train as run_training

    overrides = list(set_ or []) + ([f"trainer.output_dir={out}"] if out else [])
    cfg = load_config(config, overrides)
    result = run_training(cfg)
    console.print(_metrics_table("validation", result.val_metrics))
    if result.test_metrics:
        console.print(_metrics_table("test", result.test_metrics))
    for split, count in result.skipped.items():
        console.print(f"[yellow]skipped {count} bad sample(s) in {split}[/] (data.on_error=skip)")
    console.print(f"model saved to [bold]{result.model_dir}[/] ({result.params:,} parameters, "
                  f"{result.train_seconds:.1f} s training)")


def _load_dataset(model_dir: Path, manifest: Path, split: str | None, on_error: str, with_targets: bool,
                  label_column: str | None = None) -> Any:
    from mmfuse.data.dataset import MultimodalDataset
    from mmfuse.data.manifest import read_manifest
    from mmfuse.errors import DataError
    from mmfuse.model import MultimodalModel

    model = MultimodalModel.from_pretrained(model_dir)
    used = {m: spec for m, spec in model.preprocessor.modalities.items() if m in model.modalities}
    records = read_manifest(manifest, used,
                            target_column=(label_column or model.spec.target_column) if with_targets else None,
                            split_column="split" if split else None)
    if split:
        records = [r for r in records if (r.split or "").lower() == split.lower()]
        if not records:
            raise DataError(f"{manifest}: no rows with split '{split}'")
    dataset = MultimodalDataset(records, model.preprocessor, model.task if with_targets else None,
                                on_error="skip" if on_error == "skip" else "raise")
    if len(dataset) == 0:
        raise DataError(f"{manifest}: every sample was skipped")
    return model, dataset


@app.command()
@friendly_errors
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved model folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Manifest with targets.")],
    split: Annotated[str | None, typer.Option(help="Only rows whose 'split' column has this value.")] = None,
    on_error: Annotated[str, typer.Option(help="raise | skip bad samples")] = "raise",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON.")] = None,
    robustness: Annotated[bool, typer.Option(
        "--robustness", help="Also: metrics per subset of present modalities, modality importance "
        "(ablation, Shapley) and accuracy vs. input corruption; writes CSVs and PNGs to --out.")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Robustness output folder (default: MODEL/../robustness).")] = None,
    label_column: Annotated[str | None, typer.Option(
        help="Read targets from this column instead of the model's target column (e.g. the class "
        "that defines relevance for contrastive class-level recall).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the robustness corruptions.")] = 0,
    levels: Annotated[int, typer.Option(help="Corruption levels, evenly from 0 to 1.")] = 11,
    corruptions: Annotated[str | None, typer.Option(
        help="Comma-separated corruptions (default: all that fit the model's modalities): gaussian_noise, "
        "gaussian_blur, occlusion, white_noise, time_mask, typos, word_dropout.")] = None,
) -> None:
    """Evaluate a saved model on a manifest; --robustness adds missing-modality and noise studies."""
    from mmfuse.evaluation import evaluate as run_evaluation

    started = time.perf_counter()
    loaded, dataset = _load_dataset(model, data, split, on_error, with_targets=True, label_column=label_column)
    names = [c.strip() for c in corruptions.split(",") if c.strip()] if corruptions is not None else None
    if robustness:  # bad options fail before any work
        from mmfuse.robustness import noise_levels, plan_corruptions
        from mmfuse.tasks.base import HeadTask

        if not isinstance(loaded.task, HeadTask):
            raise MMFuseError(f"--robustness needs a classification / multi-label / regression model; this one "
                              f"was trained for task '{loaded.task.name}'")

        noise_levels(levels)
        plan_corruptions(loaded, names)
    metrics = run_evaluation(loaded, dataset)
    console.print(_metrics_table(f"{data.name}: {len(dataset)} samples", metrics))
    if dataset.report.count:
        console.print(f"[yellow]skipped {dataset.report.count} bad sample(s)[/]")
        for reason in dataset.report.skipped[:5]:
            console.print(f"  {reason}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2))
    if robustness:
        from mmfuse.robustness import evaluation_records, report_tables, run_robustness

        folder = out or model.resolve().parent / "robustness"
        with console.status("robustness: missing modalities, importance, corruptions..."):
            records = evaluation_records(loaded, data, split)
            report = run_robustness(loaded, records, out=folder, seed=seed, levels=levels, corruptions=names,
                                    on_error="skip" if on_error == "skip" else "raise")
        for table in report_tables(report):
            console.print(table)
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.seconds.items() if name != "total")
        console.print(f"robustness files in [bold]{folder}[/]: {', '.join(p.name for p in report.files.values())}; "
                      f"{time.perf_counter() - started:.1f} s in all ({stages})")


@app.command()
@friendly_errors
def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved model folder.")],
    text: Annotated[str | None, typer.Option(help="Text for the 'text' modality.")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file for the 'image' modality.")] = None,
    audio: Annotated[Path | None, typer.Option(help="Audio file for the 'audio' modality.")] = None,
    input_: Annotated[list[str] | None, typer.Option("--input", help="MODALITY=VALUE for any modality.")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Predict every row of a manifest.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSONL output for --data.")] = None,
    impute: Annotated[str | None, typer.Option(
        help="Autoencoder models: the modality to impute from the others (hidden from the model).")] = None,
    beam: Annotated[int | None, typer.Option(help="Captioning models: beam size (1 = greedy).")] = None,
) -> None:
    """Predict from any subset of the trained modalities; prints JSON."""
    from mmfuse.data.dataset import Collator, build_sample
    from mmfuse.data.manifest import Record
    from mmfuse.errors import DataError
    from mmfuse.evaluation import predict as predict_dataset
    from mmfuse.model import MultimodalModel

    if data is not None:
        loaded, dataset = _load_dataset(model, data, None, "raise", with_targets=False)
        _prediction_options(loaded, impute, beam)
        lines = [json.dumps(p) for p in predict_dataset(loaded, dataset)]
        if out:
            out.write_text("\n".join(lines) + "\n")
            console.print(f"wrote {len(lines)} predictions to {out}")
        else:
            print("\n".join(lines))
        return
    loaded = MultimodalModel.from_pretrained(model)
    _prediction_options(loaded, impute, beam)
    given: dict[str, str] = {}
    for name, value in (("text", text), ("image", image), ("audio", audio)):
        if value is not None:
            given[name] = str(value)
    for item in input_ or []:
        if "=" not in item:
            raise DataError(f"--input '{item}' must look like MODALITY=VALUE")
        name, value = item.split("=", 1)
        given[name] = value
    if not given:
        raise DataError(f"give at least one input; this model reads {', '.join(loaded.modalities)}")
    if impute is not None and impute in given:
        raise DataError(f"--impute {impute}: do not give {impute} as an input; it is imputed from the others")
    for name in given:
        if name not in loaded.modalities:
            raise DataError(f"this model was not trained with '{name}'; it reads {', '.join(loaded.modalities)}")
    fields: dict[str, str | None] = {}
    for m in loaded.preprocessor.modalities:
        value = given.get(m)
        if value is not None and loaded.preprocessor.kind(m) != "text":
            value = str(Path(value).expanduser().resolve())
        fields[m] = value
    record = Record(source=Path("command line"), row=0, id="command line", fields=fields)
    sample = build_sample(record, loaded.preprocessor, None)
    batch = Collator(loaded.preprocessor, None)([sample])
    print(json.dumps(loaded.predict(batch)[0], indent=2))


def _prediction_options(model: Any, impute: str | None, beam: int | None) -> None:
    """Applies --impute (autoencoder) and --beam (captioning), refusing them for other tasks."""
    from mmfuse.tasks.autoencoder import AutoencoderTask
    from mmfuse.tasks.captioning import CaptioningTask

    if impute is not None:
        if not isinstance(model.task, AutoencoderTask):
            raise MMFuseError(f"--impute needs a model trained with task 'autoencoder', not '{model.task.name}'")
        if impute not in model.modalities:
            raise MMFuseError(f"--impute {impute}: this model has no such modality; it reads "
                              f"{', '.join(model.modalities)}")
        model.task.impute = [impute]
    if beam is not None:
        if not isinstance(model.task, CaptioningTask):
            raise MMFuseError(f"--beam needs a model trained with task 'captioning', not '{model.task.name}'")
        if beam < 1:
            raise MMFuseError(f"--beam must be >= 1, got {beam}")
        model.task.beam_size = beam


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    n_samples: Annotated[int, typer.Option("--n", help="Number of samples.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    missing_rate: Annotated[float, typer.Option(help="Chance each modality of a sample is absent.")] = 0.0,
) -> None:
    """Write the embedded synthetic tri-modal data set (PNG + WAV + JSONL manifest)."""
    from mmfuse.data.synth import generate_synthetic

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
    from mmfuse.data.feature_example import generate_feature_example

    manifest = generate_feature_example(out, n_samples=n_samples, seed=seed)
    console.print(f"wrote {n_samples} samples to [bold]{manifest}[/]; "
                  "train with: mmfuse train configs/features-example.yaml --set data.manifest=" + str(manifest))


def _audio_augment(noise: str, snr: str, babble_clips: int | None = None) -> Any:
    """The AV-MNIST builders' speech augmentation from the shared --noise / --snr options."""
    from mmfuse.data.avmnist import AudioAugment
    from mmfuse.errors import DataError

    if noise not in ("babble", "white", "none"):
        raise DataError(f"--noise must be babble, white or none, got '{noise}'")
    extra = {} if babble_clips is None else {"babble_clips": babble_clips}
    return AudioAugment(noise=noise, snr_db=_snr_range(snr), **extra)  # type: ignore[arg-type]


def _snr_range(value: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        from mmfuse.errors import DataError

        raise DataError(f"--snr must be 'low,high' in dB (e.g. -8,2), got '{value}'") from None
    return low, high


_PCA_REMOVED_HELP = "Fraction of MNIST PCA variance removed: only the leading components carrying the rest stay."


@data_app.command("avmnist")
@friendly_errors
def data_avmnist(
    mnist: Annotated[Path, typer.Option(help="MNIST folder (IDX files, .gz or not, or torchvision's MNIST/raw).")],
    fsdd: Annotated[Path, typer.Option(help="FSDD repo folder, its recordings/ folder, or the upstream archive.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    pca_removed: Annotated[float, typer.Option(help=_PCA_REMOVED_HELP)] = 0.75,
    snr: Annotated[str, typer.Option(help="SNR range in dB of the noise added to the speech, 'low,high'.")] = "-8,2",
    noise: Annotated[str, typer.Option(help="babble (other FSDD clips), white or none.")] = "babble",
    babble_clips: Annotated[int, typer.Option(help="Clips summed into one babble noise.")] = 4,
    limit: Annotated[int | None, typer.Option(help="Only the first N MNIST train (N/6 test) images.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Build AV-MNIST (CentralNet/MultiBench recipe): MultiBench's .npy layout + an mmfuse manifest."""
    from mmfuse.data.avmnist import AVMnistRecipe, build_avmnist

    recipe = AVMnistRecipe(seed=seed, pca_removed=pca_removed, limit=limit,
                           augment=_audio_augment(noise, snr, babble_clips))
    started = time.perf_counter()
    manifest = build_avmnist(mnist, fsdd, out, recipe, overwrite=overwrite, log=console.print)
    seconds = time.perf_counter() - started
    console.print(f"wrote [bold]{manifest}[/] (+ MultiBench layout, SHA256SUMS) in {seconds:.1f} s")


@data_app.command("avmnist-arith")
@friendly_errors
def data_avmnist_arith(
    mnist: Annotated[Path, typer.Option(help="MNIST folder (IDX files, .gz or not, or torchvision's MNIST/raw).")],
    fsdd: Annotated[Path, typer.Option(help="FSDD repo folder, its recordings/ folder, or the upstream archive.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    pca_removed: Annotated[float, typer.Option(help=_PCA_REMOVED_HELP)] = 0.0,
    snr: Annotated[str, typer.Option(help="SNR range in dB of the noise added to the speech, 'low,high'.")] = "10,30",
    noise: Annotated[str, typer.Option(help="babble (other FSDD clips), white or none.")] = "white",
    limit: Annotated[int | None, typer.Option(help="Only the first N MNIST train (N/6 test) images.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Build avmnist-arith: image digit a, spoken digit b, an operation phrase; label (a op b) mod 10."""
    from mmfuse.data.avmnist import ArithRecipe, build_avmnist_arith

    recipe = ArithRecipe(seed=seed, pca_removed=pca_removed, limit=limit, augment=_audio_augment(noise, snr))
    started = time.perf_counter()
    manifest = build_avmnist_arith(mnist, fsdd, out, recipe, overwrite=overwrite, log=console.print)
    console.print(f"wrote [bold]{manifest}[/] (+ SHA256SUMS) in {time.perf_counter() - started:.1f} s")


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("mmfuse-demo"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override the demo config.")] = None,
    progress: Annotated[bool, typer.Option(help="Show per-run progress bars.")] = False,
) -> None:
    """Train each modality alone and fused (concat, late) on the embedded data; print a table."""
    from mmfuse.demo import run_demo

    started = time.perf_counter()
    console.print("[bold]mmfuse demo[/]: synthetic tri-modal data, 8 classes (chance 0.125); "
                  "each modality carries one factor of the label")
    with console.status("training 5 models on the CPU..."):
        rows = run_demo(out, overrides=set_, progress=progress)
    table = Table(title="test set")
    for column in ("method", "modalities", "accuracy", "macro-F1", "params", "train s"):
        table.add_column(column, justify="left" if column in ("method", "modalities") else "right")
    for r in rows:
        table.add_row(r.method, r.modalities, f"{r.accuracy:.3f}", f"{r.macro_f1:.3f}", f"{r.params:,}",
                      f"{r.train_seconds:.1f}")
    console.print(table)
    console.print(f"results: {out / 'results.csv'}, {out / 'results.png'}; models: {out / 'runs'}/<method>/model")
    console.print(f"total {time.perf_counter() - started:.0f} s. Try: mmfuse predict -m {out}/runs/concat/model "
                  "--text 'the sea feels calm this evening' --image IMAGE.png")


def _bench_table(runs: list[Any]) -> Table:
    from mmfuse.bench import summarise

    summary = summarise(runs)
    metric = next(iter(runs[0].metrics))
    hidden = sorted({k for row in summary for k in row.mean if k.startswith(f"{metric}_without_")})
    if any(f"{metric}_missing_mean" in row.mean for row in summary):
        hidden.append(f"{metric}_missing_mean")
    table = Table(title=f"test {metric}, mean ± std over seeds")
    names = [h.replace(f"{metric}_without_", "no ").replace(f"{metric}_missing_mean", "missing (mean)") for h in hidden]
    for column in ("method", "dropout", "seeds", metric, *names, "params", "train s", "peak MB"):
        table.add_column(column.replace("_", " "), justify="left" if column == "method" else "right")
    for row in summary:
        table.add_row(row.method, f"{row.modality_dropout:g}", str(row.seeds),
                      f"{row.mean[metric]:.3f} ± {row.std[metric]:.3f}",
                      *[f"{row.mean[h]:.3f}" if h in row.mean else "" for h in hidden],
                      f"{int(row.mean['params']):,}", f"{row.mean['train_seconds']:.1f}",
                      f"{row.mean['peak_memory_mb']:.0f}")
    return table


@app.command()
@friendly_errors
def bench(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML (default: the demo preset).")]
    = None,
    methods: Annotated[str, typer.Option(help="'all' or comma-separated fusion names.")] = "all",
    seeds: Annotated[int, typer.Option(help="Seeds per method (config seed, +1, ...).")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("mmfuse-bench"),
    modality_dropout: Annotated[str | None, typer.Option(
        help="Comma-separated rates to compare, e.g. '0,0.3' (default: the config's).")] = None,
    unimodal: Annotated[bool, typer.Option(help="Also train each modality alone.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override the config.")] = None,
) -> None:
    """Train every fusion method (and each modality alone) on the same data and budget; tabulate."""
    from mmfuse.bench import resolve_methods, run_bench
    from mmfuse.config import load_config
    from mmfuse.presets import preset_path

    cfg = load_config(config or preset_path("demo"), list(set_ or []))
    names = resolve_methods(methods)
    try:
        rates = [float(r) for r in modality_dropout.split(",")] if modality_dropout else None
    except ValueError:
        raise MMFuseError(f"--modality-dropout '{modality_dropout}' must be comma-separated numbers") from None
    started = time.perf_counter()

    def report(run: Any, done: int, total: int) -> None:
        metric = next(iter(run.metrics))
        console.print(f"[{done}/{total}] {run.method} (dropout {run.modality_dropout:g}, seed {run.seed}): "
                      f"{metric} {run.metrics[metric]:.3f}, {run.train_seconds:.1f} s", highlight=False)

    runs = run_bench(cfg, names, seeds, out, dropouts=rates, unimodal=unimodal, on_run=report)
    console.print(_bench_table(runs))
    console.print(f"{time.perf_counter() - started:.0f} s. Results: {out}/runs.csv, summary.csv, summary.md, "
                  f"bench_*.png, config.yaml")


@app.command()
@friendly_errors
def embed(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved contrastive model folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Manifest whose rows to embed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors index.")],
    split: Annotated[str | None, typer.Option(help="Only rows whose 'split' column has this value.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 256,
    faiss: Annotated[bool, typer.Option(
        "--faiss", help="Also build an approximate HNSW index per modality (needs mmfuse[faiss]).")] = False,
) -> None:
    """Embed every sample's modalities with a contrastive model into one index file (for retrieve)."""
    from mmfuse.data.manifest import read_manifest
    from mmfuse.errors import DataError
    from mmfuse.model import MultimodalModel
    from mmfuse.tasks.contrastive import contrastive_task, embed_records

    started = time.perf_counter()
    loaded = MultimodalModel.from_pretrained(model)
    contrastive_task(loaded)
    used = {m: spec for m, spec in loaded.preprocessor.modalities.items() if m in loaded.modalities}
    records = read_manifest(data, used, target_column=None, split_column="split" if split else None)
    if split:
        records = [r for r in records if (r.split or "").lower() == split.lower()]
    if not records:
        raise DataError(f"{data}: no rows to embed" + (f" with split '{split}'" if split else ""))
    index = embed_records(loaded, records, batch_size=batch_size, model_name=str(model.resolve()))
    index.save(out)
    if faiss:
        from mmfuse.retrieval import write_faiss

        written = write_faiss(index, out)
        console.print(f"approximate indexes: {', '.join(p.name for p in written)}")
    counts = ", ".join(f"{m} {int(index.present[m].sum())}" for m in sorted(index.embeddings))
    console.print(f"embedded {len(records)} samples ({counts}) into [bold]{out}[/] "
                  f"in {time.perf_counter() - started:.1f} s")


@app.command()
@friendly_errors
def retrieve(
    model: Annotated[Path, typer.Option("--model", "-m", help="Saved contrastive model folder.")],
    index: Annotated[Path, typer.Option("--index", help="Index written by mmfuse embed.")],
    target: Annotated[str, typer.Option(help="Modality of the items to return (e.g. image, audio, text).")],
    query_text: Annotated[str | None, typer.Option(help="Query text.")] = None,
    query_image: Annotated[Path | None, typer.Option(help="Query image file.")] = None,
    query_audio: Annotated[Path | None, typer.Option(help="Query audio file.")] = None,
    query: Annotated[str | None, typer.Option(help="MODALITY=VALUE query for any modality.")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of items to return.")] = 5,
    approximate: Annotated[bool, typer.Option(
        help="Search the HNSW index built by embed --faiss instead of the exact blockwise top-k.")] = False,
) -> None:
    """Nearest items of --target modality to one query; prints JSON (id, score, the item's path/text)."""
    from mmfuse.errors import DataError
    from mmfuse.model import MultimodalModel
    from mmfuse.retrieval import EmbeddingIndex
    from mmfuse.tasks.contrastive import embed_query

    given = [(m, str(v)) for m, v in (("text", query_text), ("image", query_image), ("audio", query_audio))
             if v is not None]
    if query is not None:
        if "=" not in query:
            raise DataError(f"--query '{query}' must look like MODALITY=VALUE")
        given.append(tuple(query.split("=", 1)))  # type: ignore[arg-type]
    if len(given) != 1:
        raise DataError("give exactly one query: --query-text, --query-image, --query-audio or --query")
    if k <= 0:
        raise DataError(f"-k must be positive, got {k}")
    loaded = MultimodalModel.from_pretrained(model)
    found = EmbeddingIndex.load(index)
    modality, value = given[0]
    if modality not in loaded.modalities:
        raise DataError(f"this model has no '{modality}' modality; it embeds {', '.join(loaded.modalities)}")
    if target not in found.embeddings:
        raise DataError(f"--target '{target}' is not in the index; it holds {', '.join(sorted(found.embeddings))}")
    if loaded.preprocessor.kind(modality) not in ("text",):
        value = str(Path(value).expanduser().resolve())
    query_embedding = embed_query(loaded, modality, value)
    if approximate:
        from mmfuse.retrieval import search_faiss

        hits = search_faiss(found, index, query_embedding, target, k)
    else:
        hits = found.search(query_embedding, target, k)
    print(json.dumps({"query": {modality: value}, "target": target, "results": hits}, indent=2))


@app.command("list")
def list_components() -> None:
    """List registered encoders, fusion methods, tasks and presets."""
    from mmfuse import list_encoders, list_fusions, list_tasks
    from mmfuse.presets import preset_names

    for title, names in (("encoders", list_encoders()), ("fusion", list_fusions()), ("tasks", list_tasks()),
                         ("presets", preset_names())):
        console.print(f"[bold]{title}:[/] {', '.join(names)}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mmfuse")


if __name__ == "__main__":
    main()
