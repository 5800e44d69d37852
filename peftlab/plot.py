"""``peftlab plot RUN_DIR``: learning curves (PNG) from a run's metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from peftlab.errors import PeftLabError


def read_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} for every metric column of a CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_run(run_dir: str, output: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_csv = Path(run_dir) / "metrics.csv"
    if not metrics_csv.is_file():
        raise PeftLabError(f"{run_dir} has no metrics.csv; give a run directory written by the CSV logger "
                           "(runs/NAME/version_N)")
    series = read_series(metrics_csv)
    curves = {k: v for k, v in series.items() if len(v) > 1 and not k.startswith(("test/", "time/"))}
    if not curves:
        raise PeftLabError(f"{metrics_csv} has no metric with more than one point yet")
    groups = sorted({k.split("/")[-1] for k in curves})  # loss, acc, f1, ppl: one panel each
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False)
    for ax, name in zip(axes[0], groups):
        for key in sorted(k for k in curves if k.split("/")[-1] == name):
            steps, values = zip(*curves[key])
            ax.plot(steps, values, marker="." if key.startswith("val/") else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(output or Path(run_dir) / "learning_curves.png")
    fig.savefig(out, dpi=110)
    return out


def plot_command(run: str, /, *, output: str | None = None) -> Path:
    """Plot a run's learning curves (metrics.csv) to a PNG.

    One panel per metric name (loss, acc, ...), training and validation curves together, from the metrics.csv
    that the CSV logger writes into the run directory.

    Args:
        run: run directory (runs/NAME/version_N)
        output: PNG path (default: <run>/learning_curves.png)

    Examples:
        peftlab plot runs/quickstart/version_0
    """
    path = plot_run(run, output)
    print(f"[peftlab] wrote {path}")
    return path
