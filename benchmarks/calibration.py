"""Calibration before/after: expected calibration error per modality subset on the embedded data.

For each fusion method and modality-dropout rate, one model is trained (the demo preset) and then
calibrated three ways on its validation split (``trainer.calibration``: none, temperature,
per_subset; calibration is post-hoc, so the same weights serve all three). Every subset of
modalities is then shown on the test split, as ``mmfuse evaluate --robustness`` does, and the
accuracy, mean confidence of the predicted label and ECE are recorded.

    python benchmarks/calibration.py --out benchmarks/results/calibration-embedded-cpu.json

Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mmfuse.analysis.subsets import CachedRunner, enumerate_subsets, subset_name
from mmfuse.config import load_config
from mmfuse.config.presets import preset_path
from mmfuse.engine.calibration import calibrate
from mmfuse.engine.data import prepare_data
from mmfuse.engine.fit import fit
from mmfuse.tasks.classification import ClassificationTask

MODES = ("none", "temperature", "per_subset")


def subset_scores(runner: CachedRunner, task: ClassificationTask, modalities: list[str]) -> dict[str, dict]:
    scores = {}
    for present in [*enumerate_subsets(modalities), ()]:
        outputs = runner.outputs(present)
        metrics = task.metrics()
        metrics.update(*task.metric_inputs(outputs, runner.targets))
        values = {k: float(v) for k, v in metrics.compute().items()}
        confidence = float(outputs.softmax(-1).max(-1).values.mean())
        scores[subset_name(present) if present else "none"] = {
            "accuracy": values["accuracy"], "confidence": confidence, "ece": values["ece"]}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fusions", default="concat,late")
    parser.add_argument("--dropouts", default="0.0,0.3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        config = load_config(preset_path("demo"), [f"trainer.output_dir={work}/run", f"seed={args.seed}",
                                                   "trainer.progress_bar=false", "trainer.calibration=none"])
        data = prepare_data(config)
        for fusion in args.fusions.split(","):
            for dropout in (float(d) for d in args.dropouts.split(",")):
                run = config.model_copy(deep=True)
                run.fusion = run.fusion.model_copy(update={"name": fusion})
                run.trainer = run.trainer.model_copy(update={
                    "modality_dropout": dropout, "output_dir": Path(work) / f"{fusion}-{dropout}", "overwrite": True})
                model = fit(run, data, save=False).model
                assert isinstance(model.task, ClassificationTask)
                for mode in MODES:
                    calibrate(model, data.datasets["val"], mode)
                    runner = CachedRunner(model, [data.datasets["test"][i] for i in range(len(data.datasets["test"]))])
                    scores = subset_scores(runner, model.task, list(model.modalities))
                    rows.append({"fusion": fusion, "modality_dropout": dropout, "calibration": mode,
                                 "temperature": None if model.task.temperature is None
                                 else model.task.temperature.state(), "subsets": scores})
                    print(f"{fusion} dropout={dropout} {mode}: "
                          + ", ".join(f"{k} acc {v['accuracy']:.2f} conf {v['confidence']:.2f} ece {v['ece']:.3f}"
                                      for k, v in scores.items()), flush=True)
    result = {"command": "python benchmarks/calibration.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items()),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    subsets = list(rows[0]["subsets"])
    print("\n| fusion | dropout | calibration | " + " | ".join(f"{s} ECE (conf/acc)" for s in subsets) + " |")
    print("|---|---|---|" + "---|" * len(subsets))
    for r in rows:
        cells = [f"{v['ece']:.3f} ({v['confidence']:.2f}/{v['accuracy']:.2f})" for v in r["subsets"].values()]
        print(f"| {r['fusion']} | {r['modality_dropout']} | {r['calibration']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
