"""`noether-plot` on real runs: the PNGs it writes, with and without best-checkpoint callbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image

from noether.core.providers.path import PathProvider
from noether.tools.plot import best_marks
from noether.training.run import train
from tests.conftest import run_cli, tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_readable_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE), path
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100, path


def test_plots_every_metric_group_of_a_run_still_writing_its_metrics(full_run, tmp_path):
    run = PathProvider(tmp_path, full_run.run_id)
    shutil.copytree(full_run.run_dir, run.run_dir)
    with run.metrics_file.open("a") as metrics:
        metrics.write('{"epoch": 1, "update": 12, "sam')  # a line being written right now

    printed = run_cli("noether-plot", str(run.run_dir), cwd=tmp_path).stdout.splitlines()

    plots = run.run_dir / "plots"
    names = ["losses.png", "best=loss.val.total.png", "learning_rates.png", "ema=0.9.png"]
    assert printed == [str(plots / name) for name in names]
    assert sorted(path.name for path in plots.iterdir()) == sorted(names)
    assert_readable_pngs(sorted(plots.iterdir()))


def test_best_marks_replay_the_callback_decisions(full_run):
    (marks,) = best_marks(
        full_run, [{"update": u, "loss/val/total": v} for u, v in [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.6), (10, 1.0)]]
    )

    assert marks.metric_key == "loss/val/total"
    assert marks.best == (10, 1.0)
    assert marks.stops == {0: (6, 2.0)}  # tolerance 3 was never exceeded


def test_plots_a_run_without_best_callbacks_into_the_given_directory(tmp_path):
    run = train(tiny_config(tmp_path, max_epochs=1, log_every_n_updates=2))

    printed = run_cli(
        "noether-plot", run.run_id, "--output-path", str(tmp_path), "--output", str(tmp_path / "figures"), cwd=tmp_path
    ).stdout

    written = sorted((tmp_path / "figures").iterdir())
    assert sorted(printed.split()) == [str(path) for path in written]
    assert [path.name for path in written] == ["learning_rates.png", "losses.png"]
    assert_readable_pngs(written)


def test_an_unknown_run_is_one_line_and_exit_code_2(tmp_path):
    result = run_cli("noether-plot", "missing", cwd=tmp_path, check=False)

    assert result.returncode == 2
    assert result.stderr == "noether-plot: error: unknown run 'missing': neither a directory nor a run id under outputs\n"
