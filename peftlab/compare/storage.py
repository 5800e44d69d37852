"""The study's Optuna storage: opening it (with the heartbeat that finds dead workers), claims and their lock,
and the recovery of runs whose worker died.

Every (part, method) has two Optuna studies in the storage, ``<study>/<part>/<method>/tune`` and ``.../seeds``
(:mod:`peftlab.compare.worker` runs them). A worker claims a trial by moving it from WAITING to RUNNING (the same
call Optuna's own ``ask`` uses for enqueued trials). PostgreSQL and MySQL make that claim atomic; SQLite does not,
so on a SQLite study every claim (and the recovery of dead workers' trials) happens under a file lock beside the
database (:func:`claim_lock`).

A run whose worker died stays RUNNING in the storage: it is found by its heartbeat (Optuna's RDB heartbeat, for
workers on other machines) or, on this machine, because its process is gone; it is then marked FAIL and enqueued
again with the same parameters (:func:`recover`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

from peftlab.errors import PeftLabError

# a running trial records a heartbeat every HEARTBEAT_S; one silent for GRACE_S is a dead worker's, run again
HEARTBEAT_S = int(os.environ.get("PEFTLAB_COMPARE_HEARTBEAT_S") or 30)  # (Optuna: a positive integer)
GRACE_S = 4 * HEARTBEAT_S
POLL_S = 2.0
# this machine's name in the storage: runs it owns whose process is gone are recovered at once (others wait for
# the heartbeat); set PEFTLAB_COMPARE_HOST where machines share a host name (cloned VMs, containers)
HOST = os.environ.get("PEFTLAB_COMPARE_HOST") or socket.gethostname()


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
                # pg_type_typname_nsp_index", seen in tests/integration/test_compare_postgres_runs.py): the loser's retry finds them
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
    """Whether process ``pid`` on this machine is running; a killed child its parent has not reaped yet is a zombie:
    dead for our purpose. Another user's process counts as alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # (ZombieProcess is one)
        return False
    except psutil.AccessDenied:
        return True


def pack(data: Any) -> str:
    """JSON, compressed and base64'd: per-example outcomes stay small in the storage (a MySQL TEXT holds 64 KB)."""
    return base64.b64encode(zlib.compress(json.dumps(data).encode(), 9)).decode()


def unpack(text: str) -> Any:
    return json.loads(zlib.decompress(base64.b64decode(text)))


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
    # blocks until the lock is free; the file stays for the next claim (as the database beside it does)
    with FileLock(path + ".claims.lock", preserve_lock_file=True):
        yield


def best_trial(study):
    """The best COMPLETE trial of a tuning study (None if none completed)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda t: (t.value, -t.number) if pick is max else (t.value, t.number))


def claim(storage, trial_id: int) -> None:
    """Record this process as the owner of a claimed trial (what :func:`recover` reads)."""
    storage.set_trial_system_attr(trial_id, "peftlab_worker", {"host": HOST, "pid": os.getpid()})


def recover(storage, study, say) -> None:
    """Fail and re-enqueue the RUNNING trials of ``study`` whose worker is gone (heartbeat expired, or its process
    on this machine has ended). Called under :func:`claim_lock`."""
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
            storage.set_trial_user_attr(t._trial_id, "stale", f"worker {owner.get('pid')} on {HOST} ended")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker recovered it first (UpdateFinishedTrialError)
            continue
        say(f"{study.study_name}: trial {t.number} ({t.user_attrs.get('run')}) was left running by a "
            "worker that ended; it runs again")
        requeue(study, t)
