"""Start-up (item 6): ``peftlab --help`` wall time and the time from ``peftlab fit`` start to the first step.

* ``peftlab --help``: the console script in a fresh subprocess, median of several runs; plus one
  ``python -X importtime`` run of the same command, from which the cumulative import time of the heavy
  packages is read (to name what the time goes to).
* ``peftlab fit`` to first step: ``peftlab fit --config <shipped config> --trainer.max_steps 1`` in a
  subprocess, with :class:`FirstStep` added as a callback; it prints wall-clock timestamps of Lightning's
  ``setup`` (CLI parsed, model and data built, data prepared), ``on_train_start`` (after the sanity-check
  validation) and the first ``on_train_batch_start``, which are subtracted from the moment the parent
  launched the process. Tokenized data is in the datasets cache (any earlier run), as it is for a user's
  second run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from benchmarks.common import ROOT, log, summary

MARK = "[bench-startup] "
CONFIGS = {"quickstart (all-MiniLM-L6-v2)": "configs/quickstart.yaml",
           "causal_lm_lora (SmolLM2-135M)": "configs/causal_lm_lora.yaml"}
HEAVY = ["torch", "torch._dynamo", "lightning", "torchmetrics", "transformers", "jsonargparse", "peft",
         "bitsandbytes", "datasets", "peftlab.methods", "peftlab.data"]


class FirstStep(Callback):
    """Prints the wall-clock time of the start-up milestones of a fit, as one JSON line."""

    def __init__(self):
        self.marks = {}

    def setup(self, trainer, pl_module, stage):
        self.marks.setdefault("setup", time.time())

    def on_train_start(self, trainer, pl_module):
        self.marks["train_start"] = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "first_step" not in self.marks:
            self.marks["first_step"] = time.time()
            print(MARK + json.dumps(self.marks), flush=True)


def peftlab_command() -> list[str]:
    script = Path(sys.executable).parent / "peftlab"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "peftlab"]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def help_time(repeats: int, importtime: bool = True, args: tuple[str, ...] = ("--help",)) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([*peftlab_command(), *args], cwd=ROOT, capture_output=True, text=True, env=_env())
        times.append(time.perf_counter() - start)
        if proc.returncode != 0 or "fit" not in proc.stdout:
            raise RuntimeError(f"peftlab {' '.join(args)} failed: {proc.stderr[-2000:]}")
    baseline = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=_env(), check=True)
        baseline.append(time.perf_counter() - start)
    return {"seconds": summary(times), "python_startup_seconds": summary(baseline),
            "imports_ms": import_times(args) if importtime else None}


#: issue #19: counting a 70B model's parameters answers in under 5 s
PARAMS_ARGS = ("params", "--config", "configs/causal_lm_lora.yaml", "--backbone", "llama-2-70b")


def params_time(repeats: int, smoke: bool = False) -> dict:
    """``peftlab params`` on llama-2-70b in a fresh process: median of ``repeats`` runs, with Python's bytecode cache
    on (as on a user's machine) and, for reference, once more without it (``PYTHONDONTWRITEBYTECODE=1``, as this
    project's sandbox sets: every peftlab module is then compiled from source at each start)."""
    def once(env) -> float:
        start = time.perf_counter()
        proc = subprocess.run([*peftlab_command(), *PARAMS_ARGS], cwd=ROOT, capture_output=True, text=True, env=env)
        took = time.perf_counter() - start
        if proc.returncode != 0 or "trainable" not in proc.stdout:
            raise RuntimeError(f"peftlab {' '.join(PARAMS_ARGS)} failed: {proc.stderr[-2000:]}")
        return took

    cached = {k: v for k, v in _env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    if smoke:  # one run: that it works
        return {"command": "peftlab " + " ".join(PARAMS_ARGS), "seconds": summary([once(cached)])}
    once(cached)  # writes the bytecode cache
    times = [once(cached) for _ in range(repeats)]
    uncached = [once(dict(_env(), PYTHONDONTWRITEBYTECODE="1")) for _ in range(max(1, repeats // 2))]
    return {"command": "peftlab " + " ".join(PARAMS_ARGS), "seconds": summary(times),
            "seconds_without_bytecode_cache": summary(uncached), "imports_ms": import_times(PARAMS_ARGS)}


def import_times(args: tuple[str, ...] = ("--help",)) -> dict:
    """Cumulative import time (ms) of the heavy packages during one ``peftlab ARGS`` (-X importtime)."""
    # main() reads sys.argv, as the console script does (so meta-only commands skip bitsandbytes, as there)
    code = f"import sys; from peftlab.cli import main; sys.argv = ['peftlab', *{list(args)!r}]; main()"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=_env())
    wall = time.perf_counter() - start
    found = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and m.group(4) in HEAVY and m.group(4) not in found:
            found[m.group(4)] = {"cumulative_ms": int(m.group(2)) / 1000, "depth": len(m.group(3)) // 2}
    total = sum(int(m.group(1)) for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", proc.stderr, re.M))
    return {"modules": found, "all_top_level_imports_ms": total / 1000, "wall_with_importtime_s": wall}


def fit_to_first_step(config: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*peftlab_command(), "fit", "--config", config, "--trainer.max_steps", "1", "--test_after_fit", "false",
               "--trainer.limit_val_batches", "2", "--trainer.logger.init_args.save_dir", tmp,
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=benchmarks.startup.FirstStep"]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
        total = time.time() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    marks = json.loads(line[len(MARK):])
    return {"to_setup_s": marks["setup"] - start, "to_train_start_s": marks["train_start"] - start,
            "to_first_step_s": marks["first_step"] - start, "whole_command_s": total}


def bench_startup(smoke: bool) -> dict:
    repeats = 1 if smoke else 5
    fit_repeats = 1 if smoke else 3
    configs = {k: v for k, v in CONFIGS.items() if not smoke or "quickstart" in v}
    pending = None
    if smoke:  # seconds matter more than accuracy here: the fit runs beside the --help timing
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        pending = pool.submit(fit_to_first_step, next(iter(configs.values())))
    log(f"startup: peftlab --help x{repeats}")
    out = {"help": help_time(repeats, importtime=False), "fit": {}}
    log(f"  median {out['help']['seconds']['median']:.2f} s")
    log(f"startup: peftlab fit --help-all x{repeats}")  # LightningCLI's full help: Lightning must be imported
    out["fit_help"] = help_time(repeats, importtime=not smoke, args=("fit", "--help-all"))
    log(f"  median {out['fit_help']['seconds']['median']:.2f} s")
    log(f"startup: peftlab {' '.join(PARAMS_ARGS)} x{repeats}")
    out["params_70b"] = params_time(repeats, smoke)
    log(f"  median {out['params_70b']['seconds']['median']:.2f} s")
    for label, config in configs.items():
        runs = []
        for i in range(fit_repeats):
            runs.append(pending.result() if pending is not None else fit_to_first_step(config))
            pending = None
            log(f"  fit to first step, {label} {i + 1}/{fit_repeats}: {runs[-1]['to_first_step_s']:.1f} s")
        out["fit"][label] = {"command": f"peftlab fit --config {config} --trainer.max_steps 1 ...",
                             **{k: summary([r[k] for r in runs]) for k in runs[0]}}
    return out
