"""Several tasks' data in one run (``data.tasks``): one :class:`~peftlab.data.PeftDataModule` per task, and
training batches that hold rows of every task (``{task: sub-batch}``, :class:`~peftlab.data.loading.CycleLoader`).

Each task's rows are its own data module's batches at its share of the batch size: with ``shuffle: false`` exactly
the batches a run of that task alone at that batch size sees (``tests/unit/test_multitask.py`` relies on it); shuffled,
each task's order is drawn from the run's random state after the tasks before it drew theirs.
"""

from __future__ import annotations

import inspect
from typing import Any

from peftlab.backbones import model_task
from peftlab.data.loading import CycleLoader
from peftlab.errors import PeftLabError, did_you_mean

#: a PeftDataModule (not imported here: it imports this module)
DataModule = Any

#: settings of the whole run, never one task's
RUN_SETTINGS = ("tasks", "task_weights", "tokenizer", "batch_size")


def task_modules(parent: DataModule, tasks: dict | None, weights: dict | None):
    """``({task: its data module}, {task: its rows per training batch})`` for ``data.tasks``, each task's settings
    over ``parent``'s; refused in one line: no tasks, an unknown setting, a task of another model task, bad weights."""
    if not tasks or not isinstance(tasks, dict):
        raise PeftLabError("data.tasks needs at least one task: {name: {source: ...}, ...} (data.task_weights alone "
                           "is not enough)")
    names = list(tasks)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise PeftLabError(f"data.tasks: task name {name!r} must be a plain identifier (letters, digits, _): it "
                               "names the task's adapter directory and metrics")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise PeftLabError(f"data.task_weights names {', '.join(map(repr, unknown))}, which data.tasks does not "
                           f"have (tasks: {', '.join(names)})")
    if any(not isinstance(w, (int, float)) or w <= 0 for w in weights.values()):
        raise PeftLabError(f"data.task_weights must all be > 0 (got {weights})")
    cls = type(parent)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", *RUN_SETTINGS}
    common = {k: v for k, v in parent.hparams.items() if k in allowed}
    common["task"] = parent.task  # chat data logs its task as chat_task
    sizes = batch_shares(parent.batch_size, {n: float(weights.get(n, 1.0)) for n in names})
    modules = {}
    for name, settings in tasks.items():
        settings = dict(settings or {})
        bad = sorted(set(settings) - allowed)
        if bad:
            hint = did_you_mean(bad[0], sorted(allowed))
            raise PeftLabError(f"data.tasks.{name}: {', '.join(bad)} is not a data setting of one task "
                               f"(batch_size and tokenizer are the run's; use data.task_weights for shares).{hint}")
        task = settings.get("task", parent.task)
        if model_task(task) != parent.model_task:
            raise PeftLabError(f"data.tasks.{name}: task {task!r} trains a {model_task(task)} model but data.task "
                               f"{parent.task!r} a {parent.model_task} one; the tasks of a run share one backbone")
        modules[name] = cls(**{**common, **settings, "tokenizer": parent.tokenizer_name, "batch_size": sizes[name]})
    return modules, sizes


def batch_shares(batch_size: int, weights: dict[str, float]) -> dict[str, int]:
    """Each task's rows in a training batch: ``batch_size`` split by ``weights`` (largest remainders), at least
    one row each."""
    if batch_size < len(weights):
        raise PeftLabError(f"data.batch_size {batch_size} is smaller than the number of tasks ({len(weights)}): "
                           "every training batch holds at least one row of each task")
    total = sum(weights.values())
    exact = {n: batch_size * w / total for n, w in weights.items()}
    sizes = {n: max(1, int(x)) for n, x in exact.items()}
    by_remainder = sorted(weights, key=lambda n: exact[n] - int(exact[n]), reverse=True)
    i = 0
    while sum(sizes.values()) < batch_size:
        sizes[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(sizes.values()) > batch_size:  # the at-least-one rule took rows from the largest share
        largest = max(sizes, key=sizes.get)
        sizes[largest] -= 1
    return sizes


def train_loader(parent: DataModule):
    """Batches ``{task: that task's batch}`` over every task; an epoch lasts as long as the longest task's
    (``max_size_cycle``: the shorter ones start again)."""
    return CycleLoader({name: data.train_dataloader() for name, data in parent.task_data.items()})
