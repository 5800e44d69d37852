"""``LMEval``: lm-evaluation-harness tasks on the model being trained, after validations and on test, logged beside
the loss as ``<stage>/<task>/<metric>`` (``val/peftlab_rotten_tomatoes_mc/acc``).

    peftlab fit --config configs/chat_lora.yaml --trainer.callbacks+=peftlab.callbacks.LMEval \\
        --trainer.callbacks.tasks='[peftlab_rotten_tomatoes_mc]' --trainer.callbacks.limit=50

The scoring is ``peftlab evaluate``'s (:class:`peftlab.eval_lm.PeftLabLM` over the module's model, adapter applied,
a chat run's prompts in its own template); ``peftlab compare`` uses this callback for the ``lm_eval`` section of a
study and keeps each example's score (``outcomes``) for its intervals.
"""

from __future__ import annotations

import contextlib
import logging
import random

import lightning as L
import numpy as np
import torch

from peftlab.errors import PeftLabError

#: lm-eval aggregations under which a task's metric is the mean of its per-document values (those get
#: per-example intervals in ``peftlab compare``; others, e.g. corpus BLEU, only the spread over seeds)
MEAN_AGGREGATIONS = ("mean",)


def metric_name(task: str, key: str) -> str | None:
    """``<task>/<metric>`` of lm-eval's result key ``metric,filter`` (the filter appended when it is not
    ``none``: ``exact_match_extract``); None for stderr, alias and other non-metric keys."""
    if "," not in key:
        return None
    metric, _, filt = key.partition(",")
    if metric.endswith("_stderr"):
        return None
    return f"{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"


def declared_metrics(spec: dict) -> list[str]:
    """The ``<task>/<metric>`` names a task config (a shipped task or a task YAML, as a dict) will report, from its
    ``metric_list`` and ``filter_list``: what ``peftlab compare --check`` compares a study's metrics with."""
    filters = [f.get("name", "none") for f in spec.get("filter_list") or []] or ["none"]
    metrics = [m["metric"] for m in spec.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    if not metrics:  # lm-eval's defaults per output type
        metrics = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["perplexity", "acc"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
                   "generate_until": ["exact_match"]}.get(spec.get("output_type"), [])
    return [f"{spec['task']}/{m if f == 'none' else f'{m}_{f}'}" for m in metrics for f in filters]


@contextlib.contextmanager
def _kept_random_state():
    """lm-eval seeds python, numpy and torch when it starts; a run's own random streams (dropout, data order)
    must not depend on whether it was evaluated."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class LMEval(L.Callback):
    """Run lm-evaluation-harness tasks on the trained model and log every metric as ``<stage>/<task>/<metric>``.

    Under DDP the first rank scores (each rank holds the whole model) and the metrics are broadcast to every rank;
    a sharded model (FSDP) is refused: score its exported run with ``peftlab evaluate``.

    Args:
        tasks: peftlab's ``peftlab_*`` tasks, lm-eval task names or task YAML files
        stages: ``val`` (after validations), ``test`` or both
        every_n_validations: during fit, score at every N-th validation only
        limit: documents per task (an integer), or a fraction of each task below 1.0
        num_fewshot: few-shot examples per prompt (default: the task's own)
        batch_size: requests per forward pass
        max_gen_toks: tokens generated when a generation task does not say
        seed: lm-eval's few-shot sampling seed (the run's own random state is left as it was)
        apply_chat_template: format prompts with the chat template (default: when the run trains on chat data)
        include_path: a folder of your own task YAMLs for lm-eval's index
    """

    def __init__(self, tasks: list[str], stages: list[str] | tuple[str, ...] = ("test",), every_n_validations: int = 1,
                 limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                 max_gen_toks: int = 256, seed: int = 0, apply_chat_template: bool | None = None,
                 include_path: str | None = None):
        super().__init__()
        from peftlab.evaluate import check_limit, check_lm_eval, resolve_tasks

        unknown = sorted(set(stages) - {"val", "test"})
        if unknown:
            raise PeftLabError(f"LMEval stages {unknown} are unknown; use val and/or test")
        if not tasks:
            raise PeftLabError("LMEval needs at least one task, e.g. tasks: [peftlab_rotten_tomatoes_mc]")
        if every_n_validations < 1 or batch_size < 1:
            raise PeftLabError("LMEval: every_n_validations and batch_size must be at least 1")
        check_lm_eval()
        self.limit = check_limit(limit)
        self.tasks = list(tasks)
        self.specs, self.manager = resolve_tasks(self.tasks, include_path)
        self.stages = tuple(stages)
        self.every_n_validations = int(every_n_validations)
        self.num_fewshot, self.batch_size, self.max_gen_toks = num_fewshot, int(batch_size), int(max_gen_toks)
        self.seed, self.apply_chat_template = int(seed), apply_chat_template
        #: the last scoring per stage: ``{"<task>/<metric>": value}``
        self.metrics: dict[str, dict[str, float]] = {}
        #: per-document scores of the last scoring per stage: ``{task: {metric: [value per document], "n": [...]}}``
        #: (mean-aggregated metrics only, documents in lm-eval's order)
        self.outcomes: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._validations = 0

    # -------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if pl_module.task != "causal_lm":
            raise PeftLabError(f"LMEval scores a causal LM's text; this run's task is {pl_module.task} (use "
                               "data.task causal_lm or chat)")
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise PeftLabError("LMEval needs the whole model on one process; under a sharded strategy (FSDP) score "
                               "the exported run afterwards: peftlab evaluate RUN --tasks ...")

    def on_validation_epoch_end(self, trainer, pl_module):
        if "val" not in self.stages or trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations == 0:
            self._score(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        if "test" in self.stages:
            self._score(trainer, pl_module, "test")

    def state_dict(self) -> dict:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self._validations = int(state_dict.get("validations", 0))

    # -------------------------------------------------------------- scoring
    def _score(self, trainer, pl_module, stage: str) -> None:
        payload = self.score(trainer, pl_module) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            payload = trainer.strategy.broadcast(payload, src=0)
        metrics, outcomes = payload
        self.metrics[stage], self.outcomes[stage] = metrics, outcomes
        for name, value in metrics.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False, on_step=False, on_epoch=True)

    def score(self, trainer, pl_module) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
        """(``{"<task>/<metric>": value}``, per-document scores) of the module as it is now."""
        from peftlab.eval_lm import PeftLabLM
        from peftlab.evaluate import run_tasks

        fmt = {}
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "prompt_format"):
            fmt = datamodule.prompt_format() or {}
        chat = fmt.get("kind") == "chat"
        lm = PeftLabLM(pl_module.model, pl_module.tokenizer, batch_size=self.batch_size,
                       max_gen_toks=self.max_gen_toks, chat=chat, template=fmt.get("chat_template"),
                       system_prompt=fmt.get("system_prompt"), pads_exactly=type(pl_module).pads_exactly)
        use_chat = chat if self.apply_chat_template is None else self.apply_chat_template
        was_training = pl_module.model.training
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # lm-eval's per-task INFO lines would drown the training log
        try:
            with _kept_random_state():
                results = run_tasks(lm, self.specs, self.manager, limit=self.limit, num_fewshot=self.num_fewshot,
                                    seed=self.seed, apply_chat_template=bool(use_chat), log_samples=True)
        finally:
            quiet.setLevel(level)
            pl_module.model.train(was_training)
        return self.read(results)

    @staticmethod
    def read(results: dict) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
        """(metrics, per-document scores) of lm-eval's results dict (``log_samples`` on)."""
        metrics: dict[str, float] = {}
        for task, values in (results.get("results") or {}).items():
            for key, value in values.items():
                name = metric_name(task, key)
                if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[name] = float(value)
        outcomes: dict[str, dict[str, list[float]]] = {}
        for task, rows in (results.get("samples") or {}).items():
            aggregations = (results.get("configs") or {}).get(task, {}).get("metric_list") or []
            means = {m["metric"] for m in aggregations
                     if isinstance(m, dict) and m.get("aggregation", "mean") in MEAN_AGGREGATIONS}
            columns: dict[str, dict[int, float]] = {}
            for row in rows:
                filt = row.get("filter", "none")
                for metric in row.get("metrics") or []:
                    if aggregations and metric not in means:
                        continue
                    value = row.get(metric)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        name = metric_name(task, f"{metric},{filt}").split("/", 1)[1]
                        columns.setdefault(name, {})[int(row["doc_id"])] = float(value)
            if columns:
                docs = sorted(next(iter(columns.values())))
                outcomes[task] = {name: [byid[d] for d in docs] for name, byid in columns.items()
                                  if sorted(byid) == docs}
                outcomes[task]["n"] = [1.0] * len(docs)
        return metrics, outcomes
