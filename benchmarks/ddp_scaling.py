"""Throughput of 1 vs N data-parallel processes (issue #10): samples/s of `peftlab fit` with the same
global batch, as a ratio. On GPUs pass --accelerator gpu --devices 1 2 4 8.

    python benchmarks/ddp_scaling.py                       # CPU: 1 vs 2 processes, MiniLM LoRA
    python benchmarks/ddp_scaling.py --smoke               # a few steps (CI)

Steady-state time is measured between --warmup and --steps by a callback on rank 0; repeats are
interleaved (1, 2, 1, 2, ...) so machine noise hits every setting alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Writes the wall time from step `warmup` to the last step, and the samples seen, to `path` (rank 0)."""

    def __init__(self, path: str, warmup: int = 3):
        self.path, self.warmup, self.start, self.samples = path, warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        if self.start is not None:
            self.samples += len(batch["input_ids"]) * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.start is not None:
            Path(self.path).write_text(json.dumps({"seconds": time.perf_counter() - self.start,
                                                   "samples": self.samples}))


def run_once(devices: int, args, workdir: Path) -> float:
    out = workdir / f"timing_{devices}_{time.time_ns()}.json"
    per_device = args.global_batch // devices
    command = [sys.executable, "-m", "peftlab", "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
               "--trainer.max_steps", str(args.steps), "--trainer.accelerator", args.accelerator,
               "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
               "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
               "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
               "--trainer.callbacks=ddp_scaling.StepTimer", f"--trainer.callbacks.init_args.path={out}",
               f"--trainer.callbacks.init_args.warmup={args.warmup}",
               "--adapter_export.enabled", "false", "--test_after_fit", "false",
               "--data.batch_size", str(per_device)]
    if devices > 1:
        command += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    timing = json.loads(out.read_text())
    return timing["samples"] / timing["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="2 steps after 1 warm-up, 1 repeat")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    results: dict[int, list[float]] = {d: [] for d in args.devices}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for devices in args.devices:
                rate = run_once(devices, args, Path(tmp))
                results[devices].append(rate)
                print(f"[repeat {r + 1}/{args.repeats}] {devices} process(es): {rate:.1f} samples/s", flush=True)
    base = statistics.median(results[args.devices[0]])
    summary = {"machine": f"{os.cpu_count()} CPU cores" if args.accelerator == "cpu" else args.accelerator,
               "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup,
               "command": "python benchmarks/ddp_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "results": {str(d): {"samples_per_s": statistics.median(v), "runs": v,
                                    "ratio": statistics.median(v) / base} for d, v in results.items()}}
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
