"""Does length-grouped batching change results? The quickstart on 3 seeds with and without it.

    python benchmarks/group_by_length_quality.py            # 6 full quickstart runs (about 40 min on 2 CPU cores)
    python benchmarks/group_by_length_quality.py --smoke    # 2 short runs (CI: tests/integration/test_benchmarks.py)

Each run is the real ``peftlab fit --config configs/quickstart.yaml`` with ``--seed_everything S`` (model
initialisation, dropout and shuffling change with the seed; the data split stays ``split_seed: 42``) and
``--data.group_by_length true|false``, interleaved by seed. Writes ``benchmarks/group_by_length_quality.json``
(test accuracy of every run, mean and standard deviation per setting, wall time per run) with the command and
the machine; docs/benchmarks.md reports it. Each finished run is appended to ``<output>.runs.jsonl`` at once, so an
interrupted measurement continues where it stopped (delete that file to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import log, machine  # noqa: E402

SEEDS = (42, 43, 44)


def run(seed: int, grouped: bool, out: Path, extra: list[str]) -> dict:
    peftlab = Path(sys.executable).parent / "peftlab"
    cmd = [str(peftlab), "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--seed_everything", str(seed),
           "--data.group_by_length", str(grouped).lower(), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name",
           f"{'grouped' if grouped else 'plain'}_{seed}", *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    acc = next(float(line.split()[-1]) for line in result.stdout.splitlines() if line.strip().startswith("test/acc"))
    return {"seed": seed, "group_by_length": grouped, "test_acc": acc, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one seed, a few steps (checks the script runs)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/group_by_length_quality.json"))
    args = parser.parse_args(argv)
    seeds = SEEDS[:1] if args.smoke else SEEDS
    extra = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
             "--trainer.val_check_interval", "4"] if args.smoke else []
    out = Path(args.output if not args.smoke else str(Path(args.output).with_suffix("")) + "_smoke.json")
    done_path = out.with_suffix(".runs.jsonl")
    runs = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for grouped in (False, True):
                if any(r["seed"] == seed and r["group_by_length"] is grouped for r in runs):
                    log(f"quickstart seed {seed}, group_by_length={grouped}: done earlier ({done_path.name})")
                    continue
                log(f"quickstart seed {seed}, group_by_length={grouped}")
                runs.append(run(seed, grouped, Path(tmp), extra))
                with done_path.open("a") as fh:
                    fh.write(json.dumps(runs[-1]) + "\n")
                log(f"  test/acc {runs[-1]['test_acc']:.4f} in {runs[-1]['seconds']:.0f} s")
    settings = {}
    for grouped in (False, True):
        accs = [r["test_acc"] for r in runs if r["group_by_length"] is grouped]
        secs = [r["seconds"] for r in runs if r["group_by_length"] is grouped]
        settings["grouped" if grouped else "plain"] = {
            "test_acc_mean": statistics.mean(accs), "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seconds_mean": statistics.mean(secs)}
    record = {"command": "python benchmarks/group_by_length_quality.py" + (" --smoke" if args.smoke else ""),
              "machine": machine(), "seeds": list(seeds), "runs": runs, "settings": settings}
    out.write_text(json.dumps(record, indent=2))
    for name, s in settings.items():
        log(f"{name}: test/acc {s['test_acc_mean']:.4f} +- {s['test_acc_std']:.4f}, {s['seconds_mean']:.0f} s per run")
    return record


if __name__ == "__main__":
    main()
