"""``PeftModule``: the LightningModule every method subclasses.

The base class owns everything methods share: building and freezing the backbone, the optimizer and
schedule over trainable parameters only, metrics, parameter-count reporting, adapter-only checkpoints
and prediction. A method overrides one hook, :meth:`PeftModule.attach`, which receives the frozen
backbone and returns the module to train (usually the backbone with trainable parts added)::

    class BitFit(PeftModule):
        name = "bitfit"

        def attach(self, backbone):
            for name, p in backbone.named_parameters():
                p.requires_grad_(name.endswith("bias"))
            return backbone

Construction records and checks the settings only (``self.hparams``); nothing is read from disk. The
tokenizer and backbone are loaded and ``attach`` is called by :meth:`PeftModule.build`, which Lightning runs
through ``configure_model`` once per process, inside the strategy's initialization context (so a sharding
strategy can build on the meta device or shard while loading). Code without a Trainer calls ``build()``
itself: ``LoRA(backbone=..., num_labels=2).build()``.

A method also declares what the rest of peftlab needs to know about it (read by ``merge``, ``compose``,
``params``, ``estimate-memory``, ``recommend`` and the exporters, so adding a method touches no other file):
``name`` and its preset config (``configs/methods/<name>.yaml``), whether it merges (:meth:`merged_model`),
whether its adapters compose by exact weighted sum (``composable``), what its backbone stores quantized
(:meth:`quantized_weights`), the dtype its trainable parameters train in (``trainable_dtype``), state it keeps
besides the optimizer's (:meth:`training_state_bytes`), how it is exported (:meth:`export`), whether its rows can
be packed (``supports_packing``) and advice for under- and overfitting (``advice``). Defining a subclass with a
``name`` registers it (:data:`METHODS`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn

from peftlab.adapters import unwrapped_name, write_peftlab_adapter
from peftlab.backbones import (
    TASKS,
    Task,
    building_on_meta,
    load_backbone,
    load_tokenizer,
    sharded_start,
    sharding_at_start,
)
from peftlab.errors import PeftLabError
from peftlab.generation import GenerationSettings, generate
from peftlab.methods.registry import METHODS, PRESETS_DIR, load_plugins, register  # noqa: F401 - re-exported


class PeftModule(L.LightningModule):
    """Base of all peftlab methods.

    Args:
        backbone: local model directory, ``packaged:all-MiniLM-L6-v2`` / ``packaged:SmolLM2-135M-Instruct``,
            or a Hugging Face hub name (needs internet).
        task: ``classification``, ``causal_lm`` or ``seq2seq`` (the CLI links it from ``data.task``).
        num_labels: number of classes for classification (the CLI links it from the data).
        learning_rate: peak learning rate.
        head_learning_rate: peak learning rate of the new classification head (``classifier`` / ``score`` /
            ``classification_head``); default ``learning_rate``; ignored (with a warning) for tasks without one. A
            random head can need far more than the method's own rate (docs/methods.md, "Learning rates").
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        optimizer: ``adamw`` (torch), or bitsandbytes' ``adamw_8bit``, ``paged_adamw_8bit``,
            ``paged_adamw_32bit`` (8-bit states and/or paging of optimizer state, as in QLoRA).
        warmup_ratio: fraction of the total optimizer steps spent warming up linearly from 0.
        scheduler: learning-rate schedule after warm-up: ``linear`` or ``cosine`` decay to 0, or ``constant``.
        dtype: dtype the backbone's weights are loaded in: ``float32`` (default; mixed precision comes from
            ``trainer.precision``), ``bfloat16``/``float16`` to halve the memory of a large frozen backbone, or
            ``auto`` for the checkpoint's own dtype (transformers 5's default, which may be fp16).
        trust_remote_code: allow model code from the hub to run; off unless you trust the backbone's repository.
        revision: hub revision (branch, tag or commit) of the backbone.
        max_new_tokens: generation length for ``predict`` on causal LM / seq2seq tasks.
        gradient_checkpointing: recompute the backbone's activations in backward instead of storing them:
            activation memory drops to about one layer's worth for ~30% more compute.
        attn_implementation: the backbone's attention kernel: ``sdpa`` (PyTorch's fused attention), ``eager``,
            ``flash_attention_2`` (needs the flash-attn package and a GPU); default: transformers' choice.
        matmul_precision: ``torch.set_float32_matmul_precision`` for the run: ``high`` lets fp32 matmuls use TF32
            on Ampere and newer GPUs (about 2-3x faster, 10-bit mantissa), ``highest`` keeps full fp32; default:
            leave PyTorch's setting alone.
    """

    #: checkpoints hold only trainable parameters; the frozen backbone is rebuilt from the config
    strict_loading = False
    #: train the (newly initialised) classification head in full; peft-backed methods set this to False
    #: because peft does it itself (``modules_to_save``)
    train_head = True

    # ------------------------------------------------------------------ what a method declares about itself
    #: short name: the key of :data:`METHODS` and of ``--method`` in estimate-memory; None = not registered
    name: ClassVar[str | None] = None
    #: the preset config (a YAML with a ``model:`` section); default ``configs/methods/<name>.yaml``
    preset: ClassVar[str | None] = None
    #: trained adapters combine exactly as a weighted sum of their weight updates (``peftlab compose``)
    composable: ClassVar[bool] = False
    #: dtype of the trainable parameters in training: ``float32`` (PEFT: peft keeps adapters in fp32) or
    #: ``precision`` (full fine-tuning: a half-precision working copy under mixed precision); memory estimates
    trainable_dtype: ClassVar[Literal["float32", "precision"]] = "float32"
    #: activation recomputation (``gradient_checkpointing``) is correct for this method; prefix methods, whose K/V
    #: prefixes go through the attention cache, set False and are refused in one line
    supports_gradient_checkpointing: ClassVar[bool] = True
    #: causal-LM training rows may hold several examples (``data.packing``); methods that add virtual tokens
    #: per row (prompt / prefix families) cannot share them between packed examples
    supports_packing: ClassVar[bool] = True
    #: what to try when the method (underfits, overfits); ``peftlab recommend`` prints it
    advice: ClassVar[tuple[str, str]] = ("a larger adapter or a higher learning rate; more steps",
                                         "a smaller adapter; dropout; fewer steps; stop early on validation loss")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    def __init__(
        self,
        backbone: str = "packaged:all-MiniLM-L6-v2",
        task: Task = "classification",
        num_labels: int | None = None,
        learning_rate: float = 1e-4,
        head_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw",
        warmup_ratio: float = 0.0,
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        trust_remote_code: bool = False,
        revision: str | None = None,
        max_new_tokens: int = 32,
        gradient_checkpointing: bool = False,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None,
        matmul_precision: Literal["highest", "high", "medium"] | None = None,
    ):
        super().__init__()
        from peftlab.compat import known_bad_versions

        problem = known_bad_versions(tuple(cls.__name__ for cls in type(self).__mro__))
        if problem:  # before anything is loaded
            raise PeftLabError(problem)
        if task not in TASKS:
            raise PeftLabError(f"model.task {task!r} is unknown; choose one of {', '.join(TASKS)}")
        if learning_rate <= 0:
            raise PeftLabError(f"model.learning_rate must be > 0 (got {learning_rate})")
        if head_learning_rate is not None and head_learning_rate <= 0:
            raise PeftLabError(f"model.head_learning_rate must be > 0 (got {head_learning_rate})")
        if head_learning_rate is not None and task != "classification":
            # not an error: a method config (configs/methods/) sets it for classification and is layered on any task
            warnings.warn(f"model.head_learning_rate is ignored: task {task!r} trains no new classification head",
                          stacklevel=2)
        if not 0.0 <= warmup_ratio < 1.0:
            raise PeftLabError(f"model.warmup_ratio must be in [0, 1) (got {warmup_ratio})")
        if gradient_checkpointing and not type(self).supports_gradient_checkpointing:
            raise PeftLabError(
                f"model.gradient_checkpointing cannot be used with {type(self).__name__}: its K/V prefixes are "
                "written into the attention cache, and recomputing a layer in backward would add them a second "
                "time (peft refuses the combination as well); turn gradient_checkpointing off, or use LoRA"
            )
        self.save_hyperparameters()
        self.task = task
        self.num_labels = num_labels
        self.head_learning_rate = head_learning_rate if task == "classification" else None
        #: the trained model and its tokenizer: None until :meth:`build` (``configure_model``)
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.trainable_count = self.total_count = 0
        self._step_stats: torch.Tensor | None = None  # (loss sum, count) of the optimizer step in progress
        self._token_scale = 1.0  # see training_step; set from the data at fit start
        self._init_metrics()

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Lightning's hook (once per process, in the strategy's init context): build the model."""
        self.build()

    def build(self, backbone: nn.Module | None = None, tokenizer=None):
        """Load the tokenizer and the frozen backbone, :meth:`attach` the method and count parameters; return
        ``self``. Idempotent. Lightning calls it through ``configure_model``; call it yourself without a Trainer.
        ``backbone`` / ``tokenizer``: use these, already loaded, instead (an adapter set's shared ones, see
        :mod:`peftlab.adapter_set`)."""
        if self.model is not None:
            return self
        h = self.hparams
        self.tokenizer = tokenizer or load_tokenizer(h.backbone, trust_remote_code=h.trust_remote_code,
                                                     revision=h.revision)
        if backbone is not None:  # already loaded (an adapter set's shared backbone)
            pass
        elif sharding_at_start() and self.attach_reads_backbone_weights():
            self.print(f"[peftlab] {type(self).__name__} reads the backbone's weights while attaching: the "
                           "backbone loads in full on every process before sharding (no sharded start)")
            with sharded_start(False):
                backbone = self.load_backbone()
        else:
            backbone = self.load_backbone()
        backbone.requires_grad_(False)
        # from_pretrained returns eval mode; train like the HF Trainer does (dropout on), Lightning flips to
        # eval for validation/test/predict by itself. On the meta device (params, estimate-memory) the
        # method's new tensors are made there too, so attach() need not pass a device around.
        with torch.device("meta") if building_on_meta() else contextlib.nullcontext():
            model = self.attach(backbone).train()
        if h.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.task == "classification" and self.train_head:
            for p in classification_head(model).parameters():
                p.requires_grad_(True)
        # trainable parameters train in fp32 whatever the backbone's dtype: a half-precision one (peft's copy of
        # the head, the new classification head, bottleneck adapters, full fine-tuning of a bf16/fp16 backbone)
        # would make Lightning's 16-mixed gradient unscaling fail ("Attempting to unscale FP16 gradients") and
        # lose small updates under bf16; the frozen weights keep the backbone's dtype
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        self.model = model
        device = next((p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")), None)
        if device is not None and self._trainer is None:
            # a backbone that loading placed on a GPU itself (QLoRA quantizes onto it): record the module's
            # device, so code without a Trainer (load_run, merge) moves its inputs there; under a Trainer the
            # strategy places the module
            self.to(device)
        self.trainable_count, self.total_count = count_parameters(self)
        if self.head_learning_rate is not None and not self.head_parameters():
            raise PeftLabError(
                f"model.head_learning_rate is set but {type(self).__name__} trains no classification head (no "
                f"trainable parameter under {', '.join(HEAD_NAMES)}); remove model.head_learning_rate"
            )
        if self.trainable_count == 0:
            raise PeftLabError(f"{type(self).__name__} left no trainable parameters; check its settings")
        return self

    def check(self) -> None:
        """Build a copy of this method on the meta device (no weights read, no memory used) to surface what is
        wrong with its settings on this backbone (a target module it lacks, a task it has no head for, nothing
        trainable) in seconds, before a run writes anything or loads weights. The CLI calls it before fit /
        validate / test / predict; :meth:`build` would find the same errors, only later."""
        from peftlab.backbones import meta_backbones

        if self.model is not None:
            return
        args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        with warnings.catch_warnings(), meta_backbones():
            warnings.simplefilter("ignore")
            type(self)(**args).build()

    @property
    def built(self) -> bool:
        return self.model is not None

    def _require_built(self, what: str) -> None:
        if self.model is None:
            raise PeftLabError(f"{what} needs the built model: call {type(self).__name__}(...).build() first "
                               "(a Trainer builds it through configure_model)")

    # ------------------------------------------------------------------ the hooks a method overrides
    def load_backbone(self) -> nn.Module:
        """Load the backbone for ``self.task``. Override to change how it is loaded (e.g. quantized)."""
        h = self.hparams
        return load_backbone(h.backbone, self.task, num_labels=self.num_labels, dtype=h.dtype,
                             trust_remote_code=h.trust_remote_code, revision=h.revision,
                             **self.attention_kwargs())

    def attention_kwargs(self) -> dict:
        """``attn_implementation`` for ``from_pretrained``, when one is set."""
        implementation = self.hparams.get("attn_implementation")
        return {"attn_implementation": implementation} if implementation else {}

    def attach(self, backbone: nn.Module) -> nn.Module:
        """Add the method's trainable parameters to the frozen ``backbone`` and return the model to train."""
        raise NotImplementedError(f"{type(self).__name__} must implement attach(backbone)")

    # ------------------------------------------------------------------ capabilities (see the module docstring)
    @classmethod
    def can_merge(cls) -> bool:
        """Whether the method's update folds into the backbone's weights (it overrides :meth:`merged_model`)."""
        return cls.merged_model is not PeftModule.merged_model

    def merged_model(self, dtype: str = "float32") -> nn.Module:
        """A plain transformers model with the trained update folded into its weights (``self`` unchanged).
        Refused by default: prompt/prefix methods add inputs and adapters add layers, nothing folds in."""
        raise PeftLabError(
            f"{type(self).__name__} cannot be merged into the backbone: only methods that learn a weight update "
            f"({', '.join(sorted(n for n, c in METHODS.items() if c.can_merge()))}) merge. Prompt/prefix tuning "
            "add inputs and adapters add layers; deploy them with the exported adapter instead."
        )

    def merge_refusal(self) -> str | None:
        """Why this instance cannot merge although its class can (its settings decide, e.g. a stack whose additive
        part is bottleneck adapters), in one line with the fix; None when it can."""
        return None

    def shared_backbone_key(self) -> dict[str, Any]:
        """What the loaded backbone depends on: two adapters whose keys are equal can share one backbone in an
        adapter set (:mod:`peftlab.adapter_set`). Methods that load it differently (QLoRA's 4-bit) add their settings."""
        h = self.hparams
        return {"backbone": h.backbone, "revision": h.revision, "task": self.task, "dtype": h.dtype,
                "trust_remote_code": h.trust_remote_code, "attn_implementation": h.get("attn_implementation")}

    def adapter_set_refusal(self) -> str | None:
        """Why this instance cannot join an adapter set on a shared, unchanged backbone (it trains or rewrites the
        backbone's own weights), in one line with the fix; None when it can (every method that only adds parts)."""
        return None

    def per_row_config(self):
        """The peft config under which this built adapter can join one peft model with others and be chosen per row
        of a batch (peft's ``adapter_names``, inference only); None (default): an adapter set runs its rows as a
        group of their own (:mod:`peftlab.adapter_set`)."""
        return None

    def training_state_bytes(self) -> int:
        """Bytes of state kept across steps besides the optimizer's (AdaLoRA's rank allocator); the memory estimate
        adds them. Default 0."""
        return 0

    def attach_reads_backbone_weights(self) -> bool:
        """Whether :meth:`attach` reads the frozen weights' values (DoRA's magnitudes, PiSSA's SVD, a prompt started
        from vocabulary embeddings). Such a method's backbone loads in full even under ``FSDP2Strategy``'s sharded
        start, whose placeholders hold no values until after sharding. Default: no."""
        return False

    def quantized_weights(self) -> dict[int, int]:
        """``{id(parameter): bytes stored}`` for the frozen parameters the backbone keeps quantized (QLoRA's 4-bit
        linear weights); also answers on the meta device, where nothing is actually quantized. Default: none."""
        return {}

    def export(self, directory: Path) -> str:
        """Write the trained parameters into ``directory`` (an empty temporary directory that
        :func:`peftlab.export.export_adapter` renames into place); return the format name for the model card.

        Default: ``adapter_model.safetensors`` with the trainable parameters and an ``adapter_config.json`` with
        ``"format": "peftlab"``, which :func:`peftlab.api.load_run` reads. peft-backed methods write peft's own
        format instead (``PeftModel.from_pretrained`` loads it)."""
        return write_peftlab_adapter(self, directory)

    @classmethod
    def preset_path(cls) -> Path | None:
        """The preset config file: ``preset``, else ``configs/methods/<name>.yaml`` if it exists."""
        if cls.preset:
            return Path(cls.preset)
        path = PRESETS_DIR / f"{cls.name}.yaml"
        return path if cls.name and path.is_file() else None

    @classmethod
    def preset_args(cls) -> dict[str, Any]:
        """``init_args`` of the preset config (empty without one), minus the backbone it was written for."""
        import yaml

        path = cls.preset_path()
        if path is None:
            return {}
        try:
            model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
        except (OSError, yaml.YAMLError) as err:
            raise PeftLabError(f"preset config {path} of method {cls.name!r} cannot be read: {err}") from err
        args = dict(model.get("init_args") or {})
        args.pop("backbone", None)
        return args

    # ------------------------------------------------------------------ training
    def forward(self, **batch):
        return self.model(**batch)

    def setup(self, stage: str) -> None:
        # crash-safe, weights-only checkpoint files (see peftlab.checkpointing for why Lightning's default is not)
        from peftlab.checkpointing import install

        install(self.trainer)
        if self.hparams.get("matmul_precision"):
            torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        if stage == "fit":
            self.check_data(self.trainer.datamodule)  # before the model is built (configure_model comes next)
            tokens = getattr(self.trainer.datamodule, "target_tokens_per_batch", None)
            # any constant works (on_before_optimizer_step divides it out); one near the real count keeps the summed
            # loss at the scale of a mean, which fp16's gradient scaler expects. Deterministic, so a resumed run
            # computes exactly what the uninterrupted one did.
            self._token_scale = float(tokens()) if callable(tokens) and self.task != "classification" else 1.0

    def training_step(self, batch, batch_idx):
        """The loss to backpropagate for one micro-batch.

        Classification: the mean over the micro-batch's examples. Causal LM / seq2seq: the *sum* over its target
        tokens; :meth:`on_before_optimizer_step` divides the accumulated gradient by the number of target tokens
        of the whole optimizer step (every accumulated micro-batch, every rank), so each token weighs the same
        whatever the batching (the fix transformers, torchtune and TRL made in late 2024). The loss is checked for
        NaN / inf once per optimizer step, not here: that check is a host sync.
        """
        if self.task == "classification":
            loss = self(**batch).loss
            n = len(batch["labels"])
            self._add_to_step(loss.detach() * n, n)
            return loss
        labels = batch["labels"]
        # no KV cache in training: it would only cost memory, and transformers (5.24) builds the block-diagonal
        # mask of packed rows (data.packing) only when there is none
        inputs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
        if self.task == "seq2seq":  # the decoder reads the shifted targets; the loss is computed here, once
            inputs["decoder_input_ids"] = decoder_inputs(self.model, labels)
        nll, count = token_nll(self(**inputs).logits, labels, self.task)
        self._add_to_step(nll.detach(), count)
        # Lightning divides what training_step returns by accumulate_grad_batches; multiplying by it first leaves
        # sum / token_scale, a constant that on_before_optimizer_step replaces by the step's token count
        return nll * (self.trainer.accumulate_grad_batches / self._token_scale)

    def _add_to_step(self, loss_sum: torch.Tensor, count) -> None:
        """Accumulate this micro-batch's loss sum and its count (targets or examples) until the optimizer step."""
        stats = torch.stack([loss_sum.float(), torch.as_tensor(count, dtype=torch.float32, device=loss_sum.device)])
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step: sum the step's loss and counts over every rank (one small collective), refuse a
        non-finite loss before the weights change, turn the causal-LM / seq2seq gradient into the mean over every
        target token of the step, and log ``train/loss`` (token-weighted for those tasks)."""
        stats, self._step_stats = self._step_stats, None
        if stats is None:
            return
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            stats = strategy.reduce(stats.clone(), reduce_op="sum")
        total, count = stats[0], stats[1].clamp(min=1.0)
        if not bool(torch.isfinite(total)):
            # stop before the optimizer applies it, so the weights and the last checkpoint stay good
            raise PeftLabError(
                f"the training loss is {float(total / count)} at step {self.global_step} (epoch {self.current_epoch}); "
                "stopped before updating the weights, so the last checkpoint is good. Lower model.learning_rate, set "
                "trainer.gradient_clip_val, or use precision 32-true / bf16 instead of fp16"
            )
        if self.task != "classification":
            # each rank's gradient is sum / token_scale over its micro-batches; data parallelism averages over ranks
            scale = self._token_scale * self.trainer.world_size / count
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self.log("train/loss", total / count, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _init_metrics(self):
        def stage_metrics():
            if self.task == "classification":
                n = self.num_labels
                return nn.ModuleDict({
                    "acc": torchmetrics.Accuracy(task="multiclass", num_classes=n),
                    "f1": torchmetrics.F1Score(task="multiclass", num_classes=n, average="macro"),
                    "loss": torchmetrics.MeanMetric(),
                })
            # token-weighted mean loss, so perplexity is exp(mean NLL per target token); exact_match: share of
            # examples whose every target token is the argmax under teacher forcing, which is exactly when greedy
            # decoding would reproduce the whole target (e.g. " fresh" + EOS)
            return nn.ModuleDict({"loss": torchmetrics.MeanMetric(), "exact_match": torchmetrics.MeanMetric()})

        self.metrics = nn.ModuleDict({"val": stage_metrics(), "test": stage_metrics()})

    def _eval_step(self, batch, stage):
        out = self(**batch)
        m = self.metrics[stage]
        if self.task == "classification":
            preds = out.logits.argmax(-1)
            m["acc"].update(preds, batch["labels"])
            m["f1"].update(preds, batch["labels"])
            m["loss"].update(out.loss, weight=len(preds))
        else:
            labels = batch["labels"]
            nll, count = token_nll(out.logits, labels, self.task)
            if count > 0:
                m["loss"].update(nll / count, weight=count)  # the mean over every target token of the split
            logits, labels = target_logits(out.logits, labels, self.task)
            target = labels != -100
            right = ((logits.argmax(-1) == labels) | ~target).all(-1)[target.any(-1)]
            if len(right):
                m["exact_match"].update(right.float())

    def _log_epoch(self, stage):
        m = self.metrics[stage]
        values = {f"{stage}/{k}": metric.compute() for k, metric in m.items()}
        if self.task != "classification":
            values[f"{stage}/ppl"] = torch.exp(values[f"{stage}/loss"].clamp(max=50))
        # torchmetrics' compute() already gathered every rank's state, so these values are global and equal on
        # all ranks; sync_dist only tells Lightning so (a mean of equal values, once per epoch)
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)

    def _reset_metrics(self, stage):
        # Reset at the start of each epoch, inside the loop's grad mode: states made under inference_mode
        # (e.g. by a `trainer.validate` before `fit`) cannot be updated in place under no_grad later.
        for metric in self.metrics[stage].values():
            metric.reset()

    def on_validation_epoch_start(self):
        self._reset_metrics("val")

    def on_test_epoch_start(self):
        self._reset_metrics("test")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def predict_step(self, batch, batch_idx):
        """Class probabilities (classification) or generated text (causal LM / seq2seq)."""
        if self.task == "classification":
            batch = {k: v for k, v in batch.items() if k != "labels"}
            probs = self(**batch).logits.float().softmax(-1)
            return {"pred": probs.argmax(-1), "probs": probs}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        # FSDP2 gathers a unit's parameters when that unit's forward is called; generate() reaches the root's
        # embeddings and head outside the root's forward, so gather the root (not the blocks) around it
        sharded_root = hasattr(self.model, "unshard") and hasattr(self.model, "reshard")
        if sharded_root:
            self.model.unshard()
        try:
            text = generate(self.model, self.tokenizer, inputs["input_ids"], inputs["attention_mask"],
                            self.generation_settings(), continues=self.task == "causal_lm")
        finally:
            if sharded_root:
                self.model.reshard()
        return {"text": text}

    def generation_settings(self) -> GenerationSettings:
        """How ``predict_step`` generates: ``self.generation`` when set (``peftlab predict --generation.*``,
        ``Run.predict``), else greedy decoding of ``max_new_tokens`` tokens."""
        settings = getattr(self, "generation", None) or GenerationSettings()
        return settings if settings.max_new_tokens else replace(settings, max_new_tokens=self.hparams.max_new_tokens)

    # ------------------------------------------------------------------ optimization
    def optimizer_groups(self) -> list[dict]:
        """Parameter groups for the optimizer. Override to give a part its own learning rate:
        ``[{"params": [...]}, {"params": [...], "lr": 1e-2}]`` (groups without ``lr`` use learning_rate)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the classification head (under a module named in ``HEAD_NAMES``; with
        peft that is the ``modules_to_save`` copy, the frozen original has ``requires_grad=False``)."""
        return [p for name, p in self.named_parameters()
                if p.requires_grad and any(part in HEAD_NAMES for part in name.split("."))]

    def configure_optimizers(self):
        groups = []
        method_groups = self.optimizer_groups()
        head_lr = self.head_learning_rate
        if head_lr is not None:  # the head leaves whichever group the method put it in, for a group of its own
            head_params = self.head_parameters()
            head = {id(p) for p in head_params}
            method_groups = [{**g, "params": [p for p in g["params"] if id(p) not in head]} for g in method_groups]
            method_groups.append({"params": head_params, "lr": head_lr})
        for group in method_groups:
            extra = {k: v for k, v in group.items() if k != "params"}
            params = [p for p in group["params"] if p.requires_grad]
            groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay,
                           **extra})
            groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra})
        optimizer = optimizer_class(self.hparams.optimizer)(
            [g for g in groups if g["params"]], lr=self.hparams.learning_rate
        )
        total = max(1, int(self.total_optimizer_steps()))
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(self.hparams.scheduler, warmup, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int | float:
        """The optimizer steps of this fit (the schedule's length): ``trainer.estimated_stepping_batches``, computed
        without letting Lightning set up its training loader early.

        Lightning 2.6's ``estimated_stepping_batches`` sets up the train dataloader and creates its iterator when
        called from ``configure_optimizers``, which runs before a checkpoint is restored; the loader's saved position
        is then never loaded, and a resumed run starts a fresh epoch instead (Lightning issue #20550, open on
        2026-11-27; docs/dependencies.md lists it). Here the length comes from a separate loader of the same data
        (never iterated), with Lightning's formula; without a DataModule, Lightning's own property is used."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        if trainer.max_epochs in (None, -1) or datamodule is None or trainer.train_dataloader is not None:
            return trainer.estimated_stepping_batches
        batches = len(datamodule.train_dataloader())
        limit = trainer.limit_train_batches
        batches = min(batches, int(limit)) if isinstance(limit, int) else int(batches * float(limit))
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ------------------------------------------------------------------ reporting and checkpoints
    def on_fit_start(self):
        pct = 100.0 * self.trainable_count / self.total_count
        self.print(f"[peftlab] {type(self).__name__} on {self.hparams.backbone}: trainable "
                   f"{self.trainable_count:,} / {self.total_count:,} parameters ({pct:.4f}%)")
        parts = self.trainable_parts()
        if parts:
            self.print("[peftlab]   " + ", ".join(f"{k}: {v:,}" for k, v in parts.items()))
        # trainer.log_dir is a collective under a distributed strategy: every rank must ask for it
        log_dir = self.trainer.log_dir if self.trainer.loggers else None
        if self.trainer.is_global_zero and log_dir:  # a run directory
            from peftlab.runinfo import write_run_record

            write_run_record(log_dir, self)
        for logger in self.loggers:
            logger.log_hyperparams({"params/trainable": self.trainable_count, "params/total": self.total_count,
                                    "params/percent": pct})

    def check_data(self, datamodule) -> None:
        """Refuse a DataModule whose task or label count does not match this model."""
        if datamodule is None:
            return
        task = getattr(datamodule, "model_task", getattr(datamodule, "task", self.task))  # chat data: causal_lm
        if task != self.task:
            raise PeftLabError(f"data.task is {task!r} but the model was built for {self.task!r}; make them equal")
        if getattr(datamodule, "packing", False) and not type(self).supports_packing:
            raise PeftLabError(
                f"{type(self).__name__} cannot train on packed rows (data.packing): it adds virtual tokens to each "
                "row, which the packed examples would share; set data.packing false"
            )
        num_labels = getattr(datamodule, "num_labels", None)
        if self.task == "classification" and num_labels is not None and num_labels != self.num_labels:
            raise PeftLabError(
                f"the data has {num_labels} labels but the model was built with num_labels={self.num_labels}; "
                "build the model with num_labels=datamodule.num_labels (the CLI does this for you)"
            )

    def trainable_parts(self) -> dict[str, int]:
        """Trainable parameters per part of the method (e.g. P-tuning v2's embedding and MLP), if it has parts."""
        return {}

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by their checkpoint names: without the ``_fsdp_wrapped_module.`` (and
        activation-checkpointing / ``torch.compile``) segments that wrappers insert into module paths."""
        return {unwrapped_name(n): p for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint):
        # Only trainable parameters: a LoRA checkpoint is the size of the adapter, not of the backbone.
        names = set(self.trainable_named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if unwrapped_name(k) in names}
        checkpoint["peftlab"] = {"method": type(self).__name__, "trainable_only": True}

    def on_load_checkpoint(self, checkpoint):
        # strict_loading is off (the backbone is not in the file), so check the adapter part ourselves.
        if "state_dict" not in checkpoint:
            # a sharding strategy (FSDP2's distributed checkpoint, DeepSpeed) loaded the weights itself, by name,
            # before this hook: there is nothing here to compare
            return
        expected = {n: p.shape for n, p in self.trainable_named_parameters().items()}
        got = {unwrapped_name(k): v for k, v in checkpoint["state_dict"].items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        # under a sharding strategy a rank holds flat shards, not the parameters' shapes: compare names only
        wrong = [] if is_sharded(self) else sorted(k for k in set(got) & set(expected)
                                                   if tuple(got[k].shape) != tuple(expected[k]))
        if missing or unexpected or wrong:
            detail = "; ".join(f"{what}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                               (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
            raise PeftLabError(
                f"checkpoint does not match this {type(self).__name__} model ({detail}); it was written by "
                "another method, backbone or setting. Resume with the config the checkpoint was trained with."
            )


def is_sharded(module: L.LightningModule) -> bool:
    """Whether ``module`` trains under a strategy that shards parameters (FSDP, DeepSpeed ZeRO-3)."""
    trainer = getattr(module, "_trainer", None)
    name = type(getattr(trainer, "strategy", None)).__name__ if trainer is not None else ""
    return "FSDP" in name or "DeepSpeed" in name


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in the transformers model inside ``model`` (peft-wrapped or not)."""
    inner = getattr(model, "peft_model", model)  # the input-tokens wrapper (P-tuning v2, stacks with input tokens)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise PeftLabError(f"model.gradient_checkpointing: {type(inner).__name__} does not support it; turn it off")
    # non-reentrant checkpointing needs no input that requires grad, so it works with a frozen embedding
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name (the old one warns)
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked number."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:  # bitsandbytes Params4bit packs 2 per byte
            n = math.prod(p.quant_state.shape)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def optimizer_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]


HEAD_NAMES = ("classifier", "score", "classification_head")


def classification_head(model: nn.Module) -> nn.Module:
    """The classification head of a ``*ForSequenceClassification`` model (``classifier``, ``score``, ...)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise PeftLabError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)}); "
        "set train_head = False on the method and make the head trainable in attach()"
    )


def _schedule(name: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def target_logits(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict ``labels`` and the labels, aligned: prompt-learning methods prepend their virtual
    tokens' positions to the logits (the last ``labels.shape[1]`` are kept); in causal LM position t predicts t + 1."""
    logits = logits[:, -labels.shape[1]:]
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def token_nll(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the negative log-likelihood over the target tokens, number of target tokens), in fp32."""
    logits, labels = target_logits(logits, labels, task)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, (labels != -100).sum()


def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """A seq2seq model's decoder inputs for ``labels`` (the targets shifted right), through the transformers model
    inside ``model`` (peft-wrapped or not)."""
    inner = getattr(model, "peft_model", model)  # the input-tokens wrapper of P-tuning v2 / LoRA + prompt
    if hasattr(inner, "get_base_model"):  # a peft model
        inner = inner.get_base_model()
    return inner.prepare_decoder_input_ids_from_labels(labels=labels)
