"""``mmfuse train``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mmfuse.cli.app import THREADS_HELP, app, console, err_console, friendly_errors, metrics_table
from mmfuse.cli.train_run import report_interrupt, train_on_ray
from mmfuse.core.errors import MMFuseError


@app.command()
@friendly_errors
def train(
    config_arg: Annotated[Path | None, typer.Argument(metavar="CONFIG", help="Experiment YAML.",
                                                      show_default=False)] = None,
    run_dir: Annotated[Path | None, typer.Argument(
        metavar="[RUN_DIR]", help="With --resume: the run folder to continue (default: --out / trainer.output_dir).",
        show_default=False)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML (same as CONFIG).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set trainer.max_epochs=5")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (trainer.output_dir).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a finished run in the output folder (trainer.overwrite).")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in RUN_DIR from its checkpoints/last.ckpt (same config).")] = False,
    pack: Annotated[str | None, typer.Option(
        "--pack", help="Read the data from this `mmfuse data pack` folder or URL (s3://, gs://, https://: shards "
        "cached locally, data.pack_cache_gb); the raw files are not needed (data.pack).")] = None,
    rebuild_pack: Annotated[bool, typer.Option(
        "--rebuild-pack", help="With --pack: pack the data first when the pack is missing or does not match.")] = False,
    check_sources: Annotated[bool, typer.Option(
        "--check-sources", help="With --pack: also check the pack against the manifests and raw files it was "
        "made from (data.check_sources).")] = False,
    ray_workers: Annotated[int | None, typer.Option(
        "--ray-workers", min=1, help="Run as this many DDP ranks on a Ray cluster (one actor per rank; the run "
        "folder and data must be reachable from every node, e.g. a pack URL).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="With --ray-workers: the cluster (host:port or auto); default: a new local one.")] = None,
    ray_gpus: Annotated[float, typer.Option("--ray-gpus-per-worker", min=0, help="With --ray-workers.")] = 0,
    ray_placement: Annotated[str, typer.Option(
        "--ray-placement", help="With --ray-workers: spread (ranks over nodes) or pack (fill a node first).",
    )] = "spread",
) -> None:
    """Train a model from a config; saves it to OUTPUT_DIR/model.

    Data paths written in the YAML are relative to its folder; paths given here, to the current one.
    A run stopped by SIGTERM or Ctrl-C saves a resumable checkpoint at the next step and exits 143 / 130;
    `mmfuse train CONFIG --resume [RUN_DIR]` continues it.
    """
    from mmfuse.config import load_config
    from mmfuse.engine.fit import train as run_training
    from mmfuse.engine.interrupts import SignalInterrupt

    if resume and config is not None and config_arg is not None and run_dir is None:
        config_arg, run_dir = None, config_arg  # mmfuse train -c CONFIG --resume RUN_DIR
    if run_dir is not None and not resume:
        raise MMFuseError(f"unexpected argument {run_dir}: a run folder goes after --resume; the output folder "
                          "of a new run is --out")
    if config_arg is not None and config is not None:
        raise MMFuseError("give the config once: as an argument or with -c/--config, not both")
    config_path = config_arg if config_arg is not None else config
    if config_path is None:
        raise MMFuseError("give the experiment config: mmfuse train CONFIG.yaml (or -c CONFIG.yaml)")
    if run_dir is not None and out is not None and run_dir != out:
        raise MMFuseError(f"--resume {run_dir} and --out {out} name different run folders: give one")
    out = run_dir if run_dir is not None else out
    overrides = list(set_ or []) + ([f"trainer.output_dir={json.dumps(str(out))}"] if out else [])  # quoted: --out 2024
    overrides += ["trainer.overwrite=true"] if overwrite else []
    overrides += [f"data.pack={json.dumps(str(pack))}"] if pack else []
    overrides += ["data.check_sources=true"] if check_sources else []
    cfg = load_config(config_path, overrides)
    if rebuild_pack:
        if cfg.data.pack is None:
            raise MMFuseError("--rebuild-pack needs a pack: --pack DIR or data.pack in the config")
        from mmfuse.engine.pack import ensure_pack

        ensure_pack(cfg, cfg.data.pack)
    if ray_workers is not None:
        args = [str(config_path), *[a for s in set_ or [] for a in ("--set", s)], *(["--pack", pack] if pack else []),
                *(["--check-sources"] if check_sources else []), *(["--overwrite"] if overwrite else []),
                "--out", str(cfg.trainer.output_dir), *(["--resume"] if resume else [])]
        train_on_ray(args, ray_workers, ray_address, ray_gpus, ray_placement)
        return
    resume_command = shlex.join(["mmfuse", "train", str(config_path), *[a for s in set_ or [] for a in ("--set", s)],
                                 *(["--pack", pack] if pack else []), *(["--check-sources"] if check_sources else []),
                                 "--resume", str(cfg.trainer.output_dir)])
    try:
        result = run_training(cfg, resume=resume)
    except (SignalInterrupt, KeyboardInterrupt) as stop:
        report_interrupt(stop, cfg.trainer.output_dir, resume_command)
    if not result.is_global_zero:  # the other ranks of a DDP run: rank 0 reports for all
        return
    console.print(metrics_table("validation", result.val_metrics))
    if result.test_metrics:
        console.print(metrics_table("test", result.test_metrics))
    for split, count in result.skipped.items():
        console.print(f"[yellow]skipped {count} bad sample(s) in {split}[/] (data.on_error=skip)")
    if result.skipped_file:
        console.print(f"skipped rows and reasons: [bold]{result.skipped_file}[/]")
    if result.nonfinite_summary:
        console.print(f"[yellow]{result.nonfinite_summary}[/]", highlight=False, soft_wrap=True)
    if result.chance_note:  # a run that ended at chance says so, and what to try (engine/stall.py)
        console.print(f"[yellow]{result.chance_note}[/]", highlight=False, soft_wrap=True)
    if result.contribution_note:  # a modality that adds next to nothing (engine/contribution.py)
        console.print(f"[yellow]{result.contribution_note}[/]", highlight=False, soft_wrap=True)
    resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
    console.print(f"model saved to [bold]{result.model_dir}[/] ({result.params:,} parameters, "
                  f"{result.train_seconds:.1f} s training{resumed})")


def _output_file(path: Path | None, option: str) -> Path | None:
    """Creates the folder of an output file and checks that it is writable, before any work is done:
    a mistyped or read-only folder must not cost a whole evaluation."""
    if path is None:
        return None
    if path.is_dir():
        raise MMFuseError(f"{option} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MMFuseError(f"{option} {path}: cannot create the folder {path.parent}: "
                          f"{exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise MMFuseError(f"{option} {path}: the folder {path.parent} is not writable")
    return path


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise MMFuseError(f"--on-error must be raise or skip, got '{on_error}'")


def _report_skipped(report: Any, out: Console) -> None:
    """How many rows --on-error skip left out, with the first reasons: nothing vanishes silently."""
    if report.count:
        out.print(f"[yellow]skipped {report.count} bad sample(s)[/]")
        for reason in report.skipped[:5]:
            out.print(f"  {reason}", highlight=False, soft_wrap=True)


def _load_dataset(model_dir: Path, manifest: Path, split: str | None, on_error: str, with_targets: bool,
                  label_column: str | None = None) -> Any:
    from mmfuse.core.errors import DataError
    from mmfuse.data.dataset import MultimodalDataset
    from mmfuse.data.manifest import read_manifest
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
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Manifest with targets.")] = None,
    split: Annotated[str | None, typer.Option(help="Only rows whose 'split' column has this value.")] = None,
    pack: Annotated[str | None, typer.Option(
        "--pack", help="Instead of --data: a pack folder or URL (s3://, gs://, https://, file://; read through "
        "fsspec) made with `mmfuse data pack`; reads its --split (default test).")] = None,
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
    threads: Annotated[int | None, typer.Option(
        min=1, help=THREADS_HELP)] = None,
    by: Annotated[str | None, typer.Option(
        "--by", help="Also metrics per value of this manifest column (e.g. speaker, source); rows without it "
        "form the group '(missing)'. In the table, the JSON and the robustness files.")] = None,
) -> None:
    """Evaluate a saved model on a manifest; --robustness adds missing-modality and noise studies."""
    from mmfuse.core.threads import thread_policy

    with thread_policy(threads, watch=False):
        if pack is not None:
            _evaluate_pack(model, pack, data, split, json_out, robustness, label_column, by)
            return
        if data is None:
            raise MMFuseError("give the data to evaluate on: --data MANIFEST or --pack PACK")
        _evaluate(model, data, split, on_error, json_out, robustness, out, label_column, seed, levels, corruptions,
                  by)


def _evaluate_pack(model: Path, pack: str, data: Path | None, split: str | None, json_out: Path | None,
                   robustness: bool, label_column: str | None, by: str | None) -> None:
    """``evaluate --pack``: the metrics of the model on a pack's split (see ``mmfuse.engine.pack_eval``)."""
    from mmfuse.core.atomic import write_text_atomic
    from mmfuse.engine.evaluate import evaluate as run_evaluation
    from mmfuse.engine.pack_eval import pack_split_for_model
    from mmfuse.model import MultimodalModel

    for given, option in ((data, "--data"), (robustness or None, "--robustness"), (label_column, "--label-column"),
                          (by, "--by")):
        if given is not None:
            raise MMFuseError(f"--pack evaluates preprocessed tensors; {option} needs the raw data (--data MANIFEST)")
    json_out = _output_file(json_out, "--json")
    loaded = MultimodalModel.from_pretrained(model)
    dataset = pack_split_for_model(loaded, pack, split or "test")
    metrics = run_evaluation(loaded, dataset)
    console.print(metrics_table(f"{pack} ({split or 'test'}): {len(dataset)} samples", metrics))
    _report_skipped(dataset.report, console)
    if json_out:
        write_text_atomic(json_out, json.dumps(metrics, indent=2))


def _evaluate(model: Path, data: Path, split: str | None, on_error: str, json_out: Path | None, robustness: bool,
              out: Path | None, label_column: str | None, seed: int, levels: int, corruptions: str | None,
              by: str | None = None) -> None:
    from mmfuse.core.atomic import write_text_atomic
    from mmfuse.engine.evaluate import evaluate as run_evaluation

    started = time.perf_counter()
    _check_on_error(on_error)
    json_out = _output_file(json_out, "--json")
    groups = None
    if by is not None:  # a wrong column fails before any work
        from mmfuse.analysis.groups import manifest_groups

        groups = manifest_groups(data, by)
    loaded, dataset = _load_dataset(model, data, split, on_error, with_targets=True, label_column=label_column)
    names = [c.strip() for c in corruptions.split(",") if c.strip()] if corruptions is not None else None
    if robustness:  # bad options fail before any work
        from mmfuse.analysis.robustness import noise_levels, plan_corruptions
        from mmfuse.tasks.base import HeadTask

        if not isinstance(loaded.task, HeadTask):
            raise MMFuseError(f"--robustness needs a classification / multi-label / regression model; this one "
                              f"was trained for task '{loaded.task.name}'")

        noise_levels(levels)
        plan_corruptions(loaded, names)
    metrics = run_evaluation(loaded, dataset)
    console.print(metrics_table(f"{data.name}: {len(dataset)} samples", metrics))
    _report_skipped(dataset.report, console)
    summary: dict[str, Any] = dict(metrics)
    if by is not None and groups is not None:
        from mmfuse.analysis.groups import evaluate_by_group, groups_json, groups_table

        by_group = evaluate_by_group(loaded, dataset, groups)
        console.print(groups_table(by, by_group))
        summary["groups"] = groups_json(by, by_group)
    if json_out:
        write_text_atomic(json_out, json.dumps(summary, indent=2))
    if robustness:
        from mmfuse.analysis.robustness import evaluation_records, report_tables, run_robustness

        folder = out or model.resolve().parent / "robustness"
        with console.status("robustness: missing modalities, importance, corruptions..."):
            records = evaluation_records(loaded, data, split)
            report = run_robustness(loaded, records, out=folder, seed=seed, levels=levels, corruptions=names,
                                    on_error="skip" if on_error == "skip" else "raise")
        for table in report_tables(report):
            console.print(table)
        if by is not None and groups is not None:
            from mmfuse.analysis.groups import group_robustness_table, robustness_by_group, write_group_robustness

            per_group = robustness_by_group(loaded, records, groups, on_error="skip" if on_error == "skip" else "raise")
            console.print(group_robustness_table(by, per_group))
            report.files.update(write_group_robustness(per_group, by, folder))
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
    on_error: Annotated[str, typer.Option(help="--data: raise | skip bad samples (counted and reported)")] = "raise",
    impute: Annotated[str | None, typer.Option(
        help="Autoencoder models: the modality to impute from the others (hidden from the model).")] = None,
    beam: Annotated[int | None, typer.Option(help="Captioning models: beam size (1 = greedy).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help=THREADS_HELP)] = None,
) -> None:
    """Predict from any subset of the trained modalities; prints JSON."""
    from mmfuse.core.threads import thread_policy

    with thread_policy(threads, watch=False):
        _predict(model, text, image, audio, input_, data, out, impute, beam, on_error)


def _predict(model: Path, text: str | None, image: Path | None, audio: Path | None, input_: list[str] | None,
             data: Path | None, out: Path | None, impute: str | None, beam: int | None, on_error: str) -> None:
    from mmfuse.core.atomic import write_text_atomic
    from mmfuse.core.errors import DataError
    from mmfuse.data.dataset import Collator, build_sample
    from mmfuse.data.manifest import Record
    from mmfuse.engine.evaluate import predict as predict_dataset
    from mmfuse.model import MultimodalModel

    if data is not None:
        _check_on_error(on_error)
        out = _output_file(out, "-o")
        loaded, dataset = _load_dataset(model, data, None, on_error, with_targets=False)
        _prediction_options(loaded, impute, beam)
        lines = [json.dumps(p) for p in predict_dataset(loaded, dataset)]
        if out:
            write_text_atomic(out, "\n".join(lines) + "\n")
            console.print(f"wrote {len(lines)} predictions to {out}")
        else:
            print("\n".join(lines))
        _report_skipped(dataset.report, err_console)  # stderr: stdout holds the predictions
        return
    if out is not None:
        raise MMFuseError("-o/--out writes the predictions of --data; without --data the prediction is printed")
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
