"""Which directory RUN names (`--resume`, `noether-eval --run`, `noether-ckpt`, `noether-plot`, PreviousRunInitializer):
only a directory that holds a run (its config.yaml), a bare id under output_path first; an unrelated folder of the
working directory is never taken for a run, let alone written into."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from noether.core.config import ConfigError
from noether.core.providers.path import PathProvider
from tests.conftest import run_cli, tiny_config


def make_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run_id: run\n")
    return run_dir


def make_unrelated_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    return folder


def test_a_bare_id_is_the_run_under_output_path_before_a_folder_of_that_name_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_unrelated_folder(tmp_path / "run")
    make_run(tmp_path / "outputs" / "run")
    make_run(tmp_path / "elsewhere" / "run")

    assert PathProvider.for_existing_run("run", "outputs").run_dir.resolve() == tmp_path / "outputs" / "run"
    # a path names the run directory itself; a bare id that is a run only in the working directory is that run
    assert PathProvider.for_existing_run(str(tmp_path / "elsewhere" / "run"), "outputs").run_dir == tmp_path / "elsewhere" / "run"
    assert PathProvider.for_existing_run("elsewhere/run", "outputs").run_dir.resolve() == tmp_path / "elsewhere" / "run"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert PathProvider.for_existing_run("run", "outputs").run_dir.resolve() == tmp_path / "elsewhere" / "run"


@pytest.mark.parametrize("run", ["folder", "{tmp}/folder", "outputs/folder"], ids=["bare-id", "absolute-path", "relative-path"])
def test_a_folder_that_holds_no_run_is_a_one_line_error(tmp_path, monkeypatch, run):
    monkeypatch.chdir(tmp_path)
    make_unrelated_folder(tmp_path / "folder")
    make_unrelated_folder(tmp_path / "outputs" / "folder")

    with pytest.raises(FileNotFoundError, match=r"folder is not a run directory \(it has no config.yaml\)") as error:
        PathProvider.for_existing_run(run.format(tmp=tmp_path), "outputs")
    assert "\n" not in str(error.value)


def test_a_nul_byte_in_a_run_id_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^run_id: 'a\\x00b' contains a NUL byte"):
        PathProvider("outputs", "a\0b")
    with pytest.raises(ConfigError, match=r"^run: 'a\\x00b' contains a NUL byte"):
        PathProvider.for_existing_run("a\0b", "outputs")


def test_resume_of_an_unrelated_folder_is_one_line_and_writes_nothing_into_it(tmp_path, write_config):
    folder = make_unrelated_folder(tmp_path / "data")
    config = write_config(tiny_config(tmp_path / "outputs"))

    result = run_cli("noether-train", str(config), "--resume", "data", cwd=tmp_path, check=False)

    assert result.returncode == 2
    assert result.stderr == (
        "noether-train: error: data is not a run directory (it has no config.yaml); "
        f"name a run id under {tmp_path / 'outputs'} or the directory of a run\n"
    )
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "outputs").exists()


def test_a_run_id_with_a_nul_byte_is_one_line(tmp_path, write_config):
    tree = tiny_config(tmp_path / "outputs")
    tree["run_id"] = "a\0b"
    config = write_config(tree)
    assert yaml.safe_load(config.read_text())["run_id"] == "a\0b"

    result = run_cli("noether-train", str(config), cwd=tmp_path, check=False)

    assert result.returncode == 2
    assert result.stderr == (
        "noether-train: error: run_id: 'a\\x00b' contains a NUL byte, which no file name can hold; pick another run_id\n"
    )
    assert not (tmp_path / "outputs").exists()
