"""`noether-ckpt list|verify|export` on a real run, as a user calls them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from noether.core.providers.path import PathProvider
from noether.training.run import train
from tests.conftest import run_cli, tiny_config
from tests.support.models import composite_model_config
from tests.tools.conftest import BEST_TAG, INTERRUPT_TAG


def ckpt(*args: str, cwd: Path, check: bool = True):
    return run_cli("noether-ckpt", *args, cwd=cwd, check=check)


def copy_of(run: PathProvider, tmp_path: Path) -> PathProvider:
    shutil.copytree(run.run_dir, tmp_path / run.run_id)
    return PathProvider(tmp_path, run.run_id)


def stored_weights(
    run: PathProvider, tag: str, model_name: str = "classifier", ema: float | None = None
) -> dict[str, torch.Tensor]:
    """The weights file as torch.load itself reads it (not through the CheckpointStore the export uses)."""
    ema_part = "" if ema is None else f"_ema={ema}"
    return torch.load(run.checkpoint_dir / f"{model_name}{ema_part}_cp={tag}_model.th", weights_only=True)["state_dict"]


MEMBER_FILE = re.compile(r"^classifier(?:_ema=[0-9.]+)?_cp=(?P<tag>.+)_(?:model|optim|trainer)\.th$")


def bytes_on_disk_by_tag(checkpoint_dir: Path) -> dict[str, int]:
    """The sum of the sizes (os.stat) of every file of each tag, read off the file names."""
    sizes: dict[str, int] = {}
    for entry in os.scandir(checkpoint_dir):
        if entry.is_file() and (match := MEMBER_FILE.match(entry.name)):
            sizes[match["tag"]] = sizes.get(match["tag"], 0) + os.stat(entry.path).st_size
    return sizes


def as_kb(size: int) -> list[str]:
    """A size as `list` prints it, split at the space: ["54.0", "kB"] (every set of this run is under 1 MB)."""
    assert 1000 <= size < 1000**2, size
    return [f"{size / 1000:.1f}", "kB"]


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        assert actual[key].contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), key


def test_list_shows_every_tag_oldest_first_with_files_size_and_best_metric(full_run):
    header, *lines = ckpt("list", str(full_run.run_dir), cwd=full_run.run_dir).stdout.splitlines()

    assert header.split() == ["tag", "iteration", "files", "size", "state", "loss/val/total"]
    by_tag = {line.split()[0]: line.split() for line in lines}
    assert set(by_tag) == {
        "E1_U9_S1152",
        "latest",
        "last",
        INTERRUPT_TAG,
        BEST_TAG,
        f"{BEST_TAG}.tolerance=0",
        f"{BEST_TAG}.tolerance=3",
    }
    assert lines[-1].split()[1] == "E1_U11_S1408"  # newest iteration last
    assert by_tag[INTERRUPT_TAG][2] == "classifier[weights,optimizer,trainer,ema=0.9]"
    assert by_tag[INTERRUPT_TAG][5] == "resumable"
    # the size column: each tag's files as the filesystem counts them (a file linked under two tags counts for each)
    sizes = bytes_on_disk_by_tag(full_run.checkpoint_dir)
    assert set(sizes) == set(by_tag)
    assert {tag: by_tag[tag][3:5] for tag in by_tag} == {tag: as_kb(size) for tag, size in sizes.items()}
    assert by_tag[BEST_TAG][2] == "classifier[weights]" and by_tag[BEST_TAG][5:7] == ["weights", "only"]
    # the best checkpoint's iteration is a validation point, so the metric's value there is listed
    metrics = [json.loads(line) for line in full_run.metrics_file.read_text().splitlines()]
    best_update = int(by_tag[BEST_TAG][1].split("_U")[1].split("_")[0])
    logged = [row["loss/val/total"] for row in metrics if row["update"] == best_update and "loss/val/total" in row]
    assert float(by_tag[BEST_TAG][-1]) == pytest.approx(logged[-1], rel=1e-5)
    assert by_tag["last"][-1] == "-"  # no validation at update 11


def test_list_and_verify_by_run_id_under_the_output_path_report_staged_leftovers(full_run, tmp_path):
    run = copy_of(full_run, tmp_path)
    staged = run.checkpoint_dir / ".classifier_cp=E2_U18_S2304_model.th~abc-0.staged"
    shutil.copy(run.checkpoint_dir / "classifier_cp=last_model.th", staged)

    lines = ckpt("list", run.run_id, "--output-path", str(tmp_path), cwd=tmp_path).stdout.splitlines()

    assert lines[-1].startswith(f"{staged.name} ") and "not usable: staged, never committed" in lines[-1]
    assert not any(line.startswith("E2_U18") for line in lines)
    verified = ckpt("verify", run.run_id, "--output-path", str(tmp_path), cwd=tmp_path).stdout.splitlines()
    assert verified[0] == f"{staged.name}: staged leftover of an unfinished save or deletion, not a checkpoint"
    assert verified[1].startswith("ok: all 19 files of 7 checkpoints")


def test_verify_passes_on_a_sound_run(full_run):
    result = ckpt("verify", str(full_run.run_dir), cwd=full_run.run_dir)
    assert result.stdout == "ok: all 19 files of 7 checkpoints load and agree\n"


def test_verify_names_a_truncated_file_and_a_file_that_is_not_a_checkpoint(full_run, tmp_path):
    run = copy_of(full_run, tmp_path)
    damaged = run.checkpoint_dir / "classifier_cp=latest_optim.th"
    os.truncate(damaged, damaged.stat().st_size // 2)
    replaced = run.checkpoint_dir / "classifier_ema=0.9_cp=last_model.th"
    torch.save(torch.zeros(3), replaced)

    result = ckpt("verify", str(run.run_dir), cwd=tmp_path, check=False)

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{damaged.name}: checkpoint file is truncated or corrupt",
        f"{replaced.name}: refusing to load it: it holds a Tensor, not a checkpoint dict",
    ]


def test_verify_names_both_files_of_two_swapped_tags(full_run, tmp_path):
    run = copy_of(full_run, tmp_path)
    first, second = run.checkpoint_dir / "classifier_cp=E1_U9_S1152_model.th", run.checkpoint_dir / "classifier_cp=last_model.th"
    first.rename(tmp_path / "swap")
    second.rename(first)
    (tmp_path / "swap").rename(second)

    result = ckpt("verify", str(run.run_dir), cwd=tmp_path, check=False)

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{first.name}: stamps disagree: written at E1_U11_S1408, but its tag names E1_U9_S1152",
        f"{second.name}: stamps disagree: written at E1_U9_S1152, the rest of 'last' at E1_U11_S1408",
    ]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_round_trips_the_weights_bit_identically(full_run, tmp_path, suffix):
    output = tmp_path / f"best{suffix}"
    ckpt("export", str(full_run.run_dir), "--checkpoint", BEST_TAG, "--output", str(output), cwd=tmp_path)

    expected = stored_weights(full_run, BEST_TAG)
    if suffix == ".pt":
        assert_bit_identical(torch.load(output, weights_only=True), expected)
        return
    assert_bit_identical(load_file(output), expected)
    with safe_open(output, "pt") as exported:
        metadata = exported.metadata()
    stamped = torch.load(full_run.checkpoint_dir / f"classifier_cp={BEST_TAG}_model.th", weights_only=True)["training_iteration"]
    assert metadata == {
        "checkpoint_tag": BEST_TAG,
        "training_iteration": "E{epoch}_U{update}_S{sample}".format(**stamped),
        "run_id": "run",
        "model_name": "classifier",
    }


def test_export_of_ema_weights(full_run, tmp_path):
    output = tmp_path / "ema.safetensors"
    ckpt("export", str(full_run.run_dir), "--checkpoint", INTERRUPT_TAG, "--ema", "0.9", "--output", str(output), cwd=tmp_path)

    expected = stored_weights(full_run, INTERRUPT_TAG, ema=0.9)
    assert_bit_identical(load_file(output), expected)
    assert not all(torch.equal(expected[k], v) for k, v in stored_weights(full_run, INTERRUPT_TAG).items())


def test_export_writes_tied_weights_as_separate_copies_and_names_them(tmp_path):
    from noether.tools.checkpoints import _save_safetensors

    shared = torch.randn(4, 3)
    state_dict = {
        "embed.weight": shared,
        "head.weight": shared,
        "head.bias": torch.randn(8)[2:6],
        "proj.weight": torch.randn(3, 4).t(),
    }
    _save_safetensors(state_dict, tmp_path / "tied.safetensors", {})

    assert_bit_identical(load_file(tmp_path / "tied.safetensors"), state_dict)
    with safe_open(tmp_path / "tied.safetensors", "pt") as exported:
        assert exported.metadata()["tied_keys"] == '[["embed.weight", "head.weight"]]'


@pytest.fixture(scope="module")
def composite_run(tmp_path_factory) -> PathProvider:
    tree = tiny_config(tmp_path_factory.mktemp("composite"), max_epochs=1)
    tree["model"] = composite_model_config()
    tree["trainer"]["callbacks"] = [{"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1}]
    return train(tree)


def test_export_of_a_composite_model_whole_and_one_submodel(composite_run, tmp_path):
    whole, head = tmp_path / "whole.safetensors", tmp_path / "head.pt"
    ckpt("export", str(composite_run.run_dir), "--checkpoint", "last", "--output", str(whole), cwd=tmp_path)
    ckpt("export", str(composite_run.run_dir), "--checkpoint", "last", "--model", "head", "--output", str(head), cwd=tmp_path)

    encoder, head_weights = (stored_weights(composite_run, "last", f"composite.{name}") for name in ("encoder", "head"))
    expected_whole = {**{f"encoder.{k}": v for k, v in encoder.items()}, **{f"head.{k}": v for k, v in head_weights.items()}}
    assert_bit_identical(load_file(whole), expected_whole)
    assert_bit_identical(torch.load(head, weights_only=True), head_weights)
    with safe_open(whole, "pt") as exported:
        assert exported.metadata()["model_name"] == "composite"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "no-such-run"], "noether-ckpt: error: unknown run 'no-such-run'"),
        (["export", "{run}", "--checkpoint", "nope", "--output", "x.pt"], "noether-ckpt: error: no checkpoint 'nope' in "),
        (
            ["export", "{run}", "--checkpoint", "last", "--ema", "0.5", "--output", "x.pt"],
            "noether-ckpt: error: checkpoint 'last' has no EMA 0.5 weights (EMA factors: 0.9)",
        ),
        (
            ["export", "{run}", "--checkpoint", "last", "--ema", "fast", "--output", "x.pt"],
            "noether-ckpt: error: --ema must be an EMA factor",
        ),
        (
            ["export", "{run}", "--checkpoint", "last", "--model", "head", "--output", "x.pt"],
            "noether-ckpt: error: no model 'head' in this checkpoint; its models: classifier",
        ),
        (
            ["export", "{run}", "--checkpoint", "last", "--output", "x.npz"],
            "noether-ckpt: error: --output must end in .safetensors or .pt",
        ),
    ],
)
def test_bad_arguments_end_in_one_line_and_exit_code_2(full_run, tmp_path, args, message):
    result = ckpt(*(arg.format(run=full_run.run_dir) for arg in args), cwd=tmp_path, check=False)

    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not list(tmp_path.iterdir())
