"""BestCheckpointCallback on real tiny training runs whose watched metric follows a script."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from noether.core.callbacks import BestCheckpointCallback
from noether.core.config import ConfigError
from noether.core.providers.path import PathProvider
from noether.core.writers.checkpoint_writer import load_checkpoint
from noether.core.writers.log_writer import LogWriter
from noether.training.run import build_trainer, evaluate, parse_run_config, train
from tests.conftest import run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path

METRIC = "loss/scripted/total"
TAG = "best_model.loss.scripted.total"
CHILD_PREFIX = "best=loss.scripted.total/"
# one value per epoch; new bests at epochs 1, 2, 5 and 10. Tolerance 1 is exceeded at epoch 4
# (2 epochs without improvement), when epoch 2 was best; tolerance 3 at epoch 9, when epoch 5 was
# (the NaN counts as no improvement).
SCRIPT = [5.0, 4.0, 4.5, 4.6, 3.0, 3.5, math.nan, 3.7, 3.8, 2.0]
BEST_EPOCHS = [1, 2, 5, 10]
BATCH_SIZE = 400
UPDATES_PER_EPOCH = 3  # 1257 training images in whole batches of 400


def scripted(values: list[float], **overrides: Any) -> dict[str, Any]:
    return {"kind": "tests.support.scripted_metric.ScriptedMetric", "every_n_epochs": 1, "values": values, **overrides}


def best_callback(**overrides: Any) -> dict[str, Any]:
    return {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": METRIC, **overrides}


def interrupt(how: str, every_n_epochs: int) -> dict[str, Any]:
    return {"kind": "tests.support.scripted_metric.Interrupt", "every_n_epochs": every_n_epochs, "how": how}


CHILDREN = [
    # iterating: reads the test set through a loader of its own when a new best appears
    {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "test"},
    {"kind": "tests.support.scripted_metric.HookRecorder", "every_n_epochs": 1},
]
EPOCH_WEIGHTS_AND_LATEST = [
    # the weights of every epoch, to tell which model a best (or top-k) file holds
    {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_weights": True, "save_optim": False},
    # `latest` every 4 epochs, to resume from
    {
        "kind": "noether.core.callbacks.CheckpointCallback",
        "every_n_epochs": 4,
        "save_weights": False,
        "save_optim": False,
        "save_latest_weights": True,
        "save_latest_optim": True,
    },
]
REFERENCE_CALLBACKS = [
    # the live model's test loss, to compare with what the best model's children report
    {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "test"},
    scripted(SCRIPT),
    best_callback(tolerances=[3, 1], eval_callbacks=CHILDREN),
    *EPOCH_WEIGHTS_AND_LATEST,
]


def config(output_path: Path, callbacks: list[dict[str, Any]], *, run_id: str = "run", **trainer: Any) -> dict[str, Any]:
    tree = tiny_config(output_path, callbacks=callbacks, effective_batch_size=BATCH_SIZE, **trainer)
    tree["run_id"] = run_id
    return tree


def iteration(epoch: int) -> dict[str, int]:
    return {"epoch": epoch, "update": epoch * UPDATES_PER_EPOCH, "sample": epoch * UPDATES_PER_EPOCH * BATCH_SIZE}


def periodic_tag(epoch: int) -> str:
    it = iteration(epoch)
    return f"E{it['epoch']}_U{it['update']}_S{it['sample']}"


def best_files(paths: PathProvider) -> dict[str, dict[str, Any]]:
    """Every best-model file of a run, by file name, loaded."""
    return {path.name: load_checkpoint(path) for path in sorted(paths.checkpoint_dir.glob("*_cp=best_model.*_model.th"))}


def metric_records(paths: PathProvider) -> list[dict[str, float]]:
    return [json.loads(line) for line in paths.metrics_file.read_text().splitlines()]


def epochs_logging(records: list[dict[str, float]], key: str) -> list[int]:
    return [record["epoch"] for record in records if key in record]


def assert_same_best_files(actual: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, payload in expected.items():
        assert actual[name]["training_iteration"] == payload["training_iteration"], name
        assert actual[name]["checkpoint_tag"] == payload["checkpoint_tag"], name
        for key, tensor in payload["state_dict"].items():
            assert torch.equal(actual[name]["state_dict"][key], tensor), f"{name}: {key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> PathProvider:
    """The scripted run, uninterrupted, 10 epochs."""
    return train(config(tmp_path_factory.mktemp("reference"), REFERENCE_CALLBACKS, max_epochs=10))


def test_best_and_tolerance_files_hold_the_best_model_of_their_time(reference: PathProvider) -> None:
    files = best_files(reference)
    expected_epochs = {TAG: 10, f"{TAG}.tolerance=1": 2, f"{TAG}.tolerance=3": 5}
    assert sorted(files) == sorted(f"classifier_cp={tag}_model.th" for tag in expected_epochs)
    for tag, epoch in expected_epochs.items():
        payload = files[f"classifier_cp={tag}_model.th"]
        # a tolerance file is the best file of its time under a second name (a hard link: written once)
        assert payload["checkpoint_tag"] == TAG
        assert payload["training_iteration"] == iteration(epoch)
        weights_then = load_checkpoint(checkpoint_path(reference, "classifier", periodic_tag(epoch), "model"))["state_dict"]
        assert all(torch.equal(payload["state_dict"][key], weights_then[key]) for key in weights_then), tag


def test_best_values_are_logged_after_training(reference: PathProvider) -> None:
    last = metric_records(reference)[-1]
    assert last["epoch"] == 10
    assert last[f"best/{METRIC}"] == 2.0
    assert last[f"best/{METRIC}/tolerance=1"] == 4.0
    assert last[f"best/{METRIC}/tolerance=3"] == 3.0


def test_children_evaluate_each_new_best_under_the_best_prefix(reference: PathProvider) -> None:
    records = metric_records(reference)
    child_loss = CHILD_PREFIX + "loss/test/total"
    assert epochs_logging(records, child_loss) == BEST_EPOCHS
    assert epochs_logging(records, CHILD_PREFIX + "evaluated/eval") == BEST_EPOCHS
    for record in records:
        if child_loss in record:  # evaluated the live model that had just become best
            assert record[child_loss] == pytest.approx(record["loss/test/total"], rel=1e-5)
    assert not any(key.startswith(("evaluated/", "lifecycle/")) for record in records for key in record)
    # before_training and after_training are forwarded once each
    assert [record["update"] for record in records if CHILD_PREFIX + "lifecycle/before_training" in record] == [1]
    assert [record["epoch"] for record in records if CHILD_PREFIX + "lifecycle/after_training" in record] == [10]


def test_iterating_children_are_not_served_by_the_shared_sampler(tmp_path: Path) -> None:
    run_config = parse_run_config(config(tmp_path, REFERENCE_CALLBACKS))
    paths = PathProvider(tmp_path, "built")
    paths.create()
    trainer = build_trainer(run_config, paths, LogWriter(paths.metrics_file, paths.summary_file))
    best = next(callback for callback in trainer.callbacks if isinstance(callback, BestCheckpointCallback))
    assert [type(child).__name__ for child in best.eval_callbacks] == ["OfflineLossCallback", "HookRecorder"]
    assert [type(child).__name__ for child in best.get_children()] == ["HookRecorder"]
    assert best.eval_callbacks[0] not in trainer.all_callbacks()


def test_metric_that_is_always_nan_never_makes_a_best(tmp_path: Path) -> None:
    callbacks = [scripted([math.nan] * 5), best_callback(tolerances=[1, 3], eval_callbacks=CHILDREN)]
    paths = train(config(tmp_path, callbacks, max_epochs=5))
    assert best_files(paths) == {}
    logged = {key for record in metric_records(paths) for key in record}
    assert not any(key.startswith("best/") for key in logged)
    assert CHILD_PREFIX + "loss/test/total" not in logged
    assert CHILD_PREFIX + "evaluated/eval" not in logged


def test_higher_is_better_metric_keeps_the_maximum(tmp_path: Path) -> None:
    # best at epoch 4; tolerance 0 is exceeded at epoch 3 (epoch 2 best), tolerance 10 never
    callbacks = [
        scripted([0.2, 0.5, 0.4, 0.7, 0.6], metric_key="accuracy/scripted"),
        best_callback(metric_key="accuracy/scripted", tolerances=[0, 10]),
    ]
    paths = train(config(tmp_path, callbacks, max_epochs=5))
    stamped = {name: payload["training_iteration"]["epoch"] for name, payload in best_files(paths).items()}
    assert stamped == {
        "classifier_cp=best_model.accuracy.scripted_model.th": 4,
        "classifier_cp=best_model.accuracy.scripted.tolerance=0_model.th": 2,
        "classifier_cp=best_model.accuracy.scripted.tolerance=10_model.th": 4,
    }
    last = metric_records(paths)[-1]
    assert last["best/accuracy/scripted"] == pytest.approx(0.7)
    assert last["best/accuracy/scripted/tolerance=0"] == pytest.approx(0.5)
    assert last["best/accuracy/scripted/tolerance=10"] == pytest.approx(0.7)


def test_resume_after_sigterm_between_a_best_and_an_exceeded_tolerance(tmp_path: Path, reference: PathProvider) -> None:
    # stopped after epoch 7: epoch 5 is best, tolerance 3 (exceeded at epoch 9) is still open
    interrupted = train(config(tmp_path, [*REFERENCE_CALLBACKS, interrupt("sigterm", every_n_epochs=7)], max_epochs=10))
    signal_tag = f"{periodic_tag(7)}.signal_interrupt"
    assert checkpoint_path(interrupted, "classifier", signal_tag, "trainer").exists()
    resumed = train(config(tmp_path, REFERENCE_CALLBACKS, max_epochs=10), resume=str(interrupted.run_dir), checkpoint=signal_tag)
    assert_same_best_files(best_files(resumed), best_files(reference))


def test_resume_from_an_earlier_checkpoint_after_a_crash_past_a_later_best(tmp_path: Path, reference: PathProvider) -> None:
    # crashes at epoch 10 after writing its best; `latest` is epoch 8, before tolerance 3 is exceeded
    # at epoch 9, so the resumed run must not keep the epoch-10 model for tolerance 3
    with pytest.raises(RuntimeError, match="scripted crash"):
        train(config(tmp_path, [*REFERENCE_CALLBACKS, interrupt("crash", every_n_epochs=10)], max_epochs=10))
    crashed = PathProvider(tmp_path, "run")
    assert load_checkpoint(checkpoint_path(crashed, "classifier", TAG, "model"))["training_iteration"] == iteration(10)
    resumed = train(config(tmp_path, REFERENCE_CALLBACKS, max_epochs=10), resume=str(crashed.run_dir), checkpoint="latest")
    assert_same_best_files(best_files(resumed), best_files(reference))


def test_eval_runs_children_on_the_loaded_best_and_writes_no_checkpoint(reference: PathProvider) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in reference.checkpoint_dir.iterdir()}
    tree = config(reference.output_path, REFERENCE_CALLBACKS, max_epochs=10)
    summary = evaluate(tree, run=str(reference.run_dir), checkpoint=TAG)
    assert {path.name: path.stat().st_mtime_ns for path in reference.checkpoint_dir.iterdir()} == before
    assert summary[CHILD_PREFIX + "evaluated/eval"] == 1
    child_loss = CHILD_PREFIX + "loss/test/total"
    at_last_best = next(record for record in metric_records(reference) if record["epoch"] == 10 and child_loss in record)
    assert summary[child_loss] == pytest.approx(at_last_best[child_loss], rel=1e-5)  # the same model on the same data
    assert not any(key.startswith("best/") for key in summary)


def test_composite_model_writes_the_named_and_frozen_submodels_asked_for(tmp_path: Path) -> None:
    # two epochs: new best at epoch 2; tolerance 0 is never exceeded
    watchers = {
        "all": {"save_frozen_weights": True},
        "encoder": {"model_names": ["encoder"], "save_frozen_weights": True},
        "trained": {},
    }
    callbacks = [scripted([1.0, 0.5], metric_key=f"loss/{name}/total") for name in watchers]
    callbacks += [
        best_callback(id=name, metric_key=f"loss/{name}/total", tolerances=[0], **options) for name, options in watchers.items()
    ]
    tree = config(tmp_path, callbacks, max_epochs=2)
    optimizer = tree["model"]["optimizer"]
    tree["model"] = {"kind": "tests.support.best_models.EncoderWithFrozenHead", "name": "pipe", "optimizer": optimizer}
    paths = train(tree)
    written = set(best_files(paths))
    for name, submodels in {"all": ["encoder", "head"], "encoder": ["encoder"], "trained": ["encoder"]}.items():
        for tag in [f"best_model.loss.{name}.total", f"best_model.loss.{name}.total.tolerance=0"]:
            assert {file for file in written if f"_cp={tag}_" in file} == {f"pipe.{sub}_cp={tag}_model.th" for sub in submodels}


def test_missing_metric_is_reported_at_first_invocation_when_it_cannot_be_known_before(tmp_path: Path) -> None:
    # the earlier callback logs something else and does not say what it logs
    callbacks = [scripted(SCRIPT, declares_metric=False, metric_key="loss/other/total"), best_callback()]
    with pytest.raises(KeyError) as raised:
        train(config(tmp_path, callbacks, max_epochs=2))
    message = str(raised.value)
    assert f"metric '{METRIC}' was not logged" in message
    assert "loss/other/total" in message and "loss/online/total" in message
    assert "listed before this one that runs at the same or a higher frequency" in message
    failed = PathProvider(tmp_path, "run")
    assert checkpoint_path(failed, "classifier", f"{periodic_tag(1)}.error", "trainer").exists()  # at the first invocation
    assert best_files(failed) == {}


def test_metric_logged_less_often_is_reported_at_first_invocation(tmp_path: Path) -> None:
    callbacks = [scripted(SCRIPT, every_n_epochs=2), best_callback(every_n_epochs=1)]
    with pytest.raises(KeyError, match=f"metric '{METRIC}' was not logged at this step"):
        train(config(tmp_path, callbacks, max_epochs=2))
    assert checkpoint_path(PathProvider(tmp_path, "run"), "classifier", f"{periodic_tag(1)}.error", "trainer").exists()


@pytest.mark.parametrize(
    ("callbacks", "expected"),
    [
        ([best_callback(), scripted(SCRIPT)], "ScriptedMetric logs it but is listed after this callback"),
        (
            [scripted(SCRIPT), best_callback(id="first"), best_callback(id="second")],
            "first and second both watch 'loss/scripted/total'",
        ),
        (
            [
                scripted(SCRIPT),
                scripted(SCRIPT, metric_key="loss/other/total"),
                best_callback(),
                best_callback(metric_key="loss/other/total"),
            ],
            "'BestCheckpointCallback'.*distinct 'id's",
        ),
        (
            [scripted(SCRIPT, metric_key="f1/scripted"), best_callback(metric_key="f1/scripted")],
            "unknown whether higher is better",
        ),
    ],
    ids=["producer-listed-after", "same-metric-twice", "same-key-without-ids", "unknown-direction"],
)
def test_config_errors_are_raised_before_training(tmp_path: Path, callbacks: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        train(config(tmp_path, callbacks))
    assert not PathProvider(tmp_path, "run").metrics_file.exists()


def test_cli_reports_a_metric_no_callback_logs_in_one_line(tmp_path: Path, write_config) -> None:
    tree = config(tmp_path / "outputs", [best_callback(metric_key="loss/val/total")])
    result = run_cli("noether-train", str(write_config(tree)), cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no callback listed before it logs 'loss/val/total'" in lines[0]
    assert "loss/online/*" in lines[0]  # what is logged instead
    assert "OfflineLossCallback" in lines[0]


# --------------------------------------------------------------------------------- save_top_k
TOP_K_CALLBACKS = [
    scripted(SCRIPT),
    best_callback(save_top_k=3),
    *EPOCH_WEIGHTS_AND_LATEST,
]


@pytest.fixture(scope="module")
def top_k_reference(tmp_path_factory: pytest.TempPathFactory) -> PathProvider:
    return train(config(tmp_path_factory.mktemp("top-k"), TOP_K_CALLBACKS, max_epochs=10))


def test_top_k_keeps_the_weights_of_the_k_best_values_in_metrics_jsonl(top_k_reference: PathProvider) -> None:
    paths = top_k_reference
    logged = [
        (record[METRIC], record["epoch"]) for record in metric_records(paths) if not math.isnan(record.get(METRIC, math.nan))
    ]
    best_epochs = sorted(epoch for _, epoch in sorted(logged)[:3])
    assert best_epochs == [5, 6, 10]  # 3.0, 3.5 and 2.0 of the script; the NaN never ranks

    kept = {name: payload for name, payload in best_files(paths).items() if f"_cp={TAG}.E" in name}
    assert sorted(kept) == sorted(f"classifier_cp={TAG}.{periodic_tag(epoch)}_model.th" for epoch in best_epochs)
    for epoch in best_epochs:
        payload = kept[f"classifier_cp={TAG}.{periodic_tag(epoch)}_model.th"]
        assert payload["training_iteration"] == iteration(epoch)
        periodic = load_checkpoint(checkpoint_path(paths, "classifier", periodic_tag(epoch), "model"))
        for key, tensor in periodic["state_dict"].items():
            assert torch.equal(payload["state_dict"][key], tensor), f"epoch {epoch}: {key}"
    # the sets that dropped out (epochs 1, 2, 3, 4) were deleted whole: no file of theirs is left
    assert not [
        path.name
        for path in paths.checkpoint_dir.iterdir()
        if any(f"{TAG}.{periodic_tag(e)}_" in path.name for e in (1, 2, 3, 4))
    ]

    listed = run_cli("noether-ckpt", "list", str(paths.run_dir), cwd=paths.run_dir).stdout.splitlines()
    marked = sorted(line.split()[0] for line in listed if "top-k" in line)
    assert marked == sorted(f"{TAG}.{periodic_tag(epoch)}" for epoch in best_epochs)


def test_top_k_after_a_resume_is_the_top_k_of_the_uninterrupted_run(tmp_path: Path, top_k_reference: PathProvider) -> None:
    # stopped after epoch 7 (top 3: epochs 5, 6 and 2), resumed from `latest` at epoch 4 (top 3: 2, 3, 4):
    # the sets written after it are set aside, and the resumed run deletes and keeps as the reference did
    with pytest.raises(RuntimeError, match="scripted crash"):
        train(config(tmp_path, [*TOP_K_CALLBACKS, interrupt("crash", every_n_epochs=7)], max_epochs=10))
    crashed = PathProvider(tmp_path, "run")
    resumed = train(config(tmp_path, TOP_K_CALLBACKS, max_epochs=10), resume=str(crashed.run_dir), checkpoint="latest")
    assert_same_best_files(best_files(resumed), best_files(top_k_reference))
