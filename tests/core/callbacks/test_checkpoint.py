"""CheckpointCallback: which files a run writes, under which names, with what inside."""

import os
import re
from pathlib import Path

import pytest
import torch

from noether.core.config import ConfigError
from noether.training.run import evaluate, train
from tests.conftest import run_cli, tiny_config
from tests.support.checkpoints import checkpoint_path
from tests.support.models import composite_model_config
from tests.support.timed import read_record

CHECKPOINT = "noether.core.callbacks.CheckpointCallback"


def checkpoint_files(paths) -> list[str]:
    """The member files (each set's small hashes file aside)."""
    return sorted(path.name for path in paths.checkpoint_dir.iterdir() if not path.name.endswith("_hashes.json"))


@pytest.mark.parametrize("async_checkpoints", [True, False])
def test_periodic_latest_and_last_checkpoints_of_a_run(tmp_path: Path, async_checkpoints: bool) -> None:
    """Every 4 updates of 18: tags E0_U4, E0_U8, E1_U12, E1_U16; `latest` ends at U16, `last` at U18."""
    callback = {"kind": CHECKPOINT, "every_n_updates": 4, "save_latest_weights": True, "save_latest_optim": True}
    paths = train({**tiny_config(tmp_path, callbacks=[callback]), "async_checkpoints": async_checkpoints})

    tags = ["E0_U4_S512", "E0_U8_S1024", "E1_U12_S1536", "E1_U16_S2048", "last", "latest"]
    assert checkpoint_files(paths) == sorted(
        f"classifier_cp={tag}_{part}.th" for tag in tags for part in ("model", "optim", "trainer")
    )
    weights = torch.load(checkpoint_path(paths, "classifier", "E0_U8_S1024", "model"), weights_only=True)
    assert weights["checkpoint_tag"] == "E0_U8_S1024"
    assert weights["training_iteration"] == {"epoch": 0, "update": 8, "sample": 1024}
    assert weights["run_id"] == "run"
    assert weights["model_config"]["hidden_dim"] == 16
    assert set(weights["state_dict"]) == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.3.weight",
        "layers.3.bias",
        "layers.6.weight",
        "layers.6.bias",
    }
    latest = torch.load(checkpoint_path(paths, "classifier", "latest", "trainer"), weights_only=True)
    assert latest["training_iteration"] == {"epoch": 1, "update": 16, "sample": 2048}
    assert {"callbacks", "rng_states", "grad_scaler"} <= set(latest)
    assert len(latest["rng_states"]) == 1  # one entry per process
    assert set(latest["rng_states"][0]) >= {"python", "numpy", "torch"}
    last = torch.load(checkpoint_path(paths, "classifier", "last", "optim"), weights_only=True)
    assert last["training_iteration"] == {"epoch": 2, "update": 18, "sample": 2304}
    assert last["state_dict"]["state"][0]["step"] == 18
    for part in ("model", "optim", "trainer"):  # `latest` and the periodic set of one step: one write, two names
        assert checkpoint_path(paths, "classifier", "latest", part).samefile(
            checkpoint_path(paths, "classifier", "E1_U16_S2048", part)
        )


def test_save_flags_choose_the_parts_of_periodic_and_latest_checkpoints(tmp_path: Path) -> None:
    callback = {
        "kind": CHECKPOINT,
        "every_n_epochs": 1,
        "save_optim": False,
        "save_latest_weights": False,
        "save_latest_optim": True,
    }
    paths = train(tiny_config(tmp_path, callbacks=[callback]))

    assert checkpoint_files(paths) == sorted(
        [f"classifier_cp={tag}_{part}.th" for tag in ("E1_U9_S1152", "E2_U18_S2304") for part in ("model", "trainer")]
        + [f"classifier_cp=latest_{part}.th" for part in ("optim", "trainer")]
        + [f"classifier_cp=last_{part}.th" for part in ("model", "optim", "trainer")]
    )
    # other contents than the periodic set's: a set of its own
    assert not checkpoint_path(paths, "classifier", "latest", "trainer").samefile(
        checkpoint_path(paths, "classifier", "E2_U18_S2304", "trainer")
    )


def test_a_checkpoint_callback_that_saves_nothing_is_rejected_before_training(tmp_path: Path) -> None:
    callback = {"kind": CHECKPOINT, "every_n_epochs": 1, "save_weights": False, "save_optim": False}
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\]: nothing would be saved"):
        train(tiny_config(tmp_path, callbacks=[callback]))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def sized_run(tmp_path_factory):
    """85,002 float32 parameters: 340 kB of weights, an AdamW state of twice that; checkpoints every 4
    updates of 18 with `latest` (which shares the periodic set's files), and `last` at update 18."""
    callback = {"kind": CHECKPOINT, "every_n_updates": 4, "save_latest_weights": True, "save_latest_optim": True}
    tree = tiny_config(tmp_path_factory.mktemp("sized"), callbacks=[callback])
    tree["model"]["hidden_dim"] = 256
    return train(tree)


def logged_estimate(paths) -> re.Match:
    [line] = [line for line in paths.log_file.read_text().splitlines() if "one checkpoint:" in line]
    match = re.search(
        r"one checkpoint: weights ([\d.]+) kB, optimizer state ~([\d.]+) kB; this run will write ~([\d.]+) MB of checkpoints$",
        line,
    )
    assert match, line
    return match


def test_the_size_of_one_checkpoint_and_of_all_checkpoints_is_logged_before_training(sized_run) -> None:
    log = sized_run.log_file.read_text()
    assert "one checkpoint: weights 340.0 kB, optimizer state ~680.0 kB; this run will write ~5.1 MB of checkpoints" in log
    assert log.index("one checkpoint") < log.index("E1_U9_S1152")  # before training
    # one checkpoint's figures against its files on disk (which add a little of their own: names, stamps, the zip)
    weights_kb, optim_kb, _ = (float(value) for value in logged_estimate(sized_run).groups())
    for part, estimate in (("model", weights_kb), ("optim", optim_kb)):
        on_disk = os.stat(checkpoint_path(sized_run, "classifier", "E0_U4_S512", part)).st_size
        assert on_disk == pytest.approx(estimate * 1000, rel=0.02), part


def test_the_estimate_of_what_the_run_writes_is_close_to_the_bytes_it_wrote(sized_run) -> None:
    """What the run wrote: every weights and optimizer file once, however many names it has (the
    estimate leaves the small trainer state and hashes file out)."""
    files = {}
    for path in sized_run.checkpoint_dir.iterdir():
        if "_trainer" not in path.name and not path.name.endswith("_hashes.json"):
            stat = os.stat(path)
            files[(stat.st_dev, stat.st_ino)] = stat.st_size
    assert len(files) == 10  # 4 periodic sets and `last`, weights and optimizer state each
    announced_mb = float(logged_estimate(sized_run).group(3))
    assert sum(files.values()) == pytest.approx(announced_mb * 1e6, rel=0.05)


def test_evaluation_writes_no_checkpoint(tmp_path: Path) -> None:
    tree = tiny_config(tmp_path, callbacks=[{"kind": CHECKPOINT, "every_n_epochs": 1}])
    paths = train(tree)
    before = {path.name: path.stat().st_mtime_ns for path in paths.checkpoint_dir.iterdir()}

    evaluate(tree, run="run", checkpoint="E1_U9_S1152")

    assert {path.name: path.stat().st_mtime_ns for path in paths.checkpoint_dir.iterdir()} == before


def composite_tree(output_path: Path, **callback_options) -> dict:
    tree = tiny_config(output_path, max_epochs=1, callbacks=[{"kind": CHECKPOINT, "every_n_epochs": 1, **callback_options}])
    tree["model"] = composite_model_config()
    return tree


def test_composite_model_writes_each_trained_submodel_and_skips_the_frozen_one(tmp_path: Path) -> None:
    paths = train(composite_tree(tmp_path))

    for tag in ("E1_U9_S1152", "last"):
        for submodel in ("encoder", "head"):
            for part in ("model", "optim"):
                assert checkpoint_path(paths, f"composite.{submodel}", tag, part).exists()
        assert checkpoint_path(paths, "composite", tag, "trainer").exists()
        assert not checkpoint_path(paths, "composite.embed", tag, "model").exists()
    head = torch.load(checkpoint_path(paths, "composite.head", "last", "model"), weights_only=True)
    assert set(head["state_dict"]) == {"linear.weight", "linear.bias"}
    assert head["model_config"]["out_dim"] == 10


def test_model_names_select_submodels_and_a_named_frozen_submodel_is_written(tmp_path: Path) -> None:
    paths = train(composite_tree(tmp_path, model_names=["head", "embed"]))

    assert checkpoint_files(paths) == sorted(
        [f"composite.head_cp={tag}_{part}.th" for tag in ("E1_U9_S1152", "last") for part in ("model", "optim")]
        + [f"composite.embed_cp={tag}_model.th" for tag in ("E1_U9_S1152", "last")]
        + [f"composite_cp={tag}_trainer.th" for tag in ("E1_U9_S1152", "last")]
    )


def test_an_unknown_model_name_fails_before_training(tmp_path: Path) -> None:
    expected = (
        "CheckpointCallback.model_names: no model named 'decoder'; models are: composite.embed, composite.encoder, composite.head"
    )
    with pytest.raises(ConfigError, match=expected):
        train(composite_tree(tmp_path, model_names=["decoder"]))


# --------------------------------------------------------------------------------- milestones
def periodic_tags_on_disk(paths) -> list[str]:
    tags = {name.split("_cp=")[1].rsplit("_", 1)[0] for name in checkpoint_files(paths)}
    return sorted(
        (tag for tag in tags if tag.startswith("E") and "." not in tag), key=lambda tag: int(tag.split("_U")[1].split("_")[0])
    )


def test_milestones_outlive_keep_last_n_through_a_crash_and_resume(tmp_path: Path) -> None:
    """Every epoch of 5, keep_last_n=1, a milestone every 2 epochs: E2 and E4 stay beside the newest set,
    E1 and E3 go; a crash after epoch 3 and `--resume auto` keep the milestone of the first launch."""
    callback = {"kind": CHECKPOINT, "every_n_epochs": 1, "keep_last_n": 1, "keep_every_n_epochs": 2}
    crash = {"kind": "tests.support.scripted_metric.Interrupt", "every_n_epochs": 3, "how": "crash"}
    tree = tiny_config(tmp_path, callbacks=[callback], max_epochs=5)
    with pytest.raises(RuntimeError, match="scripted crash"):
        train({**tree, "trainer": {**tree["trainer"], "callbacks": [callback, crash]}})
    paths = train(tree, resume="auto")

    assert periodic_tags_on_disk(paths) == ["E2_U18_S2304", "E4_U36_S4608", "E5_U45_S5760"]
    first_launch = paths.log_file.read_text().split("resum")[0]
    assert "keep ~" in first_launch and "(keep_last_n=1, a milestone every 2 epochs)" in first_launch
    listed = run_cli("noether-ckpt", "list", str(paths.run_dir), cwd=tmp_path).stdout.splitlines()
    assert sorted(line.split()[0] for line in listed if line.endswith("milestone")) == ["E2_U18_S2304", "E4_U36_S4608"]


def test_the_forecast_counts_the_milestones_among_the_sets_kept(tmp_path: Path) -> None:
    """5 epochs, a set every epoch, keep_last_n=1, a milestone every 2 epochs: 3 of the 5 sets written are
    kept (`last` is a second name of the newest), and the forecast says so before training."""
    callback = {"kind": CHECKPOINT, "every_n_epochs": 1, "keep_last_n": 1, "keep_every_n_epochs": 2}
    tree = tiny_config(tmp_path, callbacks=[callback], max_epochs=5)
    tree["model"]["hidden_dim"] = 256  # files large enough that their own overhead is within the tolerance
    paths = train(tree)

    [line] = [line for line in paths.log_file.read_text().splitlines() if "one checkpoint:" in line]
    match = re.search(r"will write ~([\d.]+) MB of checkpoints and keep ~([\d.]+) MB of them", line)
    assert match, line
    written, kept = (float(value) * 1e6 for value in match.groups())
    on_disk = {}
    for path in paths.checkpoint_dir.iterdir():
        if "_trainer" not in path.name and not path.name.endswith("_hashes.json"):
            stat = os.stat(path)
            on_disk[(stat.st_dev, stat.st_ino)] = stat.st_size
    assert len(on_disk) == 6  # weights and optimizer state of E2, E4 and E5 (`last` shares E5's files)
    assert kept == pytest.approx(sum(on_disk.values()), rel=0.05)
    assert kept == pytest.approx(written * 3 / 5, rel=0.02)


def test_keep_every_n_epochs_without_keep_last_n_is_refused_before_training(tmp_path: Path) -> None:
    callback = {"kind": CHECKPOINT, "every_n_epochs": 1, "keep_every_n_epochs": 2}
    with pytest.raises(
        ConfigError, match="keep_every_n_epochs keeps milestones from keep_last_n's deletions: set keep_last_n too"
    ):
        train(tiny_config(tmp_path, callbacks=[callback]))
    assert not (tmp_path / "run").exists()


def test_timed_checkpoints_keep_the_newest_n_and_say_how_often_they_are_written(tmp_path: Path) -> None:
    """A timed recorder with the same interval fires after the same updates as the timed checkpoints."""
    slow = {"kind": "tests.support.timed.SlowUpdates", "seconds_by_rank": [0.03]}
    recorder = {"kind": "tests.support.timed.ClockRecord", "every_n_seconds": 0.1, "file": str(tmp_path / "fired")}
    callback = {"kind": CHECKPOINT, "every_n_seconds": 0.1, "keep_last_n": 2}
    paths = train(tiny_config(tmp_path / "outputs", callbacks=[slow, recorder, callback]))

    log = paths.log_file.read_text()
    assert "one checkpoint: weights 5.9 kB, optimizer state ~11.9 kB; one every 0.1 s of training, the newest 2 kept" in log
    fired = [line["update"] for line in read_record(tmp_path / "fired.0")]
    assert len(fired) >= 3
    assert [int(tag.split("_U")[1].split("_")[0]) for tag in periodic_tags_on_disk(paths)] == fired[-2:]
