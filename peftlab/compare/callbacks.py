"""Lightning callbacks of ``peftlab compare`` runs.

* the generated-text metrics (``{val,test}/gen_exact_match``, ``rougeL``, ``bleu``) come from
  :class:`peftlab.callbacks.GenerationEval`, the callback any ``peftlab fit`` can use;
* :class:`TestOutcomes`: the per-example outcomes of the test split (correct / loss / confusion cell, or the
  target tokens' loss, teacher-forced exact match and the generated-text scores), which the bootstrap of the
  report resamples; optionally the loss on a reference corpus before and after training (forgetting) and the
  forward latency of a test batch;
* lm-eval task metrics (``{val,test}/<task>/<metric>``) come from :class:`peftlab.callbacks.LMEval`
  (:func:`lm_eval_callback`), whose per-document scores :class:`TestOutcomes` keeps beside its own columns;
* :class:`TrialReporter`: reports the validation metric to an Optuna trial at every validation (successive
  halving prunes on it: the run stops), prints progress, and remembers the best value.
"""

from __future__ import annotations

import statistics
import threading
import time

import lightning as L
import torch

from peftlab.callbacks.generation import GenerationEval
from peftlab.callbacks.harness import LMEval
from peftlab.compare import stats


def lm_eval_callback(settings: dict | None, stages: tuple[str, ...]) -> LMEval | None:
    """The :class:`~peftlab.callbacks.LMEval` of a study part's ``lm_eval`` section for ``stages`` (None without
    one)."""
    if not settings or not stages:
        return None
    return LMEval(settings["tasks"], stages=stages, limit=settings.get("limit"), num_fewshot=settings.get("num_fewshot"),
                  batch_size=int(settings.get("batch_size") or 8), max_gen_toks=int(settings.get("max_gen_toks") or 32))


class TestOutcomes(L.Callback):
    """Per-example outcomes of the test split, from the logits the model computes in its own test step (a forward
    hook on the trained model: no second forward pass). ``result`` holds them after ``trainer.test``:
    ``{"columns": {name: [per-example values]}, "metrics": {...}, ...}``.

    Args:
        generation: the run's :class:`~peftlab.callbacks.GenerationEval`, whose per-example scores join the columns
        forgetting: ``{source, text_column, max_samples, max_length, batch_size}``: the LM loss on that corpus before training
            (on_fit_start) and after (the tested checkpoint, on_test_end)
        latency: ``{repeats, warmup}``: median forward time of the first test batch
        lm_eval: the run's :class:`~peftlab.callbacks.LMEval`, whose per-document test scores go to
            ``result["lm_eval"]`` (``{task: {metric: [...], "n": [...]}}``: lm-eval's documents, not the test split's)
    """

    __test__ = False  # not a pytest test class

    def __init__(self, generation: GenerationEval | None = None, forgetting: dict | None = None,
                 latency: dict | None = None, lm_eval: LMEval | None = None):
        super().__init__()
        self.generation = generation
        self.lm_eval = lm_eval
        self.forgetting = forgetting
        self.latency = latency
        self.result: dict = {}
        self._rows: list[dict] = []
        self._captured = None
        self._handle = None
        self._first_batch = None
        self._before: float | None = None

    # -------------------------------------------------------------- forgetting
    def _reference_loss(self, pl_module) -> float:
        from peftlab.data import PeftDataModule
        from peftlab.methods.base import token_nll

        cfg = self.forgetting
        data = PeftDataModule(source=cfg["source"], task="causal_lm", tokenizer=pl_module.hparams.backbone,
                              prompt_template="{" + cfg.get("text_column", "text") + "}", response_template="",
                              loss_on="all",
                              max_length=int(cfg["max_length"]), batch_size=int(cfg["batch_size"]),
                              max_eval_samples=int(cfg["max_samples"]))
        was_training = pl_module.training
        pl_module.eval()
        total = count = 0.0
        try:
            with torch.no_grad():
                for batch in data.test_dataloader():
                    batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                    labels = batch.pop("labels")
                    nll, n = token_nll(pl_module(**batch, use_cache=False).logits, labels, "causal_lm")
                    total += float(nll)
                    count += float(n)
        finally:
            pl_module.train(was_training)
        return total / max(count, 1.0)

    def on_fit_start(self, trainer, pl_module):
        # a resumed run restored the loss measured before its first step (state_dict): measuring now would
        # measure a partly trained model
        if self.forgetting and self._before is None:
            self._before = self._reference_loss(pl_module)

    def state_dict(self) -> dict:
        return {"reference_loss_before": self._before}

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = state_dict.get("reference_loss_before")

    # -------------------------------------------------------------- test outcomes
    def on_test_epoch_start(self, trainer, pl_module):
        self._rows = []

        def hook(module, args, kwargs, output):
            if self._captured is None:
                self._captured = output.logits.detach()

        self._handle = pl_module.model.register_forward_hook(hook, with_kwargs=True)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._captured = None
        if batch_idx == 0 and self.latency:
            self._first_batch = {k: v for k, v in batch.items()}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        logits, labels = self._captured, batch["labels"]
        if logits is None:
            raise RuntimeError("peftlab compare: the test step did not call the model's forward")
        if pl_module.task == "classification":
            ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            for p, t, c in zip(logits.argmax(-1).tolist(), labels.tolist(), ce.tolist()):
                self._rows.append({"pred": p, "label": t, "ce": c})
            return
        from peftlab.methods.base import target_logits

        lg, lb = target_logits(logits, labels, pl_module.task)
        nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.reshape(-1),
                                                ignore_index=-100, reduction="none").view(lb.shape)
        target = lb != -100
        right = ((lg.argmax(-1) == lb) | ~target).all(-1)
        for i in range(len(lb)):
            has = bool(target[i].any())
            self._rows.append({"nll": float(nll[i].sum()), "tokens": float(target[i].sum()),
                               "tf_exact": float(right[i]) if has else 0.0, "has_target": float(has)})

    def on_test_epoch_end(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_test_end(self, trainer, pl_module):
        rows = self._rows
        if pl_module.task == "classification":
            columns = {k: [float(v) for v in vals] for k, vals in stats.classification_columns(
                [r["pred"] for r in rows], [r["label"] for r in rows], [r["ce"] for r in rows],
                int(pl_module.num_labels or 2)).items() if not k.startswith("cm_")}
            columns.update(pred=[float(r["pred"]) for r in rows], label=[float(r["label"]) for r in rows])
        else:
            columns = {k: [r[k] for r in rows] for k in ("nll", "tokens", "tf_exact", "has_target")}
            columns["n"] = [1.0] * len(rows)
            gen = self.generation.examples.get("test") if self.generation else None
            samples = []
            if gen:
                if len(gen) != len(rows):
                    raise RuntimeError(f"generated {len(gen)} test examples but scored {len(rows)}")
                for key in gen[0]:
                    if key == "sample":
                        continue
                    columns[key] = [float(g[key]) for g in gen]
                samples = [g["sample"] for g in gen if "sample" in g]
            self.result["samples"] = samples
        self.result.update(columns={k: [round(v, 6) for v in vals] for k, vals in columns.items()},
                           num_labels=int(pl_module.num_labels or 0) if pl_module.task == "classification" else None,
                           task=pl_module.task, examples=len(rows))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        self.result["metrics"] = metrics
        if self.lm_eval is not None and "test" in self.lm_eval.outcomes:
            self.result["lm_eval"] = {task: {k: [round(v, 6) for v in vals] for k, vals in cols.items()}
                                      for task, cols in self.lm_eval.outcomes["test"].items()}
        if self.forgetting:
            after = self._reference_loss(pl_module)
            self.result["forgetting"] = {"before": self._before, "after": after,
                                         "delta": after - self._before if self._before is not None else None,
                                         "source": self.forgetting["source"]}
        if self.latency and self._first_batch is not None:
            self.result["latency"] = self._measure_latency(pl_module)

    def _measure_latency(self, pl_module) -> dict:
        batch = {k: v.to(pl_module.device) for k, v in self._first_batch.items() if k != "labels"}
        cuda = pl_module.device.type == "cuda"
        was_training = pl_module.training
        pl_module.eval()
        times = []
        try:
            with torch.inference_mode():
                for i in range(int(self.latency["warmup"]) + int(self.latency["repeats"])):
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    pl_module(**batch)
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= int(self.latency["warmup"]):
                        times.append(time.perf_counter() - start)
        finally:
            pl_module.train(was_training)
        rows = int(batch["input_ids"].shape[0])
        return {"ms_per_batch": 1000 * statistics.median(times), "batch_size": rows,
                "tokens": int(batch["input_ids"].shape[1]), "repeats": len(times)}


class TrialReporter(L.Callback):
    """Reports ``monitor`` to an Optuna ``trial`` after every validation and stops the run when the pruner says so;
    prints one progress line per validation through ``say``. ``best`` / ``history`` / ``pruned_at`` after fit."""

    def __init__(self, monitor: str, mode: str, say, trial=None, label: str = ""):
        super().__init__()
        self.monitor, self.mode, self.say, self.trial, self.label = monitor, mode, say, trial, label
        self.history: list[tuple[int, float]] = []
        self.pruned_at: int | None = None
        self.trainable: int | None = None
        self.total: int | None = None

    @property
    def best(self) -> float | None:
        values = [v for _, v in self.history if stats.finite(v)]
        if not values:
            return None
        return min(values) if self.mode == "minimize" else max(values)

    def on_fit_start(self, trainer, pl_module):
        self.trainable, self.total = int(pl_module.trainable_count), int(pl_module.total_count)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(f"{self.monitor} was not logged by the validation (logged: "
                               f"{', '.join(sorted(trainer.callback_metrics))})")
        value, step = float(value), int(trainer.global_step)
        self.history.append((step, value))
        line = f"step {step}/{trainer.max_steps if trainer.max_steps > 0 else '?'}  {self.monitor} {value:.4f}"
        if self.trial is not None:
            self.trial.report(value, step)
            if self.trial.should_prune():
                self.pruned_at = step
                trainer.should_stop = True
                line += "  -> pruned (successive halving)"
        self.say(f"    {self.label}{line}")


class Heartbeat:
    """Records an Optuna RDB heartbeat for a running trial every ``interval`` seconds (a thread), so other workers
    can tell a trial whose process died from one still running (``RDBStorage(heartbeat_interval=...)``)."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed heartbeat must not kill the run
                pass

    def __enter__(self):
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception:  # noqa: BLE001
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False
