"""Content hashes: every checkpoint file's xxh3 digest is recorded with its set as it is written; a file whose
bytes changed afterwards is named by `noether-ckpt verify`, refused by `--resume --checkpoint`, and skipped
by a resume without `--checkpoint`, which takes the newest sound set instead and continues exactly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from noether.core.checkpoint_store import CheckpointStore
from noether.core.writers.checkpoint_writer import CheckpointLoadError
from noether.training.run import train
from tests.conftest import run_cli, tiny_config

PERIODIC, FAILED = "E1_U9_S1152", "E1_U14_S1792.error"
CALLBACKS = [
    {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_epochs": 1, "save_optim": True},
    {"kind": "noether.core.callbacks.EmaCallback", "every_n_epochs": 1, "target_factors": [0.9]},
    {"kind": "noether.training.callbacks.OfflineLossCallback", "every_n_epochs": 1, "dataset_key": "val"},
    {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/val/total"},
]


def flip_bytes(path: Path, count: int = 8) -> None:
    """Invert `count` bytes in the middle of a file, as a bad disk sector or a broken transfer would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(byte ^ 0xFF for byte in data[middle : middle + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> Path:
    """A run with a periodic set after epoch 1 and an error set at update 14 (the newest)."""
    root = tmp_path_factory.mktemp("hashed")
    tree = tiny_config(root, callbacks=[*CALLBACKS, {"kind": "tests.support.failing.FailAtUpdateCallback", "at_update": 14}])
    with pytest.raises(RuntimeError, match="test failure after update 14"):
        train(tree)
    return root / "run"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def test_every_set_records_the_hash_of_each_of_its_files(failed_run):
    store = CheckpointStore(failed_run / "checkpoints", "run")
    for info in store.tags():
        hashes = json.loads((failed_run / "checkpoints" / f"classifier_cp={info.tag}_hashes.json").read_text())
        assert len(hashes["xxh3_64"]) == len(info.files), info.tag
        check = store.content_check(info.tag)
        assert check.changed == [] and check.unhashed == [], info.tag


@pytest.mark.parametrize("part", ["model", "optim", "trainer"])
def test_a_changed_file_is_named_by_verify_and_refused_by_an_explicit_resume(failed_run, tmp_path, part):
    run_dir = copy_of(failed_run, tmp_path)
    damaged = run_dir / "checkpoints" / f"classifier_cp={FAILED}_{part}.th"
    flip_bytes(damaged)
    torch.load(damaged, weights_only=True)  # no zip CRC: the bytes still load, which is why hashes are needed

    verify = run_cli("noether-ckpt", "verify", str(run_dir), cwd=tmp_path, check=False)
    assert verify.returncode == 1
    assert f"{damaged.name}: its bytes changed since it was written (content hash differs)" in verify.stdout

    tree = tiny_config(tmp_path, callbacks=CALLBACKS)
    with pytest.raises(CheckpointLoadError, match=re.escape(f"checkpoint '{FAILED}' is damaged: {damaged} is not the file")):
        train(tree, resume=str(run_dir), checkpoint=FAILED)


def test_a_resume_without_a_checkpoint_skips_a_damaged_set_and_continues_exactly_from_the_newest_sound_one(failed_run, tmp_path):
    tree = tiny_config(tmp_path, callbacks=CALLBACKS)
    explicit = copy_of(failed_run, tmp_path / "explicit")
    train(tree, resume=str(explicit), checkpoint=PERIODIC)

    fallback = copy_of(failed_run, tmp_path / "fallback")
    flip_bytes(fallback / "checkpoints" / f"classifier_ema=0.9_cp={FAILED}_model.th")
    paths = train(tree, resume=str(fallback))
    log = paths.log_file.read_text()
    assert f"checkpoint '{FAILED}' (E1_U14_S1792) is skipped: classifier_ema=0.9_cp={FAILED}_model.th changed" in log
    assert f"resuming from the newest complete checkpoint '{PERIODIC}'" in log
    for name in ("classifier_cp=last_model.th", "classifier_ema=0.9_cp=last_model.th"):
        expected = torch.load(explicit / "checkpoints" / name, weights_only=True)["state_dict"]
        resumed = torch.load(fallback / "checkpoints" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name


def test_a_set_without_hashes_loads_and_is_reported_as_such(failed_run, tmp_path):
    run_dir = copy_of(failed_run, tmp_path)
    best = next((run_dir / "checkpoints").glob("classifier_cp=best_model.*_hashes.json"))
    best.unlink()  # as written before content hashes were recorded
    verify = run_cli("noether-ckpt", "verify", str(run_dir), cwd=tmp_path, check=False)
    assert verify.returncode == 0, verify.stdout
    assert "_model.th: no hash (written before content hashes were recorded), loads" in verify.stdout
