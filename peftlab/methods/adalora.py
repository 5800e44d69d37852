"""AdaLoRA (Zhang et al. 2023) through peft: LoRA in SVD form whose ranks are reallocated during training.

Each adapted layer learns ``W + (alpha / init_r) * P diag(E) Q`` with ``P: d_out x init_r``, ``E: init_r``,
``Q: init_r x d_in``. After ``tinit`` of the steps, a budget of singular values shrinks on a cubic schedule from
``init_r`` to ``target_r`` per layer on average (over all layers together, so important layers keep more), and the
least important triplets (by a smoothed |weight x gradient| sensitivity) are masked to zero; the last ``tfinal``
of the steps train with the final allocation. An orthogonality penalty keeps ``P`` and ``Q`` near orthogonal.

The schedule needs the total step count (Lightning's ``estimated_stepping_batches``, taken at fit start) and a
rank update after every optimizer step (:meth:`AdaLoRA.optimizer_step`), as peft's
``update_and_allocate(global_step)`` requires.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.adapters import rewrite_meta
from peftlab.errors import PeftLabError
from peftlab.methods.lora import check_target_modules
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod

#: total steps assumed until the trainer's is known (building without a Trainer: params, load_run)
PLACEHOLDER_TOTAL_STEP = 1000


class AdaLoRA(PeftBackedMethod):
    """AdaLoRA: SVD-form LoRA whose rank budget is reallocated across layers while training (peft's ``AdaLoraConfig``).

    Trainable: ``init_r x (d_in + d_out + 1)`` per adapted layer (+ the head); masked triplets stay allocated (peft
    masks, it does not shrink the tensors during training), and an exported adapter keeps only the allocated
    ones. ``peftlab params`` reports the rank budget at the start and the end. The sensitivity statistics (three
    values per adapter parameter, fp32) are extra training memory, which ``estimate-memory`` counts with the
    optimizer states. Merges exactly; does not compose (the masks and ``E`` make it no weighted sum of deltas).

    Checkpoints hold the rank allocator's state (sensitivity averages, the current rank pattern), so a resumed run
    continues exactly where it stopped.

    Args:
        init_r: starting rank of every adapted layer.
        target_r: average rank per layer at the end of the budget schedule.
        alpha: scaling numerator; the update is scaled by ``alpha / init_r``.
        dropout: dropout on the adapter input path.
        target_modules: module-name suffixes to adapt (as for :class:`LoRA`), or ``all-linear``.
        tinit: fraction of the total steps trained before ranks are reallocated.
        tfinal: fraction of the total steps trained with the final allocation.
        delta_t: reallocate every ``delta_t`` steps during the budget phase.
        beta1: smoothing of the sensitivity (exponential moving average).
        beta2: smoothing of its uncertainty.
        orth_reg_weight: weight of the orthogonality penalty ``||P^T P - I|| + ||Q Q^T - I||`` (mean over layers),
            added once per optimizer step whatever the task.
        total_step: optimizer steps of the schedule; ``null``: the trainer's (``estimated_stepping_batches``).
        modules_to_save: modules trained in full; ``None`` lets peft pick the classification head.
        rank_pattern: the allocation of a trained adapter (written by the export so that ``load_run`` rebuilds the
            exported shapes); leave unset to train.
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "adalora"
    family = "low-rank"
    peft_type = "ADALORA"
    mergeable = True
    adapts_targets = True
    advice = ("a larger init_r / target_r; add target modules; more steps for the budget phase",
              "a smaller target_r; dropout; fewer steps")

    def __init__(
        self,
        init_r: int = 12,
        target_r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | str = ["query", "value"],  # noqa: B006 - shown as the CLI default
        tinit: float = 0.1,
        tfinal: float = 0.2,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_step: int | None = None,
        modules_to_save: list[str] | None = None,
        rank_pattern: dict[str, list[bool]] | None = None,
        **kwargs,
    ):
        if init_r < 1 or not 1 <= target_r <= init_r:
            raise PeftLabError(f"model.init_r ({init_r}) and model.target_r ({target_r}) need 1 <= target_r <= init_r")
        if alpha <= 0:
            raise PeftLabError(f"model.alpha must be > 0 (got {alpha})")
        if not 0.0 <= dropout < 1.0:
            raise PeftLabError(f"model.dropout must be in [0, 1) (got {dropout})")
        if not (0.0 <= tinit < 1.0 and 0.0 <= tfinal < 1.0 and tinit + tfinal < 1.0):
            raise PeftLabError(f"model.tinit ({tinit}) and model.tfinal ({tfinal}) are fractions of the total steps: "
                               "each in [0, 1), together below 1, leaving a phase that reallocates ranks")
        if delta_t < 1:
            raise PeftLabError(f"model.delta_t must be >= 1 (got {delta_t})")
        if not (0.0 < beta1 < 1.0 and 0.0 < beta2 < 1.0):
            raise PeftLabError(f"model.beta1 and model.beta2 must be in (0, 1) (got {beta1}, {beta2})")
        if orth_reg_weight < 0:
            raise PeftLabError(f"model.orth_reg_weight must be >= 0 (got {orth_reg_weight})")
        if total_step is not None and total_step < 2:
            raise PeftLabError(f"model.total_step must be >= 2 (got {total_step}); null: the trainer's")
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ building
    def schedule(self, total_step: int) -> dict[str, int]:
        """peft's ``total_step``, ``tinit`` and ``tfinal`` (steps) for ``total_step`` optimizer steps."""
        h = self.hparams
        tinit, tfinal = int(h.tinit * total_step), int(h.tfinal * total_step)
        if tinit >= total_step - tfinal:
            raise PeftLabError(f"AdaLoRA: {total_step} optimizer steps leave no step to reallocate ranks with tinit "
                               f"{h.tinit} and tfinal {h.tfinal}; train longer or lower them")
        return {"total_step": total_step, "tinit": tinit, "tfinal": tfinal}

    def peft_config(self, backbone: nn.Module):
        from peft import AdaLoraConfig

        h = self.hparams
        check_target_modules(backbone, h.target_modules)
        return AdaLoraConfig(
            task_type=PEFT_TASK[self.task], init_r=h.init_r, target_r=h.target_r, lora_alpha=h.alpha,
            lora_dropout=h.dropout, target_modules=h.target_modules, modules_to_save=h.modules_to_save,
            deltaT=h.delta_t, beta1=h.beta1, beta2=h.beta2, orth_reg_weight=h.orth_reg_weight,
            **self.schedule(h.total_step or PLACEHOLDER_TOTAL_STEP))

    def attach(self, backbone: nn.Module) -> nn.Module:
        model = super().attach(backbone)
        if self.hparams.rank_pattern:
            # loading an export: peft resizes the layers to the allocation when the weights are loaded
            model.peft_config["default"].rank_pattern = dict(self.hparams.rank_pattern)
        return model

    @property
    def adalora_config(self):
        self._require_built("AdaLoRA")
        return self.model.peft_config["default"]

    def multitask_refusal(self) -> str | None:
        """The rank allocation runs in this module's own training hooks, which a multi-task run does not call."""
        return "AdaLoRA's rank allocator runs in the hooks of a run of its own; train it alone, or use LoRA as a task"

    # ------------------------------------------------------------------ training
    def on_fit_start(self):
        super().on_fit_start()
        total = self.hparams.total_step or max(2, int(self.trainer.estimated_stepping_batches))
        for key, value in self.schedule(total).items():
            setattr(self.adalora_config, key, value)

    def forward(self, **batch):
        # peft adds the orthogonality penalty to the loss it computes (classification, with labels) at every
        # micro-batch; peftlab computes the causal-LM / seq2seq loss itself. To weigh it the same for every task, it
        # is off in the forward and added once per optimizer step (on_before_optimizer_step).
        config = self.adalora_config
        weight, config.orth_reg_weight = config.orth_reg_weight, 0.0
        try:
            return super().forward(**batch)
        finally:
            config.orth_reg_weight = weight

    def orthogonality_penalty(self) -> torch.Tensor:
        """peft's penalty: mean over the adapted layers' P and Q of ``||P^T P - I||_F`` / ``||Q Q^T - I||_F``."""
        terms = []
        for name, p in self.model.named_parameters():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        weight = self.hparams.orth_reg_weight
        if weight <= 0:
            return
        params = [p for n, p in self.model.named_parameters()
                  if p.requires_grad and (".lora_A." in n or ".lora_B." in n)]
        with torch.enable_grad():
            # autograd.grad, not backward: the parameters' accumulation hooks (DDP's all-reduce) stay out of it;
            # every rank computes the same penalty from the same parameters
            grads = torch.autograd.grad(weight * self.orthogonality_penalty(), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.grad.dtype)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The optimizer step, then peft's rank update (``update_and_allocate``) with this step's index, while the
        gradients are still there (Lightning zeroes them at the start of the next step)."""
        step = self.trainer.global_step  # optimizer steps before this one
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.model.base_model.update_and_allocate(step)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        allocator = self.model.base_model.rankallocator
        config = self.adalora_config
        checkpoint["peftlab_adalora"] = {
            "ipt": dict(allocator.ipt), "exp_avg_ipt": dict(allocator.exp_avg_ipt),
            "exp_avg_unc": dict(allocator.exp_avg_unc), "rank_pattern": full_keys(config.rank_pattern),
        }

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("peftlab_adalora")
        if state is None:
            raise PeftLabError("this checkpoint has no AdaLoRA rank-allocator state (written by another method or "
                               "an older peftlab); resuming would restart the rank schedule. Start a new run")
        allocator = self.model.base_model.rankallocator
        device = next(p.device for p in self.model.parameters())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
        self.adalora_config.rank_pattern = state["rank_pattern"]

    # ------------------------------------------------------------------ reporting and export
    def trainable_parts(self) -> dict[str, int]:
        """Parameters of the SVD triplets and of the head, and the rank budget (ranks, not parameters) at the start
        (``init_r`` x layers) and at the end of the schedule (``target_r`` x layers)."""
        layers = adapter = head = 0
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_" in name:
                adapter += p.numel()
                layers += ".lora_E." in name
            else:
                head += p.numel()
        h = self.hparams
        parts = {"P, E, Q": adapter, "head": head, "ranks at start": h.init_r * layers,
                 "ranks at the end (budget)": h.target_r * layers}
        if not head:
            del parts["head"]
        return parts

    # merged_model (PeftBackedMethod's, peft's merge_and_unload): ``W + (alpha / init_r) P diag(E) Q`` (masked
    # triplets are zero) in every adapted layer

    @classmethod
    def compose_refusal(cls, config: dict, task: str | None) -> str | None:
        return ("is an AdaLoRA adapter: its update P diag(E) Q (with masked ranks) is not composed by peft's weighted "
                "sum; only LoRA and rsLoRA adapters compose")

    def training_state_bytes(self) -> int:
        """Memory of the rank allocator's statistics: three fp32 values (sensitivity, its average and its
        uncertainty) per adapter parameter (read by ``estimate-memory``)."""
        return 3 * 4 * sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and ".lora_" in n)

    def export(self, directory) -> str:
        """peft's AdaLoRA adapter, which keeps only the allocated triplets (``rank_pattern`` in its
        ``adapter_config.json``; ``PeftModel.from_pretrained`` rebuilds those shapes). ``peftlab_meta.json`` records
        the pattern too, for :func:`peftlab.api.load_run`."""
        self.model.save_pretrained(directory)
        pattern = self.adalora_config.rank_pattern
        if pattern:
            rewrite_meta(directory, init_args={"rank_pattern": short_keys(pattern)})
        return "peft"


def full_keys(pattern: dict | None) -> dict | None:
    """A rank pattern with every key naming the adapter (peft shortens them when it saves)."""
    if not pattern:
        return pattern
    return {k if k.endswith(".default") else f"{k}.default": [bool(x) for x in v] for k, v in pattern.items()}


def short_keys(pattern: dict) -> dict:
    """A rank pattern as peft saves it (without the adapter name)."""
    return {k.removesuffix(".default"): [bool(x) for x in v] for k, v in pattern.items()}
