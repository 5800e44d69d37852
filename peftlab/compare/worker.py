"""The worker of ``peftlab compare``: runs the study's missing tuning trials and seed runs, one at a time, claimed
through the study's storage (:mod:`peftlab.compare.storage`).

Every (part, method) has two Optuna studies in the study's storage:

* ``<study>/<part>/<method>/tune``: the search (sampler: TPE by default; pruner: successive halving on the
  validation metric, reported after every validation by :class:`~peftlab.compare.callbacks.TrialReporter`). A
  worker creates a trial with ``study.ask()`` only while fewer than ``tuning.trials`` trials are live (complete,
  pruned, running or waiting); a trial that finds ``tuning.trials`` live trials numbered below it (another worker
  asked at the same moment) is closed unrun as ``surplus``, so exactly ``tuning.trials`` trials train;
* ``<study>/<part>/<method>/seeds``: one enqueued (WAITING) trial per seed, at the best tuning trial's parameters,
  claimed by moving it from WAITING to RUNNING.

A run whose worker died is run again (a seed run continues from its last checkpoint); finished trials are never run
again, so re-running the command after an interruption does only what is missing.

Each run is a real ``peftlab fit`` in this process (:func:`~peftlab.compare.isolation.run_fit`), with its own run
directory ``<study_dir>/runs/<part>/<method>/<tune-NNN|seed-S>`` and log ``<study_dir>/logs/...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from peftlab.callbacks.generation import GenerationEval
from peftlab.cli_errors import find_user_error
from peftlab.compare.callbacks import Heartbeat, TestOutcomes, TrialReporter, lm_eval_callback
from peftlab.compare.isolation import run_fit
from peftlab.compare.storage import (
    HEARTBEAT_S,
    HOST,
    best_trial,
    claim,
    claim_lock,
    done_or_live,
    pack,
    recover,
    requeue,
)
from peftlab.compare.study import Method, Part, Study, run_arguments
from peftlab.errors import PeftLabError

POLL_S = 2.0
WORKER_ENV = "PEFTLAB_COMPARE_WORKER"
LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


# ---------------------------------------------------------------------------------------------- the worker
class Worker:
    """Runs the study's missing trials and seed runs, one at a time, until none is left to claim."""

    def __init__(self, study: Study, storage, *, say, latency: bool = False, index: int | None = None):
        self.study, self.storage, self.say, self.latency = study, storage, say, latency
        self.index = index if index is not None else int(os.environ.get(WORKER_ENV, "0") or 0)
        self._studies: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.ran = 0

    # -------------------------------------------------------------- storage
    def studies(self, part: Part, method: Method):
        """(tuning study, seeds study) of a method, created on first use; refuses results of another study file."""
        key = (part.name, method.name)
        if key in self._studies:
            return self._studies[key]
        prefix = f"{self.study.name}/{part.slug}/{method.slug}"
        existing = 0
        with contextlib.suppress(KeyError):
            existing = len(optuna.load_study(study_name=f"{prefix}/tune", storage=self.storage).trials)
        sampler = make_sampler(part, sampler_seed(part, self.index, existing, str(self.storage.url)))
        pruner = make_pruner(part)
        tune = optuna.create_study(storage=self.storage, study_name=f"{prefix}/tune", direction=part.direction,
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
        seeds = optuna.create_study(storage=self.storage, study_name=f"{prefix}/seeds", direction="maximize",
                                    load_if_exists=True)
        fingerprint = part.fingerprint(method)
        for s in (tune, seeds):
            stored = s.user_attrs.get("fingerprint")
            if stored is None:
                s.set_user_attr("fingerprint", fingerprint)
                s.set_user_attr("method", method.name)
                s.set_user_attr("part", part.name)
            elif stored != fingerprint:
                raise PeftLabError(
                    f"the storage already holds results of {part.name}/{method.name} made from a different study "
                    f"file (settings changed since); use a new --study_dir / --storage, or delete "
                    f"{self.study.study_dir} to start over")
        self._studies[key] = (tune, seeds)
        return tune, seeds

    def prepare(self) -> None:
        """Create every Optuna study before workers start (so they never race to create one)."""
        for part in self.study.parts:
            for method in part.methods.values():
                self.studies(part, method)

    def recover(self, study) -> None:
        recover(self.storage, study, self.say)

    def _claim_attrs(self, trial_id: int) -> None:
        claim(self.storage, trial_id)

    # -------------------------------------------------------------- the loop
    def work(self) -> int:
        """Run until nothing is left; returns the number of runs this worker trained."""
        waited = 0.0
        while True:
            if self._step():
                waited = 0.0
                continue
            pending = self.pending()
            if not pending:
                return self.ran
            if waited == 0.0:
                self.say(f"waiting for {pending} run(s) of other workers")
            time.sleep(POLL_S)
            waited += POLL_S

    def _step(self) -> bool:
        for part in self.study.parts:
            for method in part.methods.values():
                if self.step(part, method):
                    return True
        return False

    def pending(self) -> int:
        """Runs that are not finished (running elsewhere, or waiting), over the whole study."""

        count = 0
        for part in self.study.parts:
            for method in part.methods.values():
                tune, seeds = self.studies(part, method)
                for s in (tune, seeds):
                    with claim_lock(str(self.storage.url)):
                        self.recover(s)
                    count += len(s.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))
        return count

    def step(self, part: Part, method: Method) -> bool:
        """Run one missing tuning trial or seed run of ``method``; False when there is none to claim now."""

        tune, seeds = self.studies(part, method)
        with claim_lock(str(self.storage.url)):  # claiming is serialised; the run itself happens after
            self.recover(tune)
            trials = tune.get_trials(deepcopy=False)
            live = [t for t in trials if t.state.name in LIVE]
            if any(t.state == TrialState.WAITING for t in trials) or len(live) < part.trials:
                claimed = self.claim_tuning_trial(part, tune)
                if claimed is None:
                    return False
                kind = "tune"
            elif any(t.state == TrialState.RUNNING for t in trials):
                return False  # another worker is still tuning this method
            else:
                best = best_trial(tune)
                if best is None:
                    if not tune.user_attrs.get("no_best"):
                        tune.set_user_attr("no_best", True)
                        self.say(f"{label(part, method)}: no tuning trial completed (all pruned or diverged); "
                                 "no seed runs")
                    return False
                self.recover(seeds)
                self.enqueue_seeds(part, seeds, best.params)
                claimed = self.claim_seed(seeds)
                if claimed is None:
                    return False
                kind = "seed"
        if kind == "tune":
            return self.tune(part, method, tune, *claimed)
        trial, waiting = claimed
        self._run_seed(part, method, seeds, trial, waiting, waiting.user_attrs["seed"], best)
        return True

    # -------------------------------------------------------------- tuning
    def claim_tuning_trial(self, part: Part, study):
        """Ask the next tuning trial (a re-queued one first) and claim it for this worker; None when the budget
        of trials is already full. Called under :func:`claim_lock`."""

        trial = study.ask()
        number = trial.number
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if "retry_of" not in frozen.user_attrs:
            earlier = [t for t in study.get_trials(deepcopy=False)
                       if t.number < number and t.state.name in LIVE and not t.user_attrs.get("surplus")]
            if len(earlier) >= part.trials:  # (another database's worker asked at the same moment)
                study.set_user_attr("surplus_seen", True)
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                return None
        self._claim_attrs(trial._trial_id)
        return trial, frozen

    def tune(self, part: Part, method: Method, study, trial, frozen) -> bool:

        number = trial.number
        attrs = frozen.user_attrs
        params = {p.name: p.suggest(trial) for p in method.search}
        run = attrs.get("run") or f"tune-{number:03d}"
        trial.set_user_attr("run", run)
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED"))
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.say(f"{label(part, method)}: tuning trial {done + 1}/{part.trials} (#{number}"
                 f"{', again' if 'retry_of' in attrs else ''}) {shown or '(no search space)'}")

        reporter = TrialReporter(part.select, part.direction, self.say, trial, label="")
        callbacks: list = [reporter]
        if part.generation and part.generation.get("during_validation"):
            callbacks.append(GenerationEval(part.generation["max_new_tokens"], stages=("val",)))
        harness = lm_eval_callback(part.lm_eval, ("val",) if (part.lm_eval or {}).get("during_validation") else ())
        callbacks += [harness] if harness else []
        run_dir = self.run_dir(part, method, run)
        if run_dir.exists():  # an interrupted trial restarts from scratch (its reported values went with it)
            shutil.rmtree(run_dir)
        args = run_arguments(part, method, seed=part.tuning_seed, params=params, kind="tune",
                             save_dir=str(self.save_dir(part)), version=run)
        start = time.time()
        error = self._fit(part, method, study, trial._trial_id, frozen, run, args, callbacks)
        seconds = time.time() - start
        trial.set_user_attr("seconds", round(seconds, 1))
        trial.set_user_attr("history", reporter.history)
        if reporter.trainable is not None:
            trial.set_user_attr("trainable", reporter.trainable)
            trial.set_user_attr("total", reporter.total)
        self.clean(part, run_dir)
        if error == "diverged":
            trial.set_user_attr("diverged", True)
            study.tell(trial, state=TrialState.PRUNED)
            self.say(f"    diverged (non-finite loss): counted as pruned, {seconds:.0f} s")
        elif reporter.pruned_at is not None:
            study.tell(trial, state=TrialState.PRUNED)
            self.say(f"    pruned at step {reporter.pruned_at}, {seconds:.0f} s")
        elif reporter.best is None:
            study.tell(trial, state=TrialState.FAIL)
            raise PeftLabError(f"{label(part, method)}: trial {number} ran no validation, so {part.select} was never "
                               "measured; set budget.val_check_interval (or check trainer.limit_val_batches)")
        else:
            study.tell(trial, reporter.best)
            self.say(f"    {part.select} = {reporter.best:.4f} (best of {len(reporter.history)} validations), "
                     f"{seconds:.0f} s")
        self.ran += 1
        return True

    # -------------------------------------------------------------- seeds
    def enqueue_seeds(self, part: Part, study, params: dict) -> None:
        """One WAITING trial per seed not yet queued (a seed queued twice by two workers runs once: see claim_seed)."""
        have = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False) if done_or_live(t)}
        for seed in part.seeds:
            if seed not in have:
                study.enqueue_trial(params, user_attrs={"seed": seed, "run": f"seed-{seed}"})

    def claim_seed(self, study):
        """Claim the first WAITING seed trial for this worker: (trial, its frozen record), or None when none is
        left. Called under :func:`claim_lock`."""
        from optuna.trial import TrialState

        for waiting in sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), key=lambda t: t.number):
            try:
                if not self.storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
                    continue  # another worker claimed it first
            except UpdateFinishedTrialError:
                continue  # closed (as a duplicate) by another worker since the list was read
            seed = waiting.user_attrs["seed"]
            rivals = [t for t in study.get_trials(deepcopy=False)
                      if t.user_attrs.get("seed") == seed and t.number < waiting.number and done_or_live(t)]
            if rivals:  # queued twice (two workers at once): the lower number is the one that runs
                self.storage.set_trial_user_attr(waiting._trial_id, "duplicate", True)
                self.storage.set_trial_state_values(waiting._trial_id, TrialState.FAIL)
                continue
            self._claim_attrs(waiting._trial_id)
            return optuna.trial.Trial(study, waiting._trial_id), waiting
        return None

    def _run_seed(self, part, method, study, trial, frozen, seed: int, best) -> None:


        run = frozen.user_attrs.get("run") or f"seed-{seed}"
        params = dict(frozen.params) or dict(best.params)
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
        run_dir = self.run_dir(part, method, run)
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = last.is_file()
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        self.say(f"{label(part, method)}: seed {seed} ({done + 1}/{len(part.seeds)})"
                 f"{', resuming from its last checkpoint' if resume else ''}")
        gen = None
        if part.generation:
            stages = ("val", "test") if part.generation.get("during_validation") else ("test",)
            gen = GenerationEval(part.generation["max_new_tokens"], stages=stages)
        latency = part.latency or ({"repeats": 10, "warmup": 2} if self.latency else None)
        harness = lm_eval_callback(part.lm_eval, ("val", "test") if (part.lm_eval or {}).get("during_validation")
                                   else ("test",))
        outcomes = TestOutcomes(gen, part.forgetting, latency, harness)
        reporter = TrialReporter(part.select, part.direction, self.say, None, label="")
        callbacks = [reporter, *([gen] if gen else []), outcomes, *([harness] if harness else [])]
        args = run_arguments(part, method, seed=seed, params=params, kind="seed", save_dir=str(self.save_dir(part)),
                             version=run)
        if resume:
            args["ckpt_path"] = str(last)
        start = time.time()
        error = self._fit(part, method, study, trial._trial_id, frozen, run, args, callbacks)
        seconds = time.time() - start
        trial.set_user_attr("seconds", round(seconds, 1))
        trial.set_user_attr("params", params)
        trial.set_user_attr("history", reporter.history)
        if reporter.trainable is not None:
            trial.set_user_attr("trainable", reporter.trainable)
            trial.set_user_attr("total", reporter.total)
        self.clean(part, run_dir)
        if error == "diverged" or not outcomes.result.get("columns"):
            trial.set_user_attr("error", "diverged (non-finite training loss)" if error == "diverged"
                                else "no test outcomes were recorded")
            study.tell(trial, state=TrialState.FAIL)
            self.say(f"    seed {seed} failed: {trial.user_attrs['error']}")
            self.ran += 1
            return
        result = outcomes.result
        (run_dir / "outcomes.json").write_text(json.dumps(result))
        trial.set_user_attr("metrics", result["metrics"])
        trial.set_user_attr("outcomes", pack(result))
        primary = result["metrics"].get(part.report[0], float("nan"))
        study.tell(trial, primary if primary == primary else 0.0)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items() if k in part.report)
        self.say(f"    {shown}, {seconds:.0f} s")
        self.ran += 1

    # -------------------------------------------------------------- running
    def save_dir(self, part: Part) -> Path:
        return (self.study.study_dir / "runs" / part.slug).resolve()

    def run_dir(self, part: Part, method: Method, run: str) -> Path:
        return self.save_dir(part) / method.slug / run

    def log(self, event: dict) -> None:
        """Append one line to ``<study_dir>/runs.log`` (what ran where; the tests count runs with it)."""
        line = json.dumps({"time": round(time.time(), 3), "host": HOST, "pid": os.getpid(), **event}) + "\n"
        fd = os.open(self.study.study_dir / "runs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _fit(self, part, method, study, trial_id, frozen, run, args, callbacks) -> str | None:
        """Run the fit under a heartbeat; returns "diverged" for a non-finite loss, None when it finished. Any other
        error marks the trial FAIL, enqueues it again and stops the worker with the error."""


        rel = f"{part.slug}/{method.slug}/{run}"
        log_path = self.study.study_dir / "logs" / part.slug / method.slug / f"{run}.log"
        self.log({"event": "start", "run": rel, "study": study.study_name, "trial": frozen.number})
        try:
            with Heartbeat(self.storage, trial_id, HEARTBEAT_S):
                run_fit(args, callbacks, log_path)
        except BaseException as err:  # noqa: BLE001 - every way out must leave the storage consistent
            user = find_user_error(err) if isinstance(err, Exception) else None
            if user is not None and "training loss is" in str(user):
                self.log({"event": "end", "run": rel, "state": "diverged"})
                return "diverged"
            with contextlib.suppress(Exception):
                self.storage.set_trial_user_attr(trial_id, "crash", f"{type(err).__name__}: {err}"[:500])
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
                requeue(study, self.storage.get_trial(trial_id))
            self.log({"event": "end", "run": rel, "state": "interrupted" if not isinstance(err, Exception)
                      else "error"})
            if not isinstance(err, Exception):  # Ctrl-C (Lightning turns it into sys.exit(1)) or a kill
                raise KeyboardInterrupt(f"{label(part, method)} {run} was interrupted") from err
            message = str(user) if user is not None else f"{type(err).__name__}: {err}"
            raise PeftLabError(f"{label(part, method)} {run} failed: {message.splitlines()[0] if message else ''} "
                               f"(log: {log_path}); it runs again when the command is repeated") from err
        self.log({"event": "end", "run": rel, "state": "finished"})
        return None

    def clean(self, part: Part, run_dir: Path) -> None:
        """Checkpoints go once a run has finished (keep_checkpoints: true keeps them); adapters and logs stay."""
        if not part.keep_checkpoints and (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def label(part: Part, method: Method) -> str:
    return f"{part.name}/{method.name}" if part.name != "main" else method.name


def sampler_seed(part: Part, index: int, existing: int, url: str) -> int:
    """The tuning sampler's seed: distinct per worker process (``index``), per resumption (``existing`` trials) and
    per machine (equal seeds would suggest equal points: a resumed study would repeat its first trials, machines
    sharing a database each other's); still the same on every fresh single-worker run of a study on one machine."""
    host = 0 if url.startswith("sqlite") else zlib.crc32(HOST.encode())
    return (part.tuning_seed + 7919 * index + 104729 * existing + host) % 2**31


def make_sampler(part: Part, seed: int):
    """The part's ``tuning.sampler``: TPE (with constant liar, for parallel workers), random or QMC."""
    kind = part.tuning["sampler"]
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.samplers.QMCSampler(seed=part.tuning_seed, scramble=True)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, part.trials // 2), constant_liar=True)


def make_pruner(part: Part):
    """The part's ``tuning.pruner``: successive halving on the validations (first rung at ``min_resource`` or the
    validation interval), or none."""
    tcfg = part.tuning
    if tcfg.get("pruner") != "successive_halving":
        return optuna.pruners.NopPruner()
    min_resource = tcfg.get("min_resource") or part.budget.get("val_check_interval") or "auto"
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=min_resource if isinstance(min_resource, (int, str)) else int(min_resource),
        reduction_factor=int(tcfg.get("reduction_factor", 3)))
