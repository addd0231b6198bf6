"""Sharded training's options and the README's promises about them, on one two-process run (a torchrun
start costs seconds): `shard_module_classes`, bfloat16, a composite model with a frozen submodel,
`keep_last_n` on `.dcp` folders, an error on one process (no error checkpoint), and its resume in one
process (a warning about the number of processes; checkpoints keep the `.dcp` format).

The composite is `embed` (frozen) -> `encoder` -> `head`, each a `LinearStack` whose linear layers sit
inside a Sequential `body`: `shard_module_classes: [Linear]` makes `body.0` and `body.2` the units,
where the default would make `body` one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import tiny_config
from tests.support.models import composite_model_config
from tests.support.t3_torchrun import run_torchrun

SUBMODELS = ("composite.embed", "composite.encoder", "composite.head")
TRAINED = ("composite.encoder", "composite.head")
STACK = "tests.support.t3_models.LinearStack"
VALIDATION_LOSS = {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"}
# best at the end of epoch 1 (update 9), older than every periodic set keep_last_n keeps
BEST = {
    "kind": "noether.core.callbacks.BestCheckpointCallback",
    "every_n_epochs": 1,
    "metric_key": "loss/val/total",
    "tolerances": [0],
    "save_frozen_weights": True,
}
CHECKPOINT = {
    "kind": "noether.core.callbacks.CheckpointCallback",
    "every_n_updates": 3,
    "keep_last_n": 2,
    "save_latest_weights": True,
    "save_latest_optim": True,
    # naming the submodels saves the frozen one too: a sharded set without it cannot be resumed (see
    # test_a_sharded_checkpoint_without_the_frozen_submodel_resumes)
    "model_names": ["embed", "encoder", "head"],
}
FAILS_ON_RANK_1 = {"kind": "tests.support.distributed.FailOnRankCallback", "at_update": 17, "rank": 1}
PERIODIC_BEFORE_FAILURE = ["E0_U3_S384", "E0_U6_S768", "E1_U9_S1152", "E1_U12_S1536", "E1_U15_S1920"]
KEPT_TAGS = ["best_model.loss.val.total", "best_model.loss.val.total.tolerance=0", "latest"]


def sharded_composite_tree(output_path: Path, report_dir: Path) -> dict[str, Any]:
    """18 updates of 128 samples in micro-batches of 32, AdamW; a periodic set every 3 updates, 2 kept."""
    probe = {"kind": "tests.support.t3_fsdp_probe.ShardingProbe", "at_update": 2, "report_dir": str(report_dir)}
    tree = tiny_config(
        output_path,
        max_batch_size=32,
        parallelism="fsdp",
        precision="bfloat16",
        shard_module_classes=["Linear"],
        callbacks=[VALIDATION_LOSS, BEST, CHECKPOINT, probe, FAILS_ON_RANK_1],
    )
    optimizer = {"kind": "torch.optim.AdamW", "lr": 0.002}
    tree["model"] = {
        "kind": "tests.support.models.DigitsComposite",
        "name": "composite",
        "embed": {"kind": STACK, "in_dim": 64, "out_dim": 32, "is_frozen": True},
        "encoder": {"kind": STACK, "in_dim": 32, "out_dim": 32, "optimizer": optimizer},
        "head": {"kind": STACK, "in_dim": 32, "out_dim": 10, "optimizer": optimizer},
    }
    return tree


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> tuple[PathProvider, subprocess.CompletedProcess, Path]:
    """Two processes; rank 1 raises after update 17. Returns the run, the torchrun result and the probe's reports."""
    directory = tmp_path_factory.mktemp("sharded")
    report_dir = directory / "probe"
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(sharded_composite_tree(directory, report_dir)))

    result = run_torchrun(config)

    return PathProvider(directory, "run"), result, report_dir


@pytest.fixture(scope="module")
def resumed_in_one_process(failed_run, tmp_path_factory) -> PathProvider:
    """A copy of the failed run, resumed without torchrun from its newest complete checkpoint to the end."""
    paths, _, _ = failed_run
    directory = tmp_path_factory.mktemp("resumed")
    shutil.copytree(paths.run_dir, directory / "run")
    return train(sharded_composite_tree(directory, directory / "probe"), resume="run")


def probe_reports(report_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def store(paths: PathProvider) -> CheckpointStore:
    return CheckpointStore(paths.checkpoint_dir, paths.run_id)


def periodic_tags(paths: PathProvider) -> list[str]:
    return [info.tag for info in store(paths).tags() if info.tag.startswith("E") and "." not in info.tag]


def load_every_member(paths: PathProvider, tag: str) -> dict[Member, dict[str, Any]]:
    """Every member of `tag` read whole in this process; the set must be complete (resumable) when it has a trainer state."""
    info = store(paths).info(tag)
    assert info.files and info.problem is None, (tag, info.problem)
    return {member: store(paths).load(member, tag) for member in info.files}


# --------------------------------------------------------------------------------- the run of two processes
def test_shard_module_classes_choose_the_units_of_every_submodel_the_frozen_one_included(failed_run):
    _, _, report_dir = failed_run
    for report in probe_reports(report_dir):
        assert set(report["models"]) == set(SUBMODELS)
        for name, model in report["models"].items():
            assert model["units"] == ["", "body.0", "body.2"], name  # the model itself and each Linear; not `body`
            for parameter, facts in model["parameters"].items():
                assert facts["local"] * 2 == facts["full"], (name, parameter)  # each process holds half
                assert facts["requires_grad"] is (name != "composite.embed"), (name, parameter)


def test_bfloat16_computes_in_bfloat16_and_keeps_weights_in_float32(failed_run):
    paths, _, report_dir = failed_run
    linear_layers = {f"{name}:body.{index}" for name in SUBMODELS for index in (0, 2)}
    for report in probe_reports(report_dir):
        assert report["forward_weight_dtypes"] == {layer: ["torch.bfloat16"] for layer in linear_layers}
        dtypes = {facts["dtype"] for model in report["models"].values() for facts in model["parameters"].values()}
        assert dtypes == {"torch.float32"}  # after two updates
    for name in TRAINED:
        saved = store(paths).load(Member(name, "model"), "E1_U15_S1920")["state_dict"]
        assert {tensor.dtype for tensor in saved.values()} == {torch.float32}, name


def test_an_error_on_one_of_several_processes_writes_no_error_checkpoint(failed_run):
    paths, result, _ = failed_run
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: test failure on rank 1 after update 17" in output
    assert "no error checkpoint under sharded training with several processes" in output
    assert "saving its checkpoint failed too" not in output  # no attempt that the other process could not join
    names = [path.name for path in paths.checkpoint_dir.iterdir()]
    assert [name for name in names if ".error" in name] == []
    assert store(paths).newest_resumable().tag == "E1_U15_S1920"


def test_keep_last_n_deletes_old_sharded_sets_whole_and_never_best_tolerance_or_latest(failed_run):
    paths, _, _ = failed_run
    assert periodic_tags(paths) == ["E1_U12_S1536", "E1_U15_S1920"]
    names = [path.name for path in paths.checkpoint_dir.iterdir()]
    for deleted in PERIODIC_BEFORE_FAILURE[:3]:
        assert [name for name in names if deleted in name] == [], deleted  # folders and trainer state alike
    assert [name for name in names if name.startswith(".") and name != ".lock"] == []
    for tag in ["E1_U12_S1536", "E1_U15_S1920", "latest"]:
        members = load_every_member(paths, tag)
        assert {(member.model_name, member.part) for member in members} == {
            *((name, "model") for name in SUBMODELS),
            *((name, "optim") for name in TRAINED),
            ("composite", "trainer"),
        }, tag
        for member in members:
            if member.part != "trainer":
                folder = store(paths).path(member, tag)
                assert {path.name for path in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "noether.th"}
    for tag in KEPT_TAGS[:2]:
        members = load_every_member(paths, tag)
        assert {member.model_name for member in members} == set(SUBMODELS)
        assert {member.part for member in members} == {"model"}
        assert all(payload["training_iteration"]["update"] == 9 for payload in members.values())


# --------------------------------------------------------------------------------- its resume in one process
def test_one_process_resumes_the_sharded_run_with_a_warning(resumed_in_one_process):
    log = resumed_in_one_process.log_file.read_text()
    assert "resuming from the newest complete checkpoint 'E1_U15_S1920'" in log
    warning = (
        "checkpoint 'E1_U15_S1920' was written by 2 process(es), this run has 1: "
        "random and callback states are taken from rank 0, so the run will not continue exactly"
    )
    assert log.count(warning) == 1


def test_one_process_keeps_writing_the_dcp_format_and_keep_last_n_goes_on(resumed_in_one_process):
    paths = resumed_in_one_process
    assert periodic_tags(paths) == ["E1_U15_S1920", "E2_U18_S2304"]
    assert not any("E1_U12_S1536" in path.name for path in paths.checkpoint_dir.iterdir())
    for tag in ("E2_U18_S2304", "last"):
        members = load_every_member(paths, tag)
        assert {member.model_name for member in members if member.part == "model"} == set(SUBMODELS), tag
        for member in members:
            written = store(paths).path(member, tag)
            if member.part == "trainer":
                assert written.suffix == ".th"
            else:  # one process: one shard file
                assert written.suffix == ".dcp" and written.is_dir(), written
                assert {path.name for path in written.iterdir()} == {".metadata", "__0_0.distcp", "noether.th"}, written
    assert not any(path.suffix == ".th" and "_trainer" not in path.name for path in paths.checkpoint_dir.iterdir())


def test_the_frozen_submodel_is_saved_unchanged_by_either_number_of_processes(failed_run, resumed_in_one_process):
    """Sharded (and written) by two processes, then loaded and written by one: always the built weights."""
    saved = [
        store(failed_run[0]).load(Member("composite.embed", "model"), "best_model.loss.val.total")["state_dict"],
        store(failed_run[0]).load(Member("composite.embed", "model"), "E1_U15_S1920")["state_dict"],
        store(resumed_in_one_process).load(Member("composite.embed", "model"), "last")["state_dict"],
    ]
    assert set(saved[0]) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
    assert saved[0]["body.0.weight"].shape == (32, 64)
    for other in saved[1:]:
        assert other.keys() == saved[0].keys()
        assert all(torch.equal(other[key], saved[0][key]) for key in saved[0])


# --------------------------------------------------------------------------------- frozen submodels
def test_a_sharded_checkpoint_without_the_frozen_submodel_resumes(tmp_path):
    """The README: frozen submodels are rebuilt from config and seed, not saved; a sharded checkpoint resumes
    with any number of processes. Shown here in one process (`.dcp` format, nothing sharded)."""
    checkpoint = {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_updates": 5}
    tree = tiny_config(tmp_path, max_epochs=None, max_updates=5, parallelism="fsdp", callbacks=[checkpoint])
    tree["model"] = composite_model_config()
    paths = train(tree)
    assert not store(paths).exists(Member("composite.embed", "model"), "E0_U5_S640")

    train(tree, resume="run", checkpoint="E0_U5_S640")
