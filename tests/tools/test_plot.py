"""`noether-plot` on real runs: the curves each figure draws, with and without best-checkpoint callbacks,
also while the run is still training.

What a figure shows is read from the figure itself just before it is saved (its lines' data), and
compared with metrics.jsonl read here, so that an empty or incomplete figure cannot pass.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from matplotlib.figure import Figure

from noether.cli import plot_main
from noether.core.providers.path import PathProvider
from noether.tools.plot import best_marks
from noether.training.run import train
from tests.conftest import cli_command, cli_env, run_cli, tiny_config
from tests.tools.conftest import full_run_tree

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the figures of a run configured like `full_run_tree`, and the metric curves each one draws
FULL_RUN_FIGURES = {
    "losses.png": ["loss/online/total", "loss/val/total"],
    "best=loss.val.total.png": ["best=loss.val.total/loss/test/total"],
    "learning_rates.png": ["lr/classifier"],
    "ema=0.9.png": ["ema=0.9/loss/test/total"],
}
BEST_KEY = "loss/val/total"


@pytest.fixture
def drawn(monkeypatch) -> dict[str, list[dict[str, Any]]]:
    """Every figure saved, by file name: the label and data of each line of its axes, read just before
    the real savefig writes the file."""
    figures: dict[str, list[dict[str, Any]]] = {}
    real_savefig = Figure.savefig

    def savefig(figure: Figure, fname: Any, *args: Any, **kwargs: Any) -> Any:
        lines = [line for axes in figure.axes for line in axes.get_lines()]
        figures[Path(fname).name] = [
            {"label": line.get_label(), "x": [float(x) for x in line.get_xdata()], "y": [float(y) for y in line.get_ydata()]}
            for line in lines
        ]
        return real_savefig(figure, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def complete_rows(metrics_file: Path) -> list[dict[str, float]]:
    """metrics.jsonl as written so far, without a line still being written."""
    text = metrics_file.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def series(rows: list[dict[str, float]], key: str) -> list[tuple[float, float]]:
    return [(float(row["update"]), float(row[key])) for row in rows if key in row]


def curves(lines: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    return {
        line["label"]: list(zip(line["x"], line["y"]))
        for line in lines
        if not line["label"].startswith(("_", "best ", "tolerance="))
    }


def assert_pngs(directory: Path, names: list[str]) -> None:
    assert sorted(path.name for path in directory.iterdir()) == sorted(names)
    for name in names:
        assert (directory / name).read_bytes().startswith(PNG_SIGNATURE), name


def assert_best_star(lines: list[dict[str, Any]], plotted: list[tuple[float, float]]) -> None:
    """The star sits on the first lowest value of the validation loss the figure shows."""
    lowest = min(plotted, key=lambda point: point[1])
    [star] = [line for line in lines if line["label"].startswith(f"best {BEST_KEY} = ")]
    assert list(zip(star["x"], star["y"])) == [lowest]


def test_plots_a_run_while_it_trains(tmp_path, drawn, capsys):
    """A real training process keeps appending to metrics.jsonl while the plot reads it: every curve
    drawn is the metric's series as logged (all of it that was there when the plot started, nothing
    that was never logged), and the run goes on training."""
    tree = full_run_tree(tmp_path / "outputs")
    tree["trainer"]["callbacks"] = [c for c in tree["trainer"]["callbacks"] if "interrupting" not in c["kind"]]
    tree["trainer"]["max_epochs"] = 10_000
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    run = PathProvider(tmp_path / "outputs", "run")
    output = tmp_path / "training.out"
    with output.open("w") as out:
        process = subprocess.Popen(
            [cli_command("noether-train"), str(config)], cwd=tmp_path, env=cli_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while not (run.metrics_file.exists() and series(complete_rows(run.metrics_file), "ema=0.9/loss/test/total")):
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.05)
        before = complete_rows(run.metrics_file)

        assert plot_main([str(run.run_dir)]) == 0

        assert process.poll() is None, "the run had ended: this was no plot of a run that still trains"
        after = complete_rows(run.metrics_file)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, output.read_text()[-3000:]
    finally:
        process.kill()

    plots = run.run_dir / "plots"
    assert capsys.readouterr().out.splitlines() == [str(plots / name) for name in FULL_RUN_FIGURES]
    assert_pngs(plots, list(FULL_RUN_FIGURES))
    for name, keys in FULL_RUN_FIGURES.items():
        plotted = curves(drawn[name])
        assert sorted(plotted) == sorted(keys), name
        for key in keys:
            logged = series(after, key)
            assert len(series(before, key)) <= len(plotted[key]), f"{name}: {key} lacks points logged before the plot started"
            assert plotted[key] == logged[: len(plotted[key])], f"{name}: {key} is not the logged series"
    assert len(curves(drawn["losses.png"])[BEST_KEY]) >= 2
    assert_best_star(drawn["losses.png"], curves(drawn["losses.png"])[BEST_KEY])


def test_a_line_being_written_is_left_out_and_every_curve_is_drawn(full_run, tmp_path, drawn, capsys):
    run = PathProvider(tmp_path, full_run.run_id)
    shutil.copytree(full_run.run_dir, run.run_dir)
    rows = complete_rows(run.metrics_file)
    with run.metrics_file.open("a") as metrics:
        metrics.write('{"epoch": 1, "update": 12, "loss/val/total": 0.0, "sam')  # a line being written right now

    assert plot_main([str(run.run_dir)]) == 0

    plots = run.run_dir / "plots"
    assert capsys.readouterr().out.splitlines() == [str(plots / name) for name in FULL_RUN_FIGURES]
    assert_pngs(plots, list(FULL_RUN_FIGURES))
    for name, keys in FULL_RUN_FIGURES.items():
        assert curves(drawn[name]) == {key: series(rows, key) for key in keys}, name
    assert_best_star(drawn["losses.png"], series(rows, BEST_KEY))


def test_best_marks_replay_the_callback_decisions(full_run):
    (marks,) = best_marks(
        full_run, [{"update": u, "loss/val/total": v} for u, v in [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.6), (10, 1.0)]]
    )

    assert marks.metric_key == "loss/val/total"
    assert marks.best == (10, 1.0)
    assert marks.stops == {0: (6, 2.0)}  # tolerance 3 was never exceeded


def test_plots_a_run_without_best_callbacks_into_the_given_directory(tmp_path, drawn, capsys):
    run = train(tiny_config(tmp_path, max_epochs=1, log_every_n_updates=2))
    capsys.readouterr()  # the training log

    assert plot_main([run.run_id, "--output-path", str(tmp_path), "--output", str(tmp_path / "figures")]) == 0

    names = ["losses.png", "learning_rates.png"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "figures" / name) for name in names]
    assert_pngs(tmp_path / "figures", names)
    rows = complete_rows(run.metrics_file)
    assert curves(drawn["losses.png"]) == {"loss/online/total": series(rows, "loss/online/total")}
    assert curves(drawn["learning_rates.png"]) == {"lr/classifier": series(rows, "lr/classifier")}
    assert len(series(rows, "loss/online/total")) == 4  # updates 2, 4, 6, 8 of 9
    assert not any(line["label"].startswith("best ") for lines in drawn.values() for line in lines)


def test_an_unknown_run_is_one_line_and_exit_code_2(tmp_path):
    result = run_cli("noether-plot", "missing", cwd=tmp_path, check=False)

    assert result.returncode == 2
    assert result.stderr == "noether-plot: error: unknown run 'missing': neither a directory nor a run id under outputs\n"
