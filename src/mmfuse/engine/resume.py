"""What ``--resume`` continues from, checked before any work is done.

A resume must continue the same run: a checkpoint trained with another learning rate, seed or data
would load (the shapes match) and silently give a model that belongs to neither config. So the
config saved in the checkpoint is compared with the one given, and only settings that cannot change
the result may differ (threads, output, logging, checkpoint frequency, cache folders), plus
``on_nonfinite`` (switching to ``skip`` is how a run stopped by a NaN continues) and ``max_epochs``
to train longer, unless a cosine schedule was fitted to the old length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from mmfuse.config import ExperimentConfig
from mmfuse.core.errors import ConfigError
from mmfuse.engine.checkpoint_io import read_checkpoint
from mmfuse.engine.last_checkpoint import LastCheckpoint

MAY_DIFFER = {"trainer.threads", "trainer.progress_bar", "trainer.verbose", "trainer.output_dir", "trainer.overwrite",
              "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.on_nonfinite",
              "data.num_workers", "data.cache_dir", "data.in_memory_cache"}


def last_checkpoint(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints" / "last.ckpt"


def config_json(config: ExperimentConfig) -> str:
    """The config as the checkpoint stores it."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_differences(saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """'key: saved -> given' for every setting that differs and may not (keys only one side knows,
    from another mmfuse version, are left out)."""
    given = _flatten(json.loads(config_json(config)))
    before = _flatten(saved)
    may_differ = set(MAY_DIFFER)
    if config.optim.scheduler == "none":
        may_differ.add("trainer.max_epochs")
    return [f"{key}: {json.dumps(before[key])} -> {json.dumps(given[key])}" for key in sorted(before.keys() & given)
            if before[key] != given[key] and key not in may_differ]


def checkpoint_position(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """(epoch, global step) a checkpoint was written at."""
    return int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))


def resume_point(config: ExperimentConfig) -> Path:
    """``OUTPUT_DIR/checkpoints/last.ckpt``, once it is known to exist, load and match ``config``."""
    path = last_checkpoint(Path(config.trainer.output_dir))
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist (a run writes it at the end of every "
                          "epoch, and every trainer.checkpoint_every_n_steps steps when that is set)")
    try:
        checkpoint = read_checkpoint(path)
    except Exception as exc:  # truncated, not a checkpoint, or holding objects weights_only refuses
        raise ConfigError(f"cannot resume from {path}: the file cannot be read as a checkpoint ({exc})") from None
    state = checkpoint.get("callbacks", {}).get(LastCheckpoint.__qualname__)
    if not isinstance(state, dict) or "config" not in state:
        raise ConfigError(f"cannot resume from {path}: it was not written by mmfuse train")
    differences = config_differences(json.loads(state["config"]), config)
    if differences:
        raise ConfigError(f"cannot resume from {path}: the config differs from the run's in "
                          f"{'; '.join(differences)}; resume with the config the run was started with")
    return path


def keep_earlier_logs(output_dir: Path, checkpoint: Path) -> Path | None:
    """Renames ``logs/metrics.csv`` to ``logs/metrics-before-step-S.csv`` (S: the checkpoint's step).

    Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts, which would throw away
    the history of the run being resumed. Its rows from step S on were logged again by the resumed run.
    """
    metrics = Path(output_dir) / "logs" / "metrics.csv"
    if not metrics.is_file():
        return None
    _, step = checkpoint_position(read_checkpoint(checkpoint))
    kept, n = metrics.with_name(f"metrics-before-step-{step}.csv"), 1
    while kept.exists():  # resumed from this checkpoint before: that file holds older rows, keep it too
        n += 1
        kept = metrics.with_name(f"metrics-before-step-{step}-{n}.csv")
    metrics.replace(kept)
    return kept


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saved state follows the run folder when it was moved or copied.

    Lightning restores the best score only when the checkpoint folder's absolute path is unchanged;
    otherwise it warns and keeps the old ``best_model_path`` alone, so a run resumed in a moved folder
    would take its next epoch as the best one whatever the earlier epochs scored, and could load the
    best weights from the old place. Paths inside the old folder are mapped into the new one first.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if isinstance(old, str) and isinstance(new, str) and old != new:

            def moved(path: Any) -> Any:
                inside = isinstance(path, str) and Path(path).is_relative_to(old)
                return str(Path(new) / Path(path).relative_to(old)) if inside else path

            state_dict = {**state_dict, "dirpath": new,
                          **{key: moved(state_dict.get(key)) for key in
                             ("best_model_path", "kth_best_model_path", "last_model_path") if key in state_dict},
                          "best_k_models": {moved(p): v for p, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)
