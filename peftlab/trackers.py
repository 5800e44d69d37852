"""Where a run's metrics go: ``metrics.csv`` always, plus the experiment trackers a user picks, all in one run dir.

    peftlab fit --config configs/quickstart.yaml --trackers mlflow        # pip install 'peftlab[mlflow]'
    peftlab fit --config configs/quickstart.yaml --trackers wandb         # pip install 'peftlab[wandb]'
    peftlab fit --config configs/quickstart.yaml --trackers [mlflow,tensorboard]

The run directory is the CSV logger's ``<save_dir>/<name>/version_N``: the fit summary, ``peftlab plot`` and
``--ckpt_path last`` read its ``metrics.csv``, so a CSV logger is added when the config names only other loggers
(``--trainer.logger lightning.pytorch.loggers.MLFlowLogger`` too), and every other logger is pointed into the
same directory: TensorBoard's event files beside ``metrics.csv``, MLflow's store under ``<run dir>/mlflow``
(unless ``MLFLOW_TRACKING_URI`` names a server), W&B's files under ``<run dir>/wandb``, offline unless an API key
or ``WANDB_MODE=online`` says otherwise. See docs/trackers.md.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal, NamedTuple

from peftlab.errors import PeftLabError

TrackerName = Literal["mlflow", "wandb", "tensorboard"]


class Tracker(NamedTuple):
    """An experiment tracker: Lightning's logger class, the module it needs, and the peftlab extra providing it."""

    logger: str  # class path of the Lightning logger
    module: str  # the import it needs
    extra: str | None  # pip install 'peftlab[EXTRA]' (None: a core dependency)


TRACKERS: dict[str, Tracker] = {
    "mlflow": Tracker("lightning.pytorch.loggers.MLFlowLogger", "mlflow", "mlflow"),
    "wandb": Tracker("lightning.pytorch.loggers.WandbLogger", "wandb", "wandb"),
    "tensorboard": Tracker("lightning.pytorch.loggers.TensorBoardLogger", "tensorboard", None),
}
#: the run name when no logger of the config gives one (``--trainer.logger MLFlowLogger`` alone)
DEFAULT_NAME = "lightning_logs"


def missing_tracker(err: BaseException | None) -> PeftLabError | None:
    """One line naming the extra to install when ``err`` (or what caused it) is a tracker's missing package:
    Lightning's loggers raise ``ModuleNotFoundError("Requirement 'mlflow>=1.0.0' not met ...")``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ImportError):
            text = f"{err} {getattr(err, 'name', '') or ''}"
            for name, tracker in TRACKERS.items():
                if tracker.extra and f"'{tracker.module}" in text or getattr(err, "name", None) == tracker.module:
                    return _missing(name)
        err = err.__cause__ or err.__context__
    return None


def _missing(name: str) -> PeftLabError:
    tracker = TRACKERS[name]
    install = f"pip install 'peftlab[{tracker.extra}]'" if tracker.extra else f"pip install {tracker.module}"
    return PeftLabError(f"the {name} tracker needs the {tracker.module} package, which is not installed: {install} "
                        "(or drop it from --trackers / trainer.logger); see docs/trackers.md")


def check_available(names: list[str] | tuple[str, ...]) -> None:
    """Refuse, in one line, a tracker whose package is missing (before any data or model is loaded)."""
    for name in names:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise _missing(name)


def arrange(trainer, names: list[str] | tuple[str, ...] = ()) -> None:
    """Make ``trainer``'s loggers write one run directory: a CSV logger first (Lightning's ``trainer.log_dir`` and
    the checkpoint directory follow the first logger), the configured loggers pinned to its version, and the
    trackers ``names`` added under it. A run with the logger off (``trainer.logger: false``) is left alone."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = list(trainer.loggers)
    if not loggers:
        if names:
            raise PeftLabError(f"--trackers {','.join(names)} needs a run directory, but trainer.logger is off; "
                               "drop --trackers or turn the logger on")
        return
    csv = next((lg for lg in loggers if isinstance(lg, CSVLogger)), None)
    if csv is None:  # the directory of the first TensorBoard logger, else <default_root_dir>/runs/lightning_logs
        base = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None)
        csv = CSVLogger(base.save_dir, name=base.name, version=base.version) if base else \
            CSVLogger(os.path.join(trainer.default_root_dir, "runs"), name=DEFAULT_NAME)
    loggers = [csv, *(lg for lg in loggers if lg is not csv)]
    for logger in loggers[1:]:
        if isinstance(logger, TensorBoardLogger):
            # Loggers pick their version when first asked, each from its own directory listing: two of them
            # in one save_dir would write version_0 and version_1. Only the constructor takes these, and the
            # configured logger is built before the run directory is known.
            logger._root_dir, logger._name, logger._version = csv.save_dir, csv.name, csv.version
    _ = csv.experiment  # creates the run directory first: the CSV logger warns about one that trackers created
    present = {type(lg).__name__ for lg in loggers}
    for name in names:
        if TRACKERS[name].logger.rsplit(".", 1)[-1] not in present:
            loggers.append(build(name, csv))
    trainer.loggers = loggers


def build(name: str, csv) -> object:
    """The Lightning logger of tracker ``name``, writing under the CSV logger ``csv``'s run directory."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    check_available([name])
    run_dir = Path(csv.log_dir)
    version = run_dir.name
    if name == "tensorboard":
        return TensorBoardLogger(csv.save_dir, name=csv.name, version=csv.version)
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or local_mlflow_uri(run_dir)
        experiment, artifacts = csv.name or DEFAULT_NAME, (run_dir / "mlflow" / "artifacts").resolve().as_uri()
        import mlflow

        client = mlflow.MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:  # else the logger warns that it creates one
            client.create_experiment(experiment, artifact_location=artifacts)
        return MLFlowLogger(experiment_name=experiment, run_name=version, tracking_uri=uri, artifact_location=artifacts)
    online = os.environ.get("WANDB_MODE") == "online" or (
        bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") not in ("offline", "disabled"))
    run_dir.mkdir(parents=True, exist_ok=True)  # W&B writes <save_dir>/wandb and wants save_dir to exist
    if not online:
        print(f"[peftlab] W&B runs offline (no WANDB_API_KEY, or WANDB_MODE=offline): `wandb sync {run_dir}/wandb/"
              "offline-run-*` uploads it later", flush=True)
    return WandbLogger(project=csv.name or DEFAULT_NAME, name=version, save_dir=str(run_dir), offline=not online)


def local_mlflow_uri(run_dir: Path) -> str:
    """MLflow's tracking store inside the run directory: a SQLite file (MLflow 3 refuses the file store)."""
    (run_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"
