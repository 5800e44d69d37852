"""Several adapters trained in one run: one task per adapter, on one frozen backbone (``model: MultiTask``).

    model:
      class_path: peftlab.multitask.MultiTask
      init_args:
        backbone: packaged:SmolLM2-135M-Instruct
        learning_rate: 3.0e-4
        tasks:
          sentiment: {class_path: peftlab.methods.LoRA, init_args: {r: 8, target_modules: [q_proj, v_proj]}}
          plots: {class_path: peftlab.methods.PromptTuning, init_args: {num_virtual_tokens: 10, learning_rate: 3.0e-2}}
    data:
      task: causal_lm
      tasks: {sentiment: {source: reviews.jsonl}, plots: {source: plots.jsonl}}
      task_weights: {sentiment: 3, plots: 1}

How: the backbone is loaded once; each task's method is built on a structural copy of it whose frozen tensors are
the backbone's own (:func:`peftlab.adapter_set.build_on_shared`, as an adapter set does), so memory is one backbone
plus the adapters, and any method that leaves the backbone's weights alone can be a task (LoRA family, QLoRA,
bottleneck adapters, prompt tuning, P-tuning, prefix tuning, P-tuning v2, stacks). Every training batch holds rows
of every task (``data.tasks``, :mod:`peftlab.data.multitask`); each task's rows go through its own adapter, and
each task's loss is its own mean over its own target tokens. So a row's gradient reaches only its task's adapter,
each adapter's gradient is exactly that of a run of its task alone on the same rows, and AdamW (per parameter)
and per-task gradient clipping keep it so: K adapters trained together equal K runs of one task each
(``tests/unit/test_multitask.py``). The optimizer, its schedule and weight decay are the run's; the learning rate may
differ per task.

Validation and test report every metric per task (``val/<task>/loss``, ...) and ``val/loss``, the mean of the
tasks' losses (what a checkpoint callback can monitor). Exports: ``<run>/adapter/{best,last}/<task>/`` is each
task's adapter alone (``load_run``, plain peft where its format allows, ``peftlab serve``, ``peftlab
export-lora``); ``load_adapters`` of the run loads them all on one backbone.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import nn

from peftlab.adapter_set import build_on_shared
from peftlab.adapters import rewrite_meta
from peftlab.backbones import count_parameters, load_tokenizer
from peftlab.callbacks import GenerationEval, LMEval
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.methods.base import PeftModule
from peftlab.methods.registry import import_method

#: settings every task shares with the run (one optimizer and schedule over all adapters, one backbone)
RUN_SETTINGS = ("backbone", "task", "optimizer", "scheduler", "warmup_ratio", "weight_decay", "dtype",
                "trust_remote_code", "revision", "attn_implementation", "matmul_precision", "gradient_checkpointing")


class MultiTask(PeftModule):
    """Several tasks in one run on one frozen backbone, each task training its own adapter (docs/multi-task.md).

    Args:
        tasks: ``{name: method}``: each task's method as a config, ``{class_path: peftlab.methods.LoRA,
            init_args: {r: 8}}`` (or a class path alone); the run's own settings (backbone, learning rate, ...) are
            every task's defaults, and a task may set its own ``learning_rate``. The names are ``data.tasks``'s.
        **kwargs: the :class:`~peftlab.methods.PeftModule` arguments shared by the tasks.
    """

    def __init__(self, tasks: dict[str, dict[str, Any] | str], **kwargs):
        if kwargs.get("task", "classification") == "classification":
            raise PeftLabError("a multi-task run trains generative tasks (data.task causal_lm, chat or seq2seq) for "
                               "now: classification tasks need a head and label count each; train them in runs of "
                               "their own and combine them with load_adapters")
        super().__init__(**kwargs)
        if not tasks or not isinstance(tasks, dict):
            raise PeftLabError("model.tasks needs at least one task: {name: {class_path: ..., init_args: {...}}}")
        shared = {k: v for k, v in self.hparams.items() if k != "tasks" and not k.startswith("_")}
        self.task_methods = nn.ModuleDict({name: task_method(name, spec, shared) for name, spec in tasks.items()})
        self.task_names = list(tasks)

    # ------------------------------------------------------------------ building
    def build(self, backbone: nn.Module | None = None, tokenizer=None):
        """Load the backbone once and build every task's method on a shared copy of it; return ``self``."""
        if self.model is not None:
            return self
        first = next(iter(self.task_methods.values()))
        keys = {name: m.shared_backbone_key() for name, m in self.task_methods.items()}
        for name, key in keys.items():
            if key != keys[self.task_names[0]]:
                diff = ", ".join(f"{k} {key.get(k)!r} vs {keys[self.task_names[0]].get(k)!r}" for k in sorted(key)
                                 if key.get(k) != keys[self.task_names[0]].get(k))
                raise PeftLabError(f"model.tasks.{name} loads the backbone differently from "
                                   f"{self.task_names[0]} ({diff}); the tasks of a run share one backbone")
        h = self.hparams
        self.tokenizer = tokenizer or load_tokenizer(h.backbone, trust_remote_code=h.trust_remote_code,
                                                     revision=h.revision)
        backbone = backbone if backbone is not None else first.load_backbone()  # QLoRA's 4-bit loading, once
        backbone.requires_grad_(False)
        # every task starts from the same random state, as a run of that task alone with the run's seed would
        state = torch.random.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        for method in self.task_methods.values():
            torch.random.set_rng_state(state)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            build_on_shared(method, backbone, self.tokenizer)
        self.model = backbone.train()  # never called itself (each task runs its copy); in train mode as they are
        self.trainable_count, self.total_count = count_parameters(self)
        return self

    def check(self) -> None:
        """Each task's settings on this backbone (a meta-device build of each method, as for a run of one)."""
        for method in self.task_methods.values():
            method.check()

    def check_data(self, datamodule) -> None:
        """The data must name the model's tasks (``data.tasks``, in the same order); each task's data is checked by
        its method."""
        if datamodule is None:
            return
        task_data = getattr(datamodule, "task_data", None)
        if task_data is None:
            raise PeftLabError("model MultiTask needs one data source per task: set data.tasks ({name: {source: "
                               f"...}}) with the model's task names ({', '.join(self.task_names)})")
        if list(task_data) != self.task_names:
            raise PeftLabError(f"model.tasks ({', '.join(self.task_names)}) and data.tasks "
                               f"({', '.join(task_data)}) must name the same tasks, in the same order")
        for name, method in self.task_methods.items():
            method.check_data(task_data[name])

    # ------------------------------------------------------------------ training
    def forward(self, **batch):
        raise PeftLabError("a MultiTask run has one model per task: call run.task_methods[name](**batch)")

    def set_token_scale(self, datamodule) -> None:
        for name, method in self.task_methods.items():  # each task's own constant, as a run of it alone
            method.set_token_scale(datamodule.task_data[name])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            unsupported = [type(c).__name__ for c in self.trainer.callbacks if isinstance(c, (GenerationEval, LMEval))]
            if unsupported:
                raise PeftLabError(f"{', '.join(unsupported)} does not evaluate a multi-task run yet; remove it and "
                                   "evaluate each task's adapter (<run>/adapter/best/<task>) with peftlab test / "
                                   "peftlab evaluate")

    def training_step(self, batch: dict[str, dict], batch_idx):
        """``batch``: ``{task: its rows}``; the sum of every task's own loss (each scaled as a run of that task alone
        scales it), so each adapter's gradient is its task's alone."""
        total = 0.0
        for name, rows in batch.items():
            method = self.task_methods[name]
            loss, loss_sum, count = method.micro_batch_loss(rows)
            method._add_to_step(loss_sum, count)
            if method.task != "classification":
                loss = loss * (self.trainer.accumulate_grad_batches / method._token_scale)
            total = total + loss
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        """Per task: its step's mean loss (logged as ``train/<task>/loss``) and its gradient made the mean over its
        own target tokens; ``train/loss`` is the mean over the tasks."""
        means = []
        for name, method in self.task_methods.items():
            stats, method._step_stats = method._step_stats, None
            if stats is None:
                continue
            mean = self.finish_step(stats, method.parameters(), method._token_scale)
            self.log(f"train/{name}/loss", mean, on_step=True, on_epoch=False, sync_dist=False)
            means.append(mean)
        if means:
            self.log("train/loss", torch.stack(means).mean(), prog_bar=True, on_step=True, on_epoch=False,
                     sync_dist=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip each task's gradient on its own: one norm over every adapter would let one task's gradient shrink
        another's."""
        if not gradient_clip_val:
            return
        for method in self.task_methods.values():
            params = [p for p in method.parameters() if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def optimizer_groups(self) -> list[dict]:
        """Every task's own groups, at the task's learning rate where its group names none."""
        groups = []
        for method in self.task_methods.values():
            for group in method.optimizer_groups():
                groups.append({"lr": method.hparams.learning_rate, **group})
        return groups

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.task_methods[self.task_names[dataloader_idx]]._eval_step(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.task_methods[self.task_names[dataloader_idx]]._eval_step(batch, "test")

    def _reset_metrics(self, stage):
        for method in self.task_methods.values():
            method._reset_metrics(stage)

    def _log_epoch(self, stage):
        values, losses = {}, []
        for name, method in self.task_methods.items():
            for key, metric in method.metrics[stage].items():
                if metric.update_count:  # a task without validation rows reports nothing
                    values[f"{stage}/{name}/{key}"] = metric.compute()
            loss = values.get(f"{stage}/{name}/loss")
            if loss is not None:
                losses.append(loss)
                if method.task != "classification":
                    values[f"{stage}/{name}/ppl"] = torch.exp(loss.clamp(max=50))
        if losses:
            values[f"{stage}/loss"] = torch.stack(losses).mean()
        self.log_dict(values, prog_bar=False, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        raise PeftLabError("peftlab predict runs one task: use one task's adapter (<run>/adapter/best/<task>)")

    # ------------------------------------------------------------------ capabilities
    def export(self, directory) -> str:
        """Each task's adapter in ``directory/<task>/``, as a run of that task alone would export it."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        task_data = getattr(datamodule, "task_data", None) or {}
        for name, method in self.task_methods.items():
            data = task_data.get(name)
            export_adapter(method, directory / name, label_names=data.label_names if data else None,
                           prompt=data.prompt_format() if data else None)
        rewrite_meta(directory, tasks=self.task_names)
        return "multi-task"

    def serving_engine_refusal(self) -> str | None:
        return ("a multi-task export holds one adapter per task, in <task>/ subdirectories; serve or convert each "
                "(peftlab serve a=<dir>/a b=<dir>/b, peftlab export-lora <dir>/a)")

    def multitask_refusal(self) -> str | None:
        return "a MultiTask run cannot be one task of another"


def task_method(name: str, spec: dict | str, shared: dict) -> PeftModule:
    """Task ``name``'s method from its config, with the run's ``shared`` settings as defaults; refused in one line
    when it cannot be a task (it changes the backbone, it is itself a multi-task run, it sets a run setting)."""
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise PeftLabError(f"model.tasks.{name} must be a method config {{class_path: ..., init_args: {{...}}}} "
                           f"(got {spec!r})")
    cls = import_method(spec["class_path"], f"model.tasks.{name}.class_path")
    own = dict(spec.get("init_args") or {})
    clash = sorted(k for k in own if k in RUN_SETTINGS and own[k] != shared.get(k))
    if clash:
        raise PeftLabError(f"model.tasks.{name} sets {', '.join(clash)}, which every task shares with the run; set "
                           f"model.init_args.{clash[0]} instead")
    if own.get("head_learning_rate"):
        raise PeftLabError(f"model.tasks.{name}.head_learning_rate is not supported in a multi-task run; set the "
                           "task's learning_rate")
    args = {**{k: v for k, v in shared.items() if k not in ("num_labels", "head_learning_rate")}, **own}
    # in an empty context: under LightningCLI, save_hyperparameters reads the hyperparameters the CLI gave the
    # top-level module (MultiTask's) from a context variable, and would record them as the task's own
    method = contextvars.Context().run(cls, **args)
    # without the CLI it collects the arguments of the __init__ frames above, MultiTask's among them
    method.hparams.pop("tasks", None)
    reason = method.multitask_refusal()
    if reason:
        raise PeftLabError(f"model.tasks.{name} ({cls.__name__}) cannot be a task of a multi-task run: {reason}")
    return method
