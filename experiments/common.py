"""Shared helpers of the experiment runners: run `peftlab fit` per configuration, collect, report.

Each run is a real `peftlab fit` subprocess (same CLI as users), writing to
``runs/experiments/<study>/<run>/version_0``; results are read back from its metrics.csv and exported
adapter metadata. Reports go to ``docs/results/<study>.md`` with a PNG plot.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from peftlab.runinfo import logger  # noqa: F401 - the experiments' progress lines
from peftlab.runinfo import machine_line as machine  # noqa: F401 - the result pages' machine line

ROOT = Path(__file__).resolve().parents[1]
# PEFTLAB_RESULTS_DIR: where reports go instead (the tests regenerate them there and compare with docs/)
RESULTS = Path(os.environ.get("PEFTLAB_RESULTS_DIR") or ROOT / "docs" / "results")
PEFTLAB = [sys.executable, "-m", "peftlab"]


def run_fit(study: str, name: str, args: list[str], log) -> dict:
    """Run one `peftlab fit`; return its final metrics, parameter counts and timing."""
    save_dir = ROOT / "runs" / "experiments" / study
    run_dir = save_dir / name / "version_0"
    if run_dir.exists():  # a re-run replaces the earlier one (its metrics.csv and checkpoints would mix in)
        shutil.rmtree(run_dir)
    cmd = [*PEFTLAB, "fit", *args, "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
           "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name,
           "--trainer.logger.init_args.version", "version_0", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.callbacks+=peftlab.callbacks.EpochTimer"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    seconds = time.time() - start
    if proc.returncode != 0:
        log(f"  FAILED {name}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        return {"name": name, "failed": (proc.stderr or "")[-2000:], "seconds": seconds}
    result = {"name": name, "seconds": seconds, "command": "peftlab fit " + " ".join(args)}
    result.update(read_metrics(run_dir / "metrics.csv"))
    meta = run_dir / "adapter" / "last" / "peftlab_meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        result.update(trainable=m["trainable"], total=m["total"], method=m["method"].rsplit(".", 1)[-1])
    return result


def read_metrics(path: Path) -> dict:
    """Last value of every metric column; epoch times averaged."""
    out: dict = {}
    epoch_times = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value in ("", None) or key in ("epoch", "step"):
                    continue
                if key == "time/train_epoch_s":
                    epoch_times.append(float(value))
                out[key] = float(value)
    if epoch_times:
        out["time/train_epoch_s"] = sum(epoch_times) / len(epoch_times)
    return out


def save_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def save_figure(fig, name: str, alt: str) -> str:
    """Save ``fig`` as ``docs/results/<name>.png``; return the markdown line that shows it."""
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    return f"![{alt}]({name}.png)"


def publish(name: str, text: str) -> None:
    """Write a study's report to ``docs/results/<name>.md`` and print it."""
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
