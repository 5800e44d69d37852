"""The work of ``peftlab compare``: tuning trials and seed runs, claimed through Optuna's storage.

Every (part, method) has two Optuna studies in the study's storage:

* ``<study>/<part>/<method>/tune``: the search (sampler: TPE by default; pruner: successive halving on the
  validation metric, reported after every validation by :class:`~peftlab.compare.callbacks.TrialReporter`). A
  worker creates a trial with ``study.ask()`` only while fewer than ``tuning.trials`` trials are live (complete,
  pruned, running or waiting); a trial that finds ``tuning.trials`` live trials numbered below it (another worker
  asked at the same moment) is closed unrun as ``surplus``, so exactly ``tuning.trials`` trials train;
* ``<study>/<part>/<method>/seeds``: one enqueued (WAITING) trial per seed, at the best tuning trial's parameters.
  A worker claims one by moving it from WAITING to RUNNING (the same call Optuna's own ``ask`` uses for enqueued
  trials). PostgreSQL and MySQL make that claim atomic; SQLite does not, so on a SQLite study every claim (and
  the recovery of dead workers' trials) happens under a file lock beside the database (:func:`claim_lock`).

A run whose worker died stays RUNNING in the storage: it is found by its heartbeat (Optuna's RDB heartbeat, for
workers on other machines) or, on this machine, because its process is gone; it is then marked FAIL and enqueued
again with the same parameters, and a seed run continues from its last checkpoint. Finished trials are never run
again, so re-running the command after an interruption does only what is missing.

Each run is a real ``peftlab fit`` in this process, through the CLI's own class (:func:`run_fit`), with its own
run directory ``<study_dir>/runs/<part>/<method>/<tune-NNN|seed-S>`` and log ``<study_dir>/logs/...``; process
state a run may change (matmul precision, environment, warning filters) is restored after it.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

from peftlab.compare.study import Method, Part, Study, fit_args
from peftlab.errors import PeftLabError
from peftlab.runinfo import stamp

# a running trial records a heartbeat every HEARTBEAT_S; one silent for GRACE_S is a dead worker's, run again
HEARTBEAT_S = int(os.environ.get("PEFTLAB_COMPARE_HEARTBEAT_S") or 30)  # (Optuna: a positive integer)
GRACE_S = 4 * HEARTBEAT_S
POLL_S = 2.0
# this machine's name in the storage: runs it owns whose process is gone are recovered at once (others wait for
# the heartbeat); set PEFTLAB_COMPARE_HOST where machines share a host name (cloned VMs, containers)
HOST = os.environ.get("PEFTLAB_COMPARE_HOST") or socket.gethostname()
WORKER_ENV = "PEFTLAB_COMPARE_WORKER"
LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


# ask/tell with the RDB heartbeat is what this module does on purpose (it records the heartbeat itself)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def open_storage(url: str, *, heartbeat: bool = True):
    """Optuna's RDB storage at ``url`` (tables created if needed), with the heartbeat that finds dead workers.
    Any failure is one line naming the URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several worker processes share the file: wait for the write lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if heartbeat:
        kwargs.update(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, heartbeat_stale_trial_callback=requeue)
    check_driver(url)
    from sqlalchemy.exc import IntegrityError

    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # heartbeat_interval is "experimental" in some releases
                    return optuna.storages.RDBStorage(url, **kwargs)
            except IntegrityError:
                # machines starting at once race to create Optuna's tables (PostgreSQL: "duplicate key value ...
                # pg_type_typname_nsp_index", seen in tests/test_compare_postgres.py): the loser's retry finds them
                if attempt == 4:
                    raise
                time.sleep(1.0 + attempt)
    except Exception as err:  # noqa: BLE001 - sqlalchemy and optuna raise many types for a bad URL
        text = " ".join(str(err).split())
        raise PeftLabError(f"storage {url!r} cannot be opened ({type(err).__name__}: {text[:200]}); give a "
                           "database URL that exists and is reachable, e.g. sqlite:///study.db or "
                           "postgresql://user@host/db") from err


#: SQLAlchemy's database drivers -> (the package that provides it, the peftlab extra that installs it)
DRIVER_PACKAGES = {"psycopg": ("psycopg[binary]", "postgres"), "psycopg2": ("psycopg2-binary", None),
                   "pymysql": ("PyMySQL", None), "mysqldb": ("mysqlclient", None)}


def check_driver(url: str) -> None:
    """Refuse in one line a database URL whose driver is not installed, naming the package (and peftlab's extra)
    to install: Optuna's own message names neither, and SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3, not
    to the psycopg2 most guides install."""
    from sqlalchemy.engine import make_url

    try:
        dialect = make_url(url).get_dialect()
    except Exception:  # noqa: BLE001 - an unknown scheme or a malformed URL: RDBStorage's own error says so
        return
    try:
        dialect.import_dbapi()
    except ImportError as err:
        driver = dialect.driver
        package, extra = DRIVER_PACKAGES.get(driver, (driver, None))
        how = f"pip install 'peftlab[{extra}]' (it installs {package})" if extra else f"pip install '{package}'"
        raise PeftLabError(f"storage {url!r} needs the database driver {driver!r}, which is not installed "
                           f"({type(err).__name__}: {' '.join(str(err).split())}); {how}, or name another installed driver in the URL "
                           f"(e.g. {dialect.name}+<driver>://...)") from err


def requeue(study, frozen) -> None:
    """Enqueue a failed (dead worker, crash, interrupt) trial again with its parameters, seed and run directory."""
    attrs = frozen.user_attrs
    if attrs.get("surplus") or attrs.get("duplicate"):
        return
    study.enqueue_trial(dict(frozen.params), user_attrs={
        **{k: attrs[k] for k in ("seed", "run") if k in attrs}, "retry_of": frozen.number})


def done_or_live(trial) -> bool:
    """A seed trial that stands for its seed: not failed, or failed for good (diverged); a trial that failed
    because its worker died or crashed does not (its retry, or a new one, does)."""
    return trial.state.name != "FAIL" or bool(trial.user_attrs.get("error"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def pack(data: Any) -> str:
    """JSON, compressed and base64'd: per-example outcomes stay small in the storage (a MySQL TEXT holds 64 KB)."""
    return base64.b64encode(zlib.compress(json.dumps(data).encode(), 9)).decode()


def unpack(text: str) -> Any:
    return json.loads(zlib.decompress(base64.b64decode(text)))


# ---------------------------------------------------------------------------------------------- one fit run
@contextlib.contextmanager
def _isolated(log_path: Path):
    """Run a fit with its output in ``log_path`` and the process state it may change restored afterwards."""
    import torch

    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    matmul = torch.get_float32_matmul_precision()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    argv = sys.argv
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    handlers = list({id(h): h for name in ("lightning.pytorch", "lightning.fabric", "lightning")
                     for h in logging.getLogger(name).handlers
                     if type(h) is logging.StreamHandler}.values())  # Lightning's console handlers
    with open(log_path, "a", encoding="utf-8") as log, warnings.catch_warnings():
        streams = [h.setStream(log) for h in handlers]
        sys.argv = ["peftlab"]
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield log
        finally:
            for h, stream in zip(handlers, streams):
                if stream is not None:
                    h.setStream(stream)
            sys.argv = argv
            if sigint is not None:  # Lightning ignores Ctrl-C from the first one it catches on
                signal.signal(signal.SIGINT, sigint)
            os.environ.clear()
            os.environ.update(env)
            torch.set_float32_matmul_precision(matmul)
            torch.set_default_dtype(dtype)
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_fit(args: list[str], callbacks: list, log_path: Path) -> None:
    """``peftlab fit ARGS`` in this process, with ``callbacks`` added to the trainer's; output goes to ``log_path``.
    Raises what the run raises (a PeftLabError for the user's errors, as the CLI would print)."""
    from peftlab.cli import run_cli

    with _isolated(log_path) as log:
        print(f"$ peftlab fit {' '.join(args)}", file=log, flush=True)
        cli = run_cli(["fit", *args], callbacks=callbacks)
        interrupted = cli.trainer.interrupted
        del cli
    if interrupted:  # Lightning turns Ctrl-C into a quiet stop; for the study it is an unfinished run
        raise KeyboardInterrupt("the run was interrupted")


@contextlib.contextmanager
def claim_lock(url: str):
    """Serialise claiming work (asking a trial, moving a WAITING trial to RUNNING, failing and re-queueing a dead
    worker's trial) between processes that share a SQLite study.

    Optuna claims a trial with a read-then-write that PostgreSQL and MySQL make atomic (``SELECT ... FOR
    UPDATE``) but SQLite does not (it ignores the row lock and starts its transaction at the write): two workers
    could both move one WAITING trial to RUNNING and train the same run in the same directory (seen in CI). SQLite
    works on one machine only, so an exclusive file lock beside the database closes that window; other databases
    need nothing here. Training itself happens outside the lock."""
    path = url.split(":///", 1)[1] if url.startswith("sqlite:///") else None
    if not path:
        yield
        return
    import fcntl

    with open(path + ".claims.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        import optuna

        key = (part.name, method.name)
        if key in self._studies:
            return self._studies[key]
        prefix = f"{self.study.name}/{part.slug}/{method.slug}"
        tcfg = part.tuning
        # distinct per worker process, per resumption and per machine (equal seeds would suggest equal points:
        # a resumed study would repeat its first trials, machines sharing a database each other's); still the same
        # on every fresh single-worker run of a study on one machine
        existing = 0
        with contextlib.suppress(KeyError):
            existing = len(optuna.load_study(study_name=f"{prefix}/tune", storage=self.storage).trials)
        host = 0 if str(self.storage.url).startswith("sqlite") else zlib.crc32(HOST.encode())
        seed = (part.tuning_seed + 7919 * self.index + 104729 * existing + host) % 2**31
        if tcfg["sampler"] == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        elif tcfg["sampler"] == "qmc":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sampler = optuna.samplers.QMCSampler(seed=part.tuning_seed, scramble=True)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, part.trials // 2),
                                                 constant_liar=True)
        if tcfg.get("pruner") == "successive_halving":
            min_resource = tcfg.get("min_resource") or part.budget.get("val_check_interval") or "auto"
            pruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=min_resource if isinstance(min_resource, (int, str)) else int(min_resource),
                reduction_factor=int(tcfg.get("reduction_factor", 3)))
        else:
            pruner = optuna.pruners.NopPruner()
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
        """Fail and re-enqueue the RUNNING trials whose worker is gone (heartbeat expired, or its process on this
        machine has ended)."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get("peftlab_worker") or {}
            if owner.get("host") != HOST or owner.get("pid") in (None, os.getpid()) or pid_alive(owner["pid"]):
                continue
            try:  # attributes first: a finished trial takes none
                self.storage.set_trial_user_attr(t._trial_id, "stale", f"worker {owner.get('pid')} on {HOST} ended")
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except Exception:  # noqa: BLE001 - another worker recovered it first (UpdateFinishedTrialError)
                continue
            self.say(f"{study.study_name}: trial {t.number} ({t.user_attrs.get('run')}) was left running by a "
                     "worker that ended; it runs again")
            requeue(study, t)

    def _claim_attrs(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, "peftlab_worker", {"host": HOST, "pid": os.getpid()})

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
        from optuna.trial import TrialState

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
        from optuna.trial import TrialState

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
        from optuna.trial import TrialState

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
        from optuna.trial import TrialState

        number = trial.number
        attrs = frozen.user_attrs
        params = {p.name: p.suggest(trial) for p in method.search}
        run = attrs.get("run") or f"tune-{number:03d}"
        trial.set_user_attr("run", run)
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED"))
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.say(f"{label(part, method)}: tuning trial {done + 1}/{part.trials} (#{number}"
                 f"{', again' if 'retry_of' in attrs else ''}) {shown or '(no search space)'}")
        from peftlab.callbacks.generation import GenerationEval
        from peftlab.compare.callbacks import TrialReporter, lm_eval_callback

        reporter = TrialReporter(part.select, part.direction, self.say, trial, label="")
        callbacks: list = [reporter]
        if part.generation and part.generation.get("during_validation"):
            callbacks.append(GenerationEval(part.generation["max_new_tokens"], stages=("val",)))
        harness = lm_eval_callback(part.lm_eval, ("val",) if (part.lm_eval or {}).get("during_validation") else ())
        callbacks += [harness] if harness else []
        run_dir = self.run_dir(part, method, run)
        if run_dir.exists():  # an interrupted trial restarts from scratch (its reported values went with it)
            shutil.rmtree(run_dir)
        args = fit_args(part, method, seed=part.tuning_seed, params=params, kind="tune",
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
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
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
        from optuna.trial import TrialState

        from peftlab.callbacks.generation import GenerationEval
        from peftlab.compare.callbacks import TestOutcomes, TrialReporter, lm_eval_callback

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
        args = fit_args(part, method, seed=seed, params=params, kind="seed", save_dir=str(self.save_dir(part)),
                        version=run)
        if resume:
            args += ["--ckpt_path", str(last)]
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
        from optuna.trial import TrialState

        from peftlab.cli_errors import find_user_error
        from peftlab.compare.callbacks import Heartbeat

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


def best_trial(study):
    """The best COMPLETE trial of a tuning study (None if none completed)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda t: (t.value, -t.number) if pick is max else (t.value, t.number))


def label(part: Part, method: Method) -> str:
    return f"{part.name}/{method.name}" if part.name != "main" else method.name


# ---------------------------------------------------------------------------------------------- several workers
def run_workers(study: Study, storage_url: str, n: int, *, smoke: bool, latency: bool, say) -> None:
    """Start ``n`` worker processes of the same command on the same storage and wait for them; their output is
    shown with a ``[wK]`` prefix."""
    cmd = [sys.executable, "-m", "peftlab", "compare", "--config", str(study.path), "--study_dir",
           str(study.study_dir), "--storage", storage_url, "--workers", "1", "--no-report"]
    if smoke:
        cmd.append("--smoke")
    if latency:
        cmd.append("--latency")
    procs = []
    for i in range(n):
        env = dict(os.environ, **{WORKER_ENV: str(i + 1)}, PYTHONUNBUFFERED="1")
        # share the cores instead of every worker's torch taking all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    tails: list[list[str]] = [[] for _ in procs]

    def pump(i: int, proc) -> None:
        for line in proc.stdout:
            tails[i] = (tails[i] + [line.rstrip()])[-20:]
            say(line.rstrip(), prefix=f"[w{i + 1}] ")

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        raise
    for t in threads:
        t.join(timeout=5)
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        i, code = failed[0]
        last = next((line for line in reversed(tails[i]) if line.strip()), "")
        raise PeftLabError(f"worker {i + 1} of {n} exited with status {code}: {last}")


class Printer:
    """Progress lines: ``[compare HH:MM:SS] message`` on the terminal the command started with."""

    def __init__(self, stream: io.TextIOBase | None = None, prefix: str = ""):
        self.stream = stream or sys.stdout
        self.prefix = prefix

    def __call__(self, message: str, prefix: str | None = None) -> None:
        if prefix is not None:  # a worker's line, already stamped
            self.stream.write(f"{prefix}{message}\n")
        else:
            self.stream.write(f"{self.prefix}{stamp('compare')} {message}\n")
        self.stream.flush()
