"""What a run needs to be reproduced besides its config: seed, library versions, code version, command,
and the data it actually used.

``PeftModule.on_fit_start`` writes it to ``<run dir>/run.json`` (next to Lightning's ``config.yaml``, the
resolved config); exported adapters carry the same record in ``peftlab_meta.json``. When ``run_record`` gets
a module whose trainer has a DataModule with a ``run_record()`` method (``PeftDataModule``), that description
of the data (split sizes, class names, the few-shot rows in ``few_shot_ids``) is stored under ``data``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import TextIO

LIBRARIES = ("peftlab", "torch", "lightning", "transformers", "peft", "bitsandbytes", "datasets",
             "torchmetrics", "jsonargparse", "safetensors", "numpy")


class _Lines(logging.Formatter):
    """``[prefix HH:MM:SS] message``; a record with ``verbatim`` (a line another process already stamped, shown
    behind e.g. ``[w1] ``) is that text and the message as they are."""

    def __init__(self, prefix: str):
        super().__init__("[" + prefix.replace("%", "%%") + " %(asctime)s] %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        verbatim = getattr(record, "verbatim", None)
        return super().format(record) if verbatim is None else f"{verbatim}{record.getMessage()}"


class _Stdout(logging.StreamHandler):
    """Writes to the stream it was given, or else to ``sys.stdout`` as it is at each line (where print writes)."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream or sys.stdout)
        self._follow = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow:
            self.stream = sys.stdout
        super().emit(record)


def logger(prefix: str, stream: TextIO | None = None):
    """The ``info`` of the logger ``peftlab.<prefix>``: ``[prefix HH:MM:SS] message`` lines, flushed (they are read
    while the work runs), on ``stream`` or else on ``sys.stdout``. ``extra={"verbatim": "[w1] "}`` shows a line
    another process already stamped behind that text. Calling it again replaces the logger's handler."""
    log = logging.getLogger(f"peftlab.{prefix}")
    for handler in [h for h in log.handlers if isinstance(h, _Stdout)]:
        log.removeHandler(handler)
    handler = _Stdout(stream)
    handler.setFormatter(_Lines(prefix))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the lines are the command's output, not records for the application's handlers
    return log.info


def machine() -> dict:
    """The machine a measurement ran on (CPU model, cores, torch threads, GPU, OS) and the main library versions:
    what benchmarks and studies record beside their numbers."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = library_versions()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": versions["transformers"],
            "peft": versions["peft"], "lightning": versions["lightning"],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "os": platform.platform()}


def machine_line() -> str:
    """The machine in one line, as result pages print it: ``<cpu>, N CPU cores, torch X, no GPU | CUDA <card>``."""
    import torch

    gpu = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=8)
def git_commit(directory: str | None = None) -> dict | None:
    """HEAD of the git checkout the run was started from, and whether it had uncommitted changes."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=directory, capture_output=True, text=True,  # noqa: E731
                                        timeout=5, check=True).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def data_record(module) -> dict | None:
    """``run_record()`` of the DataModule of ``module``'s trainer, or ``None`` if there is none.

    Never asks the trainer for ``log_dir`` (a collective under a distributed strategy).
    """
    try:
        trainer = module.trainer
    except RuntimeError:  # a LightningModule not attached to a Trainer
        return None
    describe = getattr(getattr(trainer, "datamodule", None), "run_record", None)
    return describe() if callable(describe) else None


def run_record(module=None) -> dict:
    """The record for ``run.json``; with ``module`` also its method, backbone, parameter counts and data."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    record = {
        "seed": int(seed) if seed is not None else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else [],
        "versions": dict(library_versions()),
        "git": git_commit(),
        "platform": platform.platform(),
    }
    if module is not None:
        record["method"] = f"{type(module).__module__}.{type(module).__qualname__}"
        record["backbone"] = module.hparams.get("backbone")
        record["trainable"] = module.trainable_count
        record["total"] = module.total_count
        data = data_record(module)
        if data is not None:
            record["data"] = data
    return record


def write_run_record(directory: str, module=None) -> str:
    """Write ``run_record(module)`` to ``<directory>/run.json`` (atomically); return the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "run.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(run_record(module), f, indent=2)
    os.replace(tmp, path)
    return path
