"""`noether-plot`: a run's metrics.jsonl as PNG figures, one per metric group, with the best points marked.

Groups: losses, accuracies, learning rates, other metrics, and one figure per `ema=`/`best=` family
(the metrics their evaluation callbacks log). Training curves are lines, evaluation curves lines
with markers, all over updates with the epochs ticked on top. For every best-checkpoint callback
of the run's config, its best value is marked and, for each tolerance, the update at which
training would have stopped (replayed from the logged metric the way the callback decides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from noether.core.config import load_yaml
from noether.core.providers.metric_property import MetricPropertyProvider
from noether.core.providers.path import PathProvider
from noether.tools.checkpoints import RunToolError, best_callback_configs, metric_rows

COUNTERS = ("epoch", "update", "sample")
FAMILY = re.compile(r"^((?:best|ema)=[^/]+)/")
TRAINING_MARKERS = ("online", "train")


@dataclass
class BestMarks:
    metric_key: str
    best: tuple[int, float] | None
    """(update, value) of the best logged value."""
    stops: dict[int, tuple[int, float]]
    """tolerance -> (update at which it was exceeded, best value up to then)."""
    tolerances: list[int]


def plot_run(paths: PathProvider, output_dir: Path) -> list[Path]:
    """Write one PNG per metric group of the run into `output_dir`; returns the files written."""
    if not paths.metrics_file.exists():
        raise FileNotFoundError(f"nothing to plot: {paths.run_dir} has no metrics.jsonl yet")
    rows = metric_rows(paths.metrics_file)
    groups = group_metrics(rows)
    marks = best_marks(paths, rows)
    epoch_ticks = _epoch_ticks(rows)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunToolError(f"--output {output_dir} is a file; name a directory for the plots")
    written = []
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for group, keys in groups.items():
            path = output_dir / f"{group.replace(' ', '_').replace('/', '.')}.png"
            _plot_group(group, keys, rows, [m for m in marks if m.metric_key in keys], epoch_ticks, path)
            written.append(path)
    except OSError as error:
        reason = error.strerror or error
        raise RunToolError(f"cannot write the plots into {output_dir}: {reason}; pass --output DIR for another place") from None
    return written


def group_metrics(rows: list[dict[str, float]]) -> dict[str, list[str]]:
    """Metric keys by figure; the end-of-training `best/...` summaries are single values, not curves."""
    groups: dict[str, list[str]] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        if key in COUNTERS or key.startswith("best/"):
            continue
        family = FAMILY.match(key)
        if family is not None:
            group = family[1]
        elif "loss" in key:
            group = "losses"
        elif "acc" in key:
            group = "accuracies"
        elif key.startswith("lr") or "/lr" in key or "learning_rate" in key:
            group = "learning rates"
        else:
            group = "other metrics"
        groups.setdefault(group, []).append(key)
    return groups


def best_marks(paths: PathProvider, rows: list[dict[str, float]]) -> list[BestMarks]:
    """Replays each best-checkpoint callback over its logged metric: its best and its tolerances' stop points."""
    config = load_yaml(paths.config_file) if paths.config_file.exists() else {}
    properties = MetricPropertyProvider(config.get("metric_higher_is_better"))
    marks = []
    for entry in best_callback_configs(paths):
        key = entry["metric_key"]
        try:
            higher_is_better = properties.higher_is_better(key)
        except ValueError:
            continue  # the run itself could not have tracked it
        best: tuple[int, float] | None = None
        stops: dict[int, tuple[int, float]] = {}
        since_best = 0
        for row in rows:
            if key not in row:
                continue
            value = row[key]
            if best is None or (value > best[1] if higher_is_better else value < best[1]):
                best, since_best = (row["update"], value), 0
                continue
            since_best += 1
            for tolerance in entry.get("tolerances") or []:
                if tolerance not in stops and since_best > tolerance:
                    stops[tolerance] = (row["update"], best[1])
        marks.append(BestMarks(key, best, stops, entry.get("tolerances") or []))
    return marks


def _epoch_ticks(rows: list[dict[str, float]]) -> dict[int, int]:
    """epoch -> the first update logged with that many epochs done."""
    ticks: dict[int, int] = {}
    for row in rows:
        if "epoch" in row and "update" in row and row["epoch"] > 0:
            ticks.setdefault(int(row["epoch"]), int(row["update"]))
    return ticks


def _plot_group(
    group: str, keys: list[str], rows: list[dict[str, float]], marks: list[BestMarks], epoch_ticks: dict[int, int], path: Path
) -> None:
    figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for key in keys:
        points = [(row["update"], row[key]) for row in rows if key in row and "update" in row]
        updates, values = zip(*points)
        training = any(marker in key.split("/") for marker in TRAINING_MARKERS)
        axes.plot(updates, values, label=key, linewidth=1.2, marker=None if training or len(points) > 50 else "o", markersize=3)
    for mark in marks:
        if mark.best is not None:
            axes.plot(
                *mark.best,
                marker="*",
                markersize=14,
                color="gold",
                markeredgecolor="black",
                linestyle="none",
                label=f"best {mark.metric_key} = {mark.best[1]:.4g} (update {mark.best[0]})",
            )
        for tolerance, (update, value) in sorted(mark.stops.items()):
            line = axes.axvline(update, linestyle="--", linewidth=1, color="gray")
            axes.annotate(
                f"tolerance={tolerance} stop\nbest {value:.4g}",
                (update, 1),
                xycoords=line.get_transform(),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                fontsize=8,
                color="dimgray",
            )
        for tolerance in (t for t in mark.tolerances if t not in mark.stops):
            axes.plot([], [], linestyle="none", label=f"tolerance={tolerance}: not exceeded")
    axes.set_xlabel("update")
    axes.set_title(group)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if epoch_ticks:
        epochs = axes.secondary_xaxis("top")
        epochs.set_xticks(list(epoch_ticks.values()), [f"E{epoch}" for epoch in epoch_ticks])
        epochs.set_xlabel("epoch")
    figure.savefig(path, dpi=100)
    plt.close(figure)
