"""Shared helpers: statistics over repeats, progress logging, machine description, offline environment."""

from __future__ import annotations

import math
import os
import statistics
import warnings
from pathlib import Path

from peftlab.runinfo import logger, machine  # noqa: F401 - machine: recorded beside every benchmark's numbers

ROOT = Path(__file__).resolve().parents[1]
SEED = 42

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*The number of training batches.*")


log = logger("bench")


def summary(values: list[float]) -> dict:
    """Median and spread (min, max, relative half-range) of repeated measurements."""
    values = [float(v) for v in values]
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "n": len(values),
            "spread_pct": 100.0 * (hi - lo) / 2 / med if med else math.nan, "values": values}


def ratio_summary(a: list[float], b: list[float]) -> dict:
    """Ratios a_i / b_i of paired (interleaved) repeats: the median ratio and its spread."""
    return summary([x / y for x, y in zip(a, b)])




def quiet():
    """Silence transformers' load reports and progress bars the same way the peftlab CLI does."""
    from peftlab.cli import _quiet_libraries

    _quiet_libraries()
    import logging

    import datasets
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; override them after

    datasets.disable_progress_bars()

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
