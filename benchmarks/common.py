"""Shared helpers: statistics over repeats, progress logging, machine description, offline environment."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 42

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*The number of training batches.*")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import peft
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "lightning": lightning.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "os": platform.platform()}


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
