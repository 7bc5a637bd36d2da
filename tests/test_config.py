"""The experiment config: shipped configs and presets load; bad input gives errors naming the key."""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfuse.config import ExperimentConfig, FusionConfig, TaskConfig, load_config, validate_config
from mmfuse.config.presets import preset_names, preset_path
from mmfuse.core.errors import ConfigError, MMFuseError
from mmfuse.core.registry import Registry
from mmfuse.encoders import ENCODERS
from mmfuse.fusion import FUSIONS
from mmfuse.tasks import TASKS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))

BASE: dict[str, Any] = {
    "data": {"synthetic": {"n_samples": 40}},
    "encoders": {
        "text": {"name": "text_gru", "dim": 8},
        "image": {"name": "image_cnn", "dim": 8, "channels": [4]},
    },
    "fusion": {"name": "concat", "out_dim": 16},
    "trainer": {"max_epochs": 2},
}


def raw(**changes: Any) -> dict[str, Any]:
    """A deep copy of BASE with top-level sections replaced."""
    config = copy.deepcopy(BASE)
    config.update(copy.deepcopy(changes))
    return config


def no_fusion(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without its fusion section (a contrastive task refuses one)."""
    return {key: value for key, value in data.items() if key != "fusion"}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# ---- shipped configs and presets -------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.modalities == sorted(config.encoders)
    assert set(config.data.modalities) == set(config.encoders)
    assert config.fusion.name in FUSIONS and config.task.name in TASKS
    for enc in config.encoders.values():
        assert enc.name in ENCODERS


def test_configs_folder_is_not_empty() -> None:
    assert len(CONFIG_FILES) >= 4, f"expected example configs under {CONFIG_DIR}"


SYNTHETIC_CONFIGS = [p for p in CONFIG_FILES if p.name.startswith("synthetic")]


@pytest.mark.parametrize("path", SYNTHETIC_CONFIGS, ids=[p.name for p in SYNTHETIC_CONFIGS])
def test_shipped_synthetic_config_trains_one_epoch(path: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading is not enough: each example must also run end to end (tiny data, one epoch)."""
    from mmfuse.engine.fit import train

    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    config = load_config(path, ["data.synthetic.n_samples=80", "trainer.max_epochs=1", "trainer.progress_bar=false",
                                f"trainer.output_dir={tmp_path / 'run'}"])
    result = train(config)
    assert result.test_metrics, "no test metrics"
    for name, value in result.test_metrics.items():  # NaN, +inf and -inf all fail isfinite
        assert math.isfinite(value), f"{path.name}: test {name} = {value}"
        assert name not in ("loss", "mae", "rmse") or value >= 0.0, f"{path.name}: test {name} = {value} < 0"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads(name: str) -> None:
    config = load_config(preset_path(name))
    assert config.encoders and config.fusion.name in FUSIONS


def test_presets_exist_and_unknown_preset_is_a_clear_error() -> None:
    assert "demo" in preset_names()
    with pytest.raises(ConfigError, match=r"unknown preset 'dmeo'.*did you mean 'demo'.*valid presets: "):
        preset_path("dmeo")


def test_config_file_not_found_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"mapping"):
        load_config(listing)


# ---- unknown keys, wrong types ---------------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_suggests() -> None:
    message = error_of(raw(trainr={"max_epochs": 3}))
    assert "'trainr'" in message and "did you mean 'trainer'" in message


def test_unknown_nested_key_names_it_and_suggests() -> None:
    data = raw()
    data["trainer"]["max_epoch"] = 3
    message = error_of(data)
    assert "trainer" in message and "'max_epoch'" in message and "did you mean 'max_epochs'" in message
    data = raw()
    data["data"]["audio"] = {"n_mel": 20}
    message = error_of(data)
    assert "data.audio" in message and "'n_mel'" in message and "'n_mels'" in message


def test_unknown_key_without_close_match_still_names_it() -> None:
    message = error_of(raw(zzzzzz=1))
    assert "'zzzzzz'" in message and "did you mean" not in message


def test_wrong_type_names_the_key() -> None:
    data = raw()
    data["trainer"]["max_epochs"] = "many"
    message = error_of(data)
    assert "trainer.max_epochs" in message
    data = raw()
    data["data"]["batch_size"] = 0
    assert "data.batch_size" in error_of(data)
    data = raw()
    data["data"]["image"] = {"mode": "cmyk"}
    assert "data.image.mode" in error_of(data)


INF, NAN = float("inf"), float("nan")
# Known gaps, kept visible: pydantic accepts +-inf for a float field with only a lower bound (lr,
# weight_decay, ...), and registry options carry no bounds at all. strict=True makes the test fail
# once the schema rejects them (StrictModel / validate_options with allow_inf_nan=False), so the
# marker is dropped then.

# (section path, key, bad value); the error must name "section.key" and be one line.
INVALID_VALUES = [
    *[("optim", "lr", v) for v in (NAN, -INF, -1e-3, 0.0, "fast", [0.1], {"value": 0.1})],
    pytest.param("optim", "lr", INF, id="optim.lr-inf"),
    *[("optim", "weight_decay", v) for v in (NAN, -INF, -0.01, "none")],
    pytest.param("optim", "weight_decay", INF, id="optim.weight_decay-inf"),
    *[("optim", "gradient_clip", v) for v in (NAN, -INF, -1.0, 0.0)],
    pytest.param("optim", "gradient_clip", INF, id="optim.gradient_clip-inf"),
    *[("trainer", "max_epochs", v) for v in (NAN, INF, -INF, -1, 0, 2.5, "many", [3])],
    *[("trainer", "patience", v) for v in (INF, -2, 0, "soon")],
    *[("trainer", "modality_dropout", v) for v in (NAN, INF, -INF, -0.1, 1.0, "half")],
    *[("trainer", "unimodal_loss_weight", v) for v in (NAN, -INF, -1.0)],
    pytest.param("trainer", "unimodal_loss_weight", INF, id="trainer.unimodal_loss_weight-inf"),
    *[("data", "batch_size", v) for v in (NAN, INF, -8, 0, "big")],
    *[("data", "val_fraction", v) for v in (NAN, INF, -INF, -0.1, 1.0)],
    *[("data.audio", "f_min", v) for v in (NAN, -INF, -1.0)],
    *[("data.audio", "max_seconds", v) for v in (NAN, -INF, -1.0, 0.0)],
    pytest.param("data.audio", "max_seconds", INF, id="data.audio.max_seconds-inf"),
    *[("data.audio", "normalize_dbfs", v) for v in (NAN, INF, 3.0)],
    pytest.param("data.audio", "normalize_dbfs", -INF, id="data.audio.normalize_dbfs--inf"),
    *[("task", "head_dropout", v) for v in (NAN, INF, -INF, -0.1, 1.0)],
    *[("task", "head_hidden", v) for v in (NAN, INF, -1, "wide")],
    *[("fusion", "out_dim", v) for v in (NAN, INF, -INF, -1, 0, "x")],
    *[("fusion", "hidden", v) for v in (NAN, INF, -INF, "wide", [64])],  # a registry option of concat
    pytest.param("fusion", "dropout", INF, id="fusion.dropout-inf"),
]


@pytest.mark.parametrize(("section", "key", "value"), INVALID_VALUES)
def test_invalid_value_is_rejected_and_names_the_key(section: str, key: str, value: Any) -> None:
    data = raw(task={"name": "classification"})
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    message = error_of(data)
    assert f"{section}.{key}" in message, message


def test_unknown_fusion_lists_valid_choices() -> None:
    message = error_of(raw(fusion={"name": "concatt"}))
    assert "'concatt'" in message and "did you mean 'concat'" in message
    assert "valid choices: " + ", ".join(FUSIONS.names()) in message


def test_unknown_encoder_and_task_list_valid_choices() -> None:
    data = raw()
    data["encoders"]["text"]["name"] = "text_lstm"
    assert "valid choices: " + ", ".join(ENCODERS.names()) in error_of(data)
    assert "valid choices: " + ", ".join(TASKS.names()) in error_of(raw(task={"name": "ranking"}))


def test_unknown_encoder_option_names_it_and_lists_valid_options() -> None:
    data = raw()
    data["encoders"]["text"]["dimm"] = 8
    message = error_of(data)
    assert "'encoders.text.dimm'" in message and "text_gru" in message
    assert "did you mean 'dim'" in message
    assert "valid options: dim, dropout, layers" in message
    message = error_of(raw(fusion={"name": "late", "proj_dim": 3}))
    assert "'fusion.proj_dim'" in message and "valid options: " in message and "hidden" in message


# ---- common options (task.head_*, fusion.out_dim): only for the components that take them ----------


@pytest.mark.parametrize("task", ["contrastive", "autoencoder", "captioning"])
def test_a_head_option_the_task_does_not_take_is_an_error(task: str) -> None:
    valid = ", ".join(sorted(p for p in inspect.signature(TASKS.get(task)).parameters))
    for key, value in (("head_hidden", 64), ("head_dropout", 0.3)):
        message = error_of(raw(task={"name": task, key: value}))
        assert f"option 'task.{key}' does not apply to task '{task}'" in message, message
        assert message.endswith(f"valid options: {valid}"), message
        assert "head_" not in message.split("valid options:")[1]


def test_a_head_option_set_to_its_default_or_by_override_is_still_an_error(tmp_path: Path) -> None:
    """Setting it is what counts (``model_fields_set``), not its value; ``--set`` sets it too."""
    assert "option 'task.head_hidden' does not apply to task 'contrastive'" in error_of(
        raw(task={"name": "contrastive", "head_hidden": 0}))
    path = write_yaml(tmp_path / "exp.yaml", raw(task={"name": "classification", "head_hidden": 32}))
    assert load_config(path).task.head_hidden == 32
    with pytest.raises(ConfigError, match=r"option 'task.head_hidden' does not apply to task 'contrastive'.*"
                                          r"valid options: dim, hidden, learn_temperature"):
        load_config(path, ["task.name=contrastive"])
    with pytest.raises(ConfigError, match=r"option 'task.head_dropout' does not apply to task 'captioning'"):
        load_config(write_yaml(tmp_path / "cap.yaml", raw(task={"name": "captioning"})), ["task.head_dropout=0.2"])


def test_unset_head_options_are_harmless_and_dumps_leave_out_what_the_task_does_not_take() -> None:
    config = validate_config(no_fusion(raw(task={"name": "contrastive", "dim": 8})))
    dumped = config.model_dump(mode="json")
    assert dumped["task"] == {"name": "contrastive", "dim": 8}
    assert validate_config(dumped).task.model_dump() == {"name": "contrastive", "dim": 8}  # a saved config reloads
    classification = validate_config(raw(task={"name": "classification"})).model_dump(mode="json")["task"]
    assert classification == {"name": "classification", "head_hidden": 0, "head_dropout": 0.1}  # as before
    assert validate_config(raw(task=classification)).task.head_hidden == 0


def test_unknown_task_option_lists_every_valid_key_of_the_task() -> None:
    message = error_of(raw(task={"name": "classification", "head_hiden": 64}))
    assert "unknown option 'task.head_hiden' for task 'classification' (did you mean 'head_hidden'?)" in message
    assert message.endswith("valid options: head_dropout, head_hidden, label_smoothing, labels"), message
    message = error_of(raw(task={"name": "regression", "label_smoothing": 0.1}))
    assert message.endswith("valid options: head_dropout, head_hidden, num_targets, standardize"), message
    message = error_of(raw(task={"name": "contrastive", "dimm": 8}))
    assert "did you mean 'dim'" in message and "head_" not in message


def test_unknown_fusion_option_lists_out_dim_too() -> None:
    message = error_of(raw(fusion={"name": "weighted", "proj_dimm": 3}))
    assert "unknown option 'fusion.proj_dimm' for fusion 'weighted' (did you mean 'proj_dim'?)" in message
    assert message.endswith("valid options: dropout, hidden, out_dim, proj_dim"), message
    message = error_of(raw(fusion={"name": "late", "proj_dim": 3}))
    assert "unknown option 'fusion.proj_dim' for fusion 'late'" in message
    assert message.endswith("valid options: dropout, hidden"), message  # late takes no out_dim


def test_late_fusion_refuses_out_dim_its_width_is_the_tasks(tmp_path: Path) -> None:
    """late's heads output the task's number of outputs, so a config's ``fusion.out_dim`` would be ignored."""
    expected = ("option 'fusion.out_dim' does not apply to fusion 'late' (its width is the task's number of "
                "outputs): remove it; valid options: dropout, hidden")
    assert error_of(raw(fusion={"name": "late", "out_dim": 16})) == expected
    assert error_of(raw(fusion={"name": "late", "out_dim": 128})) == expected  # the default, set, is a setting
    path = write_yaml(tmp_path / "exp.yaml", raw())  # BASE sets out_dim: 16 for concat
    with pytest.raises(ConfigError) as info:
        load_config(path, ["fusion.name=late"])
    assert str(info.value) == expected
    config = validate_config(raw(fusion={"name": "late", "hidden": 8}))
    assert config.fusion.model_dump() == {"name": "late", "hidden": 8}  # a dump leaves out_dim out ...
    assert validate_config(config.model_dump(mode="json")).fusion.options == {"hidden": 8}  # ... and reloads
    assert FUSIONS.common_options("late") == ()
    assert all(FUSIONS.common_options(name) == ("out_dim",) for name in FUSIONS.names() if name != "late")


@pytest.mark.parametrize("path", [*CONFIG_FILES, preset_path("demo")], ids=lambda p: p.name)
def test_switching_a_shipped_config_to_late_fusion(path: Path) -> None:
    """The README's ``--set fusion.name=late`` works on a config that leaves out_dim at its default (the
    shipped ones set it only where it differs) and does not size the task's head; where it sets either,
    the switch is an error naming it."""
    config = load_config(path)
    if config.task.name == "contrastive" or not set(config.fusion.options) <= set(FUSIONS.option_names("late")):
        return  # no fusion at all, or options of another method (avmnist-arith's proj_dim)
    if "out_dim" in config.fusion.model_fields_set:
        assert config.fusion.out_dim != FusionConfig().out_dim, "a default out_dim needs no line"
        with pytest.raises(ConfigError, match=r"^option 'fusion.out_dim' does not apply to fusion 'late'"):
            load_config(path, ["fusion.name=late"])
    elif config.task.set_common():  # synthetic-cached: head_hidden 128
        with pytest.raises(ConfigError, match=r"^option 'task.head_\w+' does not apply with fusion 'late'"):
            load_config(path, ["fusion.name=late"])
    else:
        assert load_config(path, ["fusion.name=late"]).fusion.name == "late"


def test_a_fusion_that_does_not_take_out_dim_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fusion registered with ``common=()`` (its width is not the config's to choose)."""
    registry: Registry[Any] = Registry("fusion", reserved=("dims", "out_dim"), common=("out_dim",))

    @registry.register("concat")
    @registry.register("fixed_width", common=())
    def fusion(dims: dict[str, int], out_dim: int, hidden: int = 4) -> None: ...

    monkeypatch.setattr(FusionConfig, "registry", registry)
    message = error_of(raw(fusion={"name": "fixed_width", "out_dim": 16}))
    assert message == ("option 'fusion.out_dim' does not apply to fusion 'fixed_width' (other fusions take it): "
                       "remove it; valid options: hidden"), message
    assert "valid options: hidden\n" not in message
    assert error_of(raw(fusion={"name": "fixed_width", "hiden": 2})).endswith("valid options: hidden")
    config = validate_config(raw(fusion={"name": "fixed_width", "hidden": 2}))
    assert config.fusion.model_dump() == {"name": "fixed_width", "hidden": 2}
    assert validate_config(raw(fusion={"name": "concat", "out_dim": 16})).fusion.out_dim == 16


def test_every_common_option_is_a_schema_field() -> None:
    assert set(TASKS.common) == set(TaskConfig.model_fields) - {"name"}
    assert set(FUSIONS.common) == set(FusionConfig.model_fields) - {"name"}
    for name in TASKS.names():
        assert set(TASKS.common_options(name)) <= set(TASKS.common)
    assert TASKS.common_options("classification") == ("head_hidden", "head_dropout")
    assert TASKS.common_options("contrastive") == ()
    with pytest.raises(ValueError, match="'head_width' is not a common option of tasks"):
        Registry("task", common=("head_hidden",)).register("x", common=("head_width",))


def test_head_options_with_late_fusion_are_an_error(tmp_path: Path) -> None:
    """late's per-modality heads output the task's predictions: no MLP head follows for task.head_* to size."""
    message = error_of(raw(fusion={"name": "late"}, task={"name": "classification", "head_hidden": 64}))
    assert message == ("option 'task.head_hidden' does not apply with fusion 'late' (it outputs the task's "
                       "predictions itself, so no MLP head follows it; its own options: fusion.dropout, "
                       "fusion.hidden): remove it, or choose a feature-level fusion such as concat; valid options: "
                       "label_smoothing, labels"), message
    message = error_of(raw(fusion={"name": "late"}, task={"name": "regression", "head_dropout": 0.1}))  # the default
    assert message.startswith("option 'task.head_dropout' does not apply with fusion 'late'"), message
    assert message.endswith("valid options: num_targets, standardize"), message
    # --set fusion.name=late on a config that sizes its head (avmnist-arith sets head_hidden: 128).
    path = write_yaml(tmp_path / "exp.yaml", raw(fusion={"name": "concat"},
                                                 task={"name": "classification", "head_hidden": 32}))
    assert load_config(path).task.head_hidden == 32
    with pytest.raises(ConfigError, match=r"^option 'task.head_hidden' does not apply with fusion 'late'"):
        load_config(path, ["fusion.name=late"])
    # Left unset they are harmless, a dump leaves them out, and the dump loads back.
    config = validate_config(raw(fusion={"name": "late", "hidden": 8}, task={"name": "classification"}))
    dumped = config.model_dump(mode="json")
    assert dumped["task"] == {"name": "classification"} and dumped["fusion"] == {"name": "late", "hidden": 8}
    assert validate_config(dumped).model_dump(mode="json") == dumped
    assert validate_config(raw()).model_dump(mode="json")["task"] == {"name": "classification", "head_hidden": 0,
                                                                      "head_dropout": 0.1}


# ---- a task that builds no fusion (contrastive) refuses a fusion section ---------------------------


def test_a_fusion_section_for_a_task_that_builds_no_fusion_is_an_error(tmp_path: Path) -> None:
    """contrastive projects each modality itself: a fusion section would configure nothing."""
    task = {"name": "contrastive", "dim": 8}
    assert error_of(raw(fusion={"name": "concat"}, task=task)) == (
        "section 'fusion' does not apply to task 'contrastive' (it builds no fusion: it projects each modality "
        "itself): remove it (it sets fusion.name)")
    message = error_of(raw(fusion={"name": "lmf", "out_dim": 16, "rank": 2}, task=task))
    assert message.endswith("remove it (it sets fusion.name, fusion.out_dim, fusion.rank)"), message
    assert "(it sets fusion.hidden)" in error_of(raw(fusion={"hidden": 4}, task=task))
    # An empty section sets nothing; without one the default fusion is no setting either.
    assert validate_config(raw(fusion={}, task=task)).task.name == "contrastive"
    config = validate_config(no_fusion(raw(task=task)))
    # --set counts as setting it, both ways round.
    path = write_yaml(tmp_path / "contrastive.yaml", no_fusion(raw(task=task)))
    with pytest.raises(ConfigError, match=r"^section 'fusion' does not apply to task 'contrastive' .*"
                                          r"\(it sets fusion.name\)$"):
        load_config(path, ["fusion.name=attention"])
    with pytest.raises(ConfigError, match=r"^section 'fusion' does not apply to task 'contrastive' .*"
                                          r"\(it sets fusion.name, fusion.out_dim\)$"):
        load_config(write_yaml(tmp_path / "exp.yaml", raw()), ["task.name=contrastive"])
    # A dump leaves the section out, so a saved config loads back.
    dumped = config.model_dump(mode="json")
    assert "fusion" not in dumped
    assert validate_config(dumped).model_dump(mode="json") == dumped
    assert "fusion" in validate_config(raw()).model_dump(mode="json")


def test_which_tasks_build_a_fusion_the_registry_and_the_task_classes_agree() -> None:
    for name in TASKS.names():
        assert TASKS.trait(name, "uses_fusion") == TASKS.create(name).uses_fusion, name
    assert not TASKS.trait("contrastive", "uses_fusion") and TASKS.trait("classification", "uses_fusion")
    registry: Registry[Any] = Registry("task", traits={"uses_fusion": True})
    with pytest.raises(ValueError, match="'fuses' is not a trait of tasks \\(uses_fusion\\)"):
        registry.register("x", fuses=False)
    with pytest.raises(KeyError, match="'fuses' is not a trait of tasks"):
        TASKS.trait("contrastive", "fuses")


def test_wrong_option_type_names_the_option() -> None:
    data = raw()
    data["encoders"]["image"]["dim"] = "wide"
    message = error_of(data)
    assert "encoders.image.dim" in message and "image_cnn" in message
    message = error_of(raw(task={"name": "classification", "label_smoothing": "lots"}))
    assert "task.label_smoothing" in message


def test_options_are_coerced_to_their_types() -> None:
    config = validate_config(raw())
    assert config.encoders["image"].name == "image_cnn"
    assert config.encoders["image"].options == {"dim": 8, "channels": (4,)}
    # The validated values are what the factories get: dim "16" becomes 16, hidden 64.0 becomes 64.
    data = raw(fusion={"name": "concat", "hidden": 64.0, "out_dim": 16})
    data["encoders"]["text"]["dim"] = "16"
    config = validate_config(data)
    assert config.encoders["text"].options["dim"] == 16 and isinstance(config.encoders["text"].options["dim"], int)
    assert config.fusion.options["hidden"] == 64 and isinstance(config.fusion.options["hidden"], int)
    FUSIONS.create("concat", dims={"a": 3}, out_dim=4, **config.fusion.options)
    # ... and the config still serialises to plain JSON/YAML types.
    assert config.model_dump(mode="json")["encoders"]["image"]["channels"] == [4]
    coerced = ENCODERS.validate_options("image_cnn", {"channels": [4, 8], "dim": "16"}, where="encoders.image")
    assert coerced == {"channels": (4, 8), "dim": 16}


# ---- overrides and paths ---------------------------------------------------------------------------


def test_set_overrides_are_typed(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "exp.yaml", raw(fusion={"name": "concat"}))  # late takes no out_dim
    config = load_config(path, ["trainer.max_epochs=3", "fusion.name=late", "optim.lr=0.05",
                                "trainer.patience=null", "data.text.lowercase=false", "fusion.hidden=7"])
    assert config.trainer.max_epochs == 3 and isinstance(config.trainer.max_epochs, int)
    assert config.fusion.name == "late" and config.fusion.options["hidden"] == 7
    assert config.optim.lr == 0.05
    assert config.trainer.patience is None
    assert config.data.text.lowercase is False
    # New sections are created by an override.
    assert load_config(path, ["task.head_hidden=5"]).task.head_hidden == 5
    with pytest.raises(ConfigError, match=r"key.path=value"):
        load_config(path, ["trainer.max_epochs"])
    with pytest.raises(ConfigError, match=r"trainer.max_epochs"):
        load_config(path, ["trainer.max_epochs=many"])
    with pytest.raises(ConfigError, match=r"'max_epochs' is not a section"):
        load_config(path, ["trainer.max_epochs.x=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'max_epochs'"):
        load_config(path, ["trainer.max_epoch=3"])


def test_relative_data_paths_resolve_against_the_yaml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    data = raw(data={"train": "../data/train.jsonl", "val": "val.jsonl", "test": str(tmp_path / "abs.jsonl")})
    write_yaml(folder / "exp.yaml", data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "project" / "configs" / "exp.yaml")
    assert config.data.train == (tmp_path / "project" / "data" / "train.jsonl").resolve()
    assert config.data.val == (folder / "val.jsonl").resolve()
    assert config.data.test == tmp_path / "abs.jsonl"
    single = write_yaml(folder / "manifest.yaml", raw(data={"manifest": "m.csv"}))
    assert load_config(single).data.manifest == (folder / "m.csv").resolve()


def test_command_line_paths_resolve_against_the_working_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule: data files written in the YAML are relative to the YAML; everything else (any --set
    path, and the folders a run writes) is relative to where mmfuse runs."""
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    path = write_yaml(folder / "exp.yaml", raw(data={"manifest": "data/m.jsonl"},
                                               trainer={"output_dir": "runs/yaml-run"}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = load_config(path)
    assert config.data.manifest == folder / "data" / "m.jsonl"
    assert config.trainer.output_dir.resolve() == cwd / "runs" / "yaml-run"
    config = load_config(path, ["data.manifest=mine/m.jsonl", "trainer.output_dir=out/run",
                                f"data.test={tmp_path / 'abs.jsonl'}"])
    assert config.data.manifest == cwd / "mine" / "m.jsonl"
    assert config.trainer.output_dir.resolve() == cwd / "out" / "run"
    assert config.data.test == tmp_path / "abs.jsonl"
    split = load_config(write_yaml(folder / "split.yaml", raw(data={"train": "t.jsonl", "val": "v.jsonl"})),
                        ["data.val=../v2.jsonl"])
    assert (split.data.train, split.data.val) == (folder / "t.jsonl", tmp_path / "v2.jsonl")


# ---- data sources and modalities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [{}, {"manifest": "m.jsonl", "synthetic": {}}, {"train": "t.jsonl", "manifest": "m.jsonl"},
     {"val": "v.jsonl"}],
    ids=["none", "manifest+synthetic", "train+manifest", "val-only"],
)
def test_exactly_one_data_source(source: dict[str, Any]) -> None:
    message = error_of(raw(data=source))
    assert "exactly one of 'manifest'" in message and "'synthetic'" in message


def test_unknown_modality_name_needs_a_data_modalities_entry() -> None:
    data = raw()
    data["encoders"]["speech"] = {"name": "audio_cnn"}
    message = error_of(data)
    assert "modality 'speech' needs an entry in data.modalities" in message


def test_data_modality_without_encoder_is_an_error() -> None:
    data = raw()
    data["data"]["modalities"] = {"audio": {"kind": "audio", "column": "wav"}}
    assert "data.modalities.audio has no encoder" in error_of(data)


def test_custom_modality_names() -> None:
    data = raw(
        data={
            "train": "/tmp/train.jsonl",
            "modalities": {"title": {"kind": "text", "column": "headline"}, "body": {"kind": "text", "column": "body"},
                           "speech": {"kind": "audio", "column": "wav"}},
        },
        encoders={"title": {"name": "text_gru", "dim": 8}, "body": {"name": "text_transformer", "dim": 8,
                                                                     "heads": 2},
                  "speech": {"name": "audio_cnn"}},
    )
    config = validate_config(data)
    assert config.modalities == ["body", "speech", "title"]
    assert config.data.modalities["title"].kind == "text" and config.data.modalities["title"].column == "headline"
    assert config.data.modalities["speech"].kind == "audio"
    # A bad modality kind names the key.
    data["data"]["modalities"]["title"]["kind"] = "hologram"
    assert "data.modalities.title.kind" in error_of(data)


def test_builtin_modality_names_get_default_specs() -> None:
    config = validate_config(raw())
    assert {m: (s.kind, s.column) for m, s in config.data.modalities.items()} == {
        "image": ("image", "image"), "text": ("text", "text")
    }


def test_empty_encoders_is_an_error() -> None:
    assert "at least one modality" in error_of(raw(encoders={}))


def test_config_errors_are_mmfuse_errors() -> None:
    assert issubclass(ConfigError, MMFuseError)
