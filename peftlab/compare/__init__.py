"""``peftlab compare``: a fair comparison of methods, from one study file.

For each method of the study: tune its search space on the validation metric (Optuna, successive halving of poor
trials), then train every seed at the best settings and test them; the test split is never used to select.
Results live in the study's storage (SQLite in the study directory, or any database URL that several processes
or machines share); re-running the command skips what is finished. The report gives each method's exact trainable
parameters, chosen settings, test metrics with 95% intervals over seeds (t) and test examples (bootstrap), the paired
difference to a baseline, estimated training memory and Pareto plots. docs/compare.md has the study-file format.

Importing this package imports nothing heavy (``peftlab --help`` lists it without loading Lightning).
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftlab.errors import PeftLabError


def compare_command(*, config: str, smoke: bool = False, workers: int = 1, storage: str | None = None,
                    study_dir: str | None = None, latency: bool = False, report: bool = True,
                    check: bool = False) -> dict | None:
    """Tune, train and test several methods fairly from a study file; report intervals and Pareto plots.

    For each method of the study file: search its space (learning_rate, head_learning_rate, ...) on the
    validation metric with Optuna, stopping poor trials early (successive halving); then train every seed at the
    best settings and evaluate on test (never used to select). Writes <study_dir>/report.md, results.json and
    Pareto PNGs: per method the exact trainable parameters, chosen settings, test metrics with 95% bootstrap
    intervals (seeds x test examples), the paired difference to the baseline and estimated training memory.
    Results are stored as they finish: running the command again skips finished trials and seeds and continues
    an interrupted study. Errors in the study file are reported before anything trains.

    Args:
        config: the study file (YAML; docs/compare.md): base configs, methods, budget, seeds, search spaces,
            select / report metrics
        smoke: the study file's smoke settings (a few steps per run, its own study directory): checks the study
            runs end to end, in CI
        workers: worker processes on this machine sharing the study (each runs one trial or seed at a time)
        storage: Optuna storage URL (default: sqlite:///<study_dir>/study.db); give every machine the same
            database URL (e.g. postgresql://...) to work on one study from several machines
        study_dir: where runs, logs and the report go (default: the study file's study_dir, else
            runs/compare/<name>; --smoke appends -smoke)
        latency: also measure each trained method's forward latency on a test batch
        report: write the report when the work is done (--no-report for extra workers that only train)
        check: only check the study file (configs, search spaces, metrics, storage) and exit

    Examples:
        peftlab compare --config experiments/quality_vs_params/study.yaml --smoke
        peftlab compare --config experiments/quality_vs_params/study.yaml --workers 2
        peftlab compare --config study.yaml --storage postgresql://user@db/peftlab   # on every machine
    """
    from peftlab.compare.launcher import run_workers
    from peftlab.compare.storage import default_storage, open_storage
    from peftlab.compare.study import check_methods, load_study
    from peftlab.compare.worker import Worker
    from peftlab.runinfo import logger

    if workers < 1:
        raise PeftLabError(f"--workers must be >= 1 (got {workers})")
    say = logger("compare", sys.stdout)  # the terminal the command started with, not a run's log
    study = load_study(config, smoke=smoke, study_dir=study_dir)
    check_methods(study, log=say)
    url = storage or default_storage(study.study_dir)
    if storage:  # opened before the study directory exists: a bad URL leaves nothing behind
        store = open_storage(url)
        study.study_dir.mkdir(parents=True, exist_ok=True)
    else:
        study.study_dir.mkdir(parents=True, exist_ok=True)
        store = open_storage(url)
    if check:
        say(f"{config}: ok ({study.method_count()} method(s) in {len(study.parts)} part(s)); storage {url}")
        return None
    worker = Worker(study, store, say=say, latency=latency)
    worker.prepare()
    total = sum(len(p.methods) * (p.trials + len(p.seeds)) for p in study.parts)
    say(f"study {study.name}{' (smoke)' if smoke else ''}: {study.method_count()} method(s), {total} runs in all; "
        f"directory {study.study_dir}, storage {url}")
    (study.study_dir / "study.yaml").write_text(Path(config).read_text(encoding="utf-8"))
    try:
        if workers > 1:
            run_workers(study, url, workers, smoke=smoke, latency=latency, say=say)
        else:
            ran = worker.work()
            say(f"done: {ran} run(s) trained here" + ("" if ran else " (nothing was left to do)"))
    except KeyboardInterrupt as err:
        say(f"interrupted ({err}); the same command continues the study")
        raise SystemExit(130) from err
    if not report:
        return None
    from peftlab.compare import report as reporting

    return reporting.write(study, worker, say)


#: the former name of peftlab.callbacks.GenerationEval, so configs naming peftlab.compare.GeneratedTextMetrics load
def __getattr__(name: str):
    if name == "GeneratedTextMetrics":
        from peftlab.callbacks.generation import GenerationEval

        return GenerationEval
    raise AttributeError(name)


__all__ = ["GeneratedTextMetrics", "compare_command"]
