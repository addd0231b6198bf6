"""Which direction is better for a metric: what best-model tracking compares with."""

import pytest

from noether.core.providers.metric_property import MetricPropertyProvider


@pytest.mark.parametrize(
    ("metric_key", "higher_is_better"),
    [
        ("loss/online/total", False),
        ("loss/val/total", False),
        ("accuracy/val", True),
        ("accuracy", True),
    ],
)
def test_losses_are_lower_and_accuracies_higher_is_better(metric_key, higher_is_better):
    assert MetricPropertyProvider().higher_is_better(metric_key) is higher_is_better


@pytest.mark.parametrize(
    "metric_key",
    ["best=loss.val.total/accuracy/test", "ema=0.9999/accuracy/val", "best=loss.val.total/ema=0.99/accuracy/val"],
)
def test_prefixes_of_nested_callbacks_are_ignored(metric_key):
    assert MetricPropertyProvider().higher_is_better(metric_key) is True
    assert MetricPropertyProvider().higher_is_better(metric_key.replace("accuracy", "loss")) is False


def test_config_entries_add_metrics_and_the_longest_matching_entry_wins():
    provider = MetricPropertyProvider({"f1": True, "loss/reward": True, "loss/reward/penalty": False})
    assert provider.higher_is_better("f1/val") is True
    assert provider.higher_is_better("loss/reward/total") is True
    assert provider.higher_is_better("loss/reward/penalty") is False
    assert provider.higher_is_better("loss/val/total") is False


def test_config_entries_override_the_defaults():
    assert MetricPropertyProvider({"accuracy": False}).higher_is_better("ema=0.9/accuracy/val") is False


def test_unknown_metric_says_how_to_declare_it():
    with pytest.raises(ValueError) as error:
        MetricPropertyProvider().higher_is_better("best=loss.val.total/iou/val")
    message = str(error.value)
    assert "unknown whether higher is better for metric 'best=loss.val.total/iou/val'" in message
    assert "metric_higher_is_better: {'iou': true|false}" in message


def test_only_whole_key_parts_match():
    with pytest.raises(ValueError):
        MetricPropertyProvider().higher_is_better("lossy/val")
