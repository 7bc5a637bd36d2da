"""Tasks: fitting label names / normalisation, target encoding, losses, metrics and decoding."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mmfuse.core.errors import ConfigError
from mmfuse.tasks import TASKS, HeadTask, Task
from mmfuse.tasks.classification import ClassificationTask, MultilabelTask
from mmfuse.tasks.regression import RegressionTask


def compute_metrics(task: Task, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    metrics = task.metrics()
    metrics.update(*task.metric_inputs(outputs, target))
    return {k: float(v) for k, v in metrics.compute().items()}


def test_registry_names() -> None:
    assert {"classification", "multilabel", "regression"} <= set(TASKS.names())
    assert sorted(TASKS.names()) == TASKS.names()
    with pytest.raises(ConfigError, match=r"valid choices: .*classification"):
        TASKS.create("clasification")
    assert isinstance(TASKS.create("classification"), ClassificationTask)
    assert isinstance(TASKS.create("multilabel"), MultilabelTask)
    assert isinstance(TASKS.create("regression", num_targets=2), RegressionTask)


HEAD_TASKS = [name for name in TASKS.names() if isinstance(TASKS.create(name), HeadTask)]


@pytest.mark.parametrize("name", HEAD_TASKS)
def test_every_task_round_trips_its_state(name: str) -> None:
    """Tasks with one (B, num_outputs) output; the others test their state in their own files."""
    task = TASKS.create(name)
    examples = {"classification": ["b", "a", "c"], "multilabel": ["a|b", "c", []], "regression": [1.0, 3.0, 8.0],
                "sentiment": [1.0, -2.0, 0.5]}
    task.fit(examples.get(name, examples["classification"]))
    clone = TASKS.create(name)
    clone.load_state(task.state())
    assert clone.num_outputs == task.num_outputs > 0
    outputs = torch.randn(3, task.num_outputs, generator=torch.Generator().manual_seed(0))
    assert clone.decode(outputs) == task.decode(outputs)
    metric, mode = task.monitor
    assert mode in ("min", "max") and metric in task.metrics()


# ---- classification -----------------------------------------------------------------------------


def test_classification_sorts_numeric_labels_numerically() -> None:
    task = ClassificationTask()
    task.fit(["10", "2", "1", 2, 10.0, "-3"])
    assert task.labels == ["-3", "1", "2", "10"]
    assert task.num_outputs == 4
    # Mixed labels: numbers first (numerically), then words alphabetically.
    mixed = ClassificationTask()
    mixed.fit(["cat", "10", "9", "ant"])
    assert mixed.labels == ["9", "10", "ant", "cat"]


@pytest.mark.parametrize(
    "order", [["01", "1", "-0", "0", "+2", "--3", "\u00b2"], ["\u00b2", "--3", "+2", "0", "-0", "1", "01"]]
)
def test_classification_label_order_is_total_and_never_crashes(order: list[str]) -> None:
    """Integer ties ("1" vs "01") are broken by the text; integer-like non-integers sort as words."""
    task = ClassificationTask()
    task.fit(order)
    assert task.labels == ["-0", "0", "01", "1", "+2", "--3", "\u00b2"]


def test_classification_encode_and_decode() -> None:
    task = ClassificationTask()
    task.fit(["dog", "cat", "bird", "cat"])
    assert task.labels == ["bird", "cat", "dog"]
    assert task.encode_target("dog").item() == 2
    assert task.encode_target(" cat ").item() == 1
    assert task.encode_target("bird").dtype == torch.long
    # 3.0 read from a CSV is the label "3".
    numeric = ClassificationTask()
    numeric.fit([1, 2, 3])
    assert numeric.encode_target(3.0).item() == 2
    outputs = torch.tensor([[0.0, 0.0, 5.0], [2.0, 0.0, 0.0]])
    decoded = task.decode(outputs)
    assert [d["label"] for d in decoded] == ["dog", "bird"]
    probs = decoded[0]["probabilities"]
    assert set(probs) == {"bird", "cat", "dog"}
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
    expected = torch.tensor([0.0, 0.0, 5.0]).softmax(-1)
    assert math.isclose(probs["dog"], float(expected[2]), abs_tol=1e-6)


def test_classification_unknown_or_empty_label_is_a_value_error() -> None:
    task = ClassificationTask()
    task.fit(["a", "b"])
    with pytest.raises(ValueError, match=r"'c' is not one of the 2 training labels"):
        task.encode_target("c")
    with pytest.raises(ValueError, match=r"empty"):
        task.encode_target(None)
    with pytest.raises(ValueError, match=r"empty"):
        task.encode_target(float("nan"))
    with pytest.raises(ValueError, match=r"at least 2 labels"):
        ClassificationTask().fit(["only", "only"])


def test_classification_loss_is_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 3, generator=gen)
    target = torch.tensor([0, 2, 1, 1, 0])
    task = ClassificationTask(labels=["a", "b", "c"])
    assert torch.allclose(task.loss(outputs, target), F.cross_entropy(outputs, target))
    smooth = ClassificationTask(labels=["a", "b", "c"], label_smoothing=0.2)
    assert torch.allclose(smooth.loss(outputs, target), F.cross_entropy(outputs, target, label_smoothing=0.2))
    # By hand for one sample: -log softmax of the true class.
    one = task.loss(outputs[:1], target[:1])
    assert torch.allclose(one, -outputs[0].log_softmax(-1)[0])
    # bf16 outputs are computed in float32.
    assert task.loss(outputs.bfloat16(), target).dtype == torch.float32


def test_classification_metrics_by_hand() -> None:
    task = ClassificationTask(labels=["a", "b", "c"])
    # Predictions: a, b, b, c, a ; truth: a, b, c, c, b -> 3/5 correct.
    outputs = torch.tensor([
        [3.0, 0.0, 0.0],
        [0.0, 3.0, 0.0],
        [0.0, 3.0, 0.0],
        [0.0, 0.0, 3.0],
        [3.0, 0.0, 0.0],
    ])
    target = torch.tensor([0, 1, 2, 2, 1])
    m = compute_metrics(task, outputs, target)
    assert m["accuracy"] == pytest.approx(0.6)
    # Per class recall: a 1/1, b 1/2, c 1/2 -> macro 2/3; precision: a 1/2, b 1/2, c 1/1 -> 2/3.
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    # F1 per class: a 2/3, b 1/2, c 2/3.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_classification_fixed_labels_are_kept() -> None:
    task = ClassificationTask(labels=["z", "a"])
    task.fit(["a", "z", "q"])
    assert task.labels == ["z", "a"]


# ---- multilabel -----------------------------------------------------------------------------------


def test_multilabel_fit_encode_from_strings_and_lists() -> None:
    task = MultilabelTask()
    task.fit(["b|a", ["c"], "a", None, "", []])  # missing targets are reported per row, not fitted
    assert task.labels == ["a", "b", "c"]
    assert task.encode_target("a|c").tolist() == [1.0, 0.0, 1.0]
    assert task.encode_target(["b", " c "]).tolist() == [0.0, 1.0, 1.0]
    assert task.encode_target(" b | a ").tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"'d' is not one of the 3 training labels"):
        task.encode_target("a|d")
    semicolon = MultilabelTask(separator=";")
    semicolon.fit(["x;y", "y"])
    assert semicolon.encode_target("y;x").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"no labels"):
        MultilabelTask().fit([None, ""])


def test_multilabel_missing_target_is_an_error_but_an_explicit_empty_list_is_no_labels() -> None:
    """A missing target once became "no labels" silently; only an explicit [] means that now."""
    task = MultilabelTask(labels=["a", "b"])
    for missing in (None, float("nan"), "", "  "):
        with pytest.raises(ValueError, match=r"the target is empty.*write \[\] for a sample with no labels"):
            task.encode_target(missing)
    for separators_only in ("|", " | "):
        with pytest.raises(ValueError, match=r"target '.*' names no label"):
            task.encode_target(separators_only)
    assert task.encode_target([]).tolist() == [0.0, 0.0]  # JSON / Parquet: an empty list
    assert task.encode_target(()).tolist() == [0.0, 0.0]
    assert task.encode_target(" [] ").tolist() == [0.0, 0.0]  # CSV / TSV: the text []
    assert task.encode_target(["b"]).tolist() == [0.0, 1.0]


def test_multilabel_loss_decode_and_metrics() -> None:
    task = MultilabelTask(labels=["a", "b", "c"])
    outputs = torch.tensor([[4.0, -4.0, 4.0], [-4.0, 4.0, -4.0], [4.0, 4.0, -4.0], [-4.0, -4.0, -4.0]])
    target = torch.stack([task.encode_target(t) for t in ["a|c", "b", "a", "c"]])
    assert torch.allclose(task.loss(outputs, target), F.binary_cross_entropy_with_logits(outputs, target))
    decoded = task.decode(outputs)
    assert [d["labels"] for d in decoded] == [["a", "c"], ["b"], ["a", "b"], []]
    assert decoded[0]["probabilities"]["a"] == pytest.approx(float(torch.sigmoid(torch.tensor(4.0))), abs=1e-6)
    m = compute_metrics(task, outputs, target)
    # 12 label decisions, 2 wrong (row 2 'b', row 3 'c') -> 10/12; rows 0 and 1 exactly right -> 1/2.
    assert m["accuracy"] == pytest.approx(10 / 12)
    assert m["exact_match"] == pytest.approx(0.5)
    # Per label F1: a (tp 2) 1.0; b (tp 1, fp 1) 2/3; c (tp 1, fn 1) 2/3.
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


# ---- regression -----------------------------------------------------------------------------------


def test_regression_standardises_targets_for_the_loss() -> None:
    task = RegressionTask()
    raw = [10.0, 20.0, 30.0, 40.0]
    task.fit(raw)
    values = torch.tensor(raw)
    assert task.mean == pytest.approx([25.0])
    assert task.std == pytest.approx([float(values.std())])  # unbiased, as torch.std
    target = torch.stack([task.encode_target(v) for v in raw])
    assert target.shape == (4, 1) and target.dtype == torch.float32
    standardised = (target - 25.0) / float(values.std())
    # Predicting the standardised targets exactly is a zero loss; predicting the raw ones is not.
    assert task.loss(standardised, target).item() == pytest.approx(0.0, abs=1e-12)
    outputs = torch.tensor([[0.5], [-1.0], [0.0], [2.0]])
    assert torch.allclose(task.loss(outputs, target), F.mse_loss(outputs, standardised))
    # decode returns original units.
    assert [d["value"] for d in task.decode(standardised)] == pytest.approx(raw)
    assert task.decode(torch.tensor([[1.0]]))[0]["value"] == pytest.approx(25.0 + float(values.std()))


def test_regression_without_standardisation_is_plain_mse() -> None:
    task = RegressionTask(standardize=False)
    task.fit([100.0, 200.0])
    outputs, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [4.0]])
    assert torch.allclose(task.loss(outputs, target), F.mse_loss(outputs, target))
    assert task.decode(outputs)[1]["value"] == pytest.approx(2.0)


def test_regression_metrics_in_original_units() -> None:
    task = RegressionTask()
    task.fit([0.0, 10.0])  # mean 5, std sqrt(50)
    std = math.sqrt(50.0)
    predicted = torch.tensor([1.0, 4.0, 9.0])  # original units
    truth = torch.tensor([[2.0], [4.0], [6.0]])
    outputs = ((predicted - 5.0) / std)[:, None]
    m = compute_metrics(task, outputs, truth)
    assert m["mae"] == pytest.approx((1 + 0 + 3) / 3, abs=1e-5)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 9) / 3), abs=1e-5)
    assert m["pearson"] == pytest.approx(float(torch.corrcoef(torch.stack([predicted, truth[:, 0]]))[0, 1]), abs=1e-5)


def test_regression_multiple_targets() -> None:
    task = RegressionTask(num_targets=2)
    task.fit([[0.0, 100.0], [2.0, 300.0], [4.0, 200.0]])
    assert task.mean == pytest.approx([2.0, 200.0])
    assert task.std == pytest.approx([2.0, 100.0])
    decoded = task.decode(torch.tensor([[1.0, -1.0]]))
    assert decoded[0]["value"] == pytest.approx([4.0, 100.0])
    outputs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    truth = torch.tensor([[2.0, 200.0], [4.0, 300.0], [0.0, 250.0]])
    m = compute_metrics(task, outputs, truth)
    assert m["mae"] == pytest.approx(50.0 / 6, abs=1e-4)  # only the last value is off, by 50
    # Every metric is one scalar (Lightning's log_dict and evaluate() need that): pearson is the mean.
    preds = task.denormalise(outputs)
    per_target = [float(torch.corrcoef(torch.stack([preds[:, k], truth[:, k]]))[0, 1]) for k in range(2)]
    assert m["pearson"] == pytest.approx(sum(per_target) / 2, abs=1e-5)


@pytest.mark.filterwarnings("ignore:std..:UserWarning")
def test_regression_bad_targets_are_value_errors() -> None:
    task = RegressionTask()
    with pytest.raises(ValueError, match=r"not a number"):
        task.encode_target("abc")
    with pytest.raises(ValueError, match=r"not a finite number"):
        task.encode_target(float("nan"))
    with pytest.raises(ValueError, match=r"expected 1 target"):
        task.encode_target([1.0, 2.0])
    assert task.encode_target("2.5").tolist() == [2.5]
    # A constant target does not divide by zero.
    const = RegressionTask()
    const.fit([3.0, 3.0])
    assert all(math.isfinite(s) and s > 0 for s in const.std)
    single = RegressionTask()
    single.fit([3.0])
    assert all(math.isfinite(s) and s > 0 for s in single.std)


@pytest.mark.parametrize("missing", [None, math.nan, "", "   "])
def test_captioning_missing_caption_is_an_error_not_the_word_nan(missing: object) -> None:
    task = TASKS.create("captioning")
    task.fit(["a red circle", "a blue square"])
    assert task.encode_target("a red circle").tolist()[1:-1] != []
    with pytest.raises(ValueError, match="the caption is empty"):
        task.encode_target(missing)
