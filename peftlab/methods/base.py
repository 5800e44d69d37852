"""``PeftModule``: the LightningModule every method subclasses.

The base class owns the lifecycle every method shares: building and freezing the backbone, parameter-count
reporting, adapter-only checkpoints and prediction; the step loss and metrics come from
:mod:`peftlab.methods.loss`, the optimizer and schedule from :mod:`peftlab.methods.optim`, the names and
presets from :mod:`peftlab.methods.registry`, the capability declarations from
:mod:`peftlab.methods.capabilities`. A method overrides one hook, :meth:`PeftModule.attach`, which
receives the frozen backbone and returns the module to train (usually the backbone with trainable parts added)::

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

A method also declares what the rest of peftlab needs to know about it (:mod:`peftlab.methods.capabilities`, read
by ``merge``, ``compose``, ``params``, ``estimate-memory``, ``recommend`` and the exporters, so adding a method
touches no other file):
``name`` and its preset config (``configs/methods/<name>.yaml``), whether it merges (``mergeable``), whether its
adapters compose by exact weighted sum (``composable``, :meth:`compose_refusal`), which stack part it can be
(``stack_role``), which size knobs scale its preset (``scaled_knobs``, :meth:`scaled_preset`), its one-line
description (:meth:`describe`), what its backbone stores quantized (:meth:`quantized_weights`), the dtype its
trainable parameters train in (``trainable_dtype``), state it keeps besides the optimizer's
(:meth:`training_state_bytes`), how it is exported (:meth:`export`), whether its rows can
be packed (``supports_packing``) and advice for under- and overfitting (``advice``). Defining a subclass with a
``name`` registers it (:data:`METHODS`).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from torch import nn

from peftlab.adapters import unwrapped_name, write_peftlab_adapter  # noqa: F401 - unwrapped_name re-exported
from peftlab.backbones import (  # noqa: F401 - the backbone helpers, also importable from here
    HEAD_NAMES,
    TASKS,
    Task,
    building_on_meta,
    classification_head,
    count_parameters,
    enable_gradient_checkpointing,
    load_backbone,
    load_tokenizer,
    sharded_start,
    sharding_at_start,
)
from peftlab.errors import PeftLabError
from peftlab.generation import GenerationSettings, generate
from peftlab.methods.capabilities import Capabilities
from peftlab.methods.checkpoints import AdapterCheckpoints
from peftlab.methods.loss import TokenWeightedLoss, decoder_inputs, target_logits, token_nll  # noqa: F401
from peftlab.methods.optim import Optimization, lr_lambda, optimizer_class  # noqa: F401
from peftlab.methods.registry import (  # noqa: F401 - re-exported
    METHODS,
    PRESETS_DIR,
    load_plugins,
    preset_args,
    preset_path,
    register,
)


class PeftModule(Capabilities, TokenWeightedLoss, Optimization, AdapterCheckpoints, L.LightningModule):
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

    # ------------------------------------------------------------------ training
    def forward(self, **batch):
        return self.model(**batch)

    def setup(self, stage: str) -> None:
        if self.hparams.get("matmul_precision"):
            torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        if stage == "fit":
            self.check_data(self.trainer.datamodule)  # before the model is built (configure_model comes next)
            self.set_token_scale(self.trainer.datamodule)

    def set_token_scale(self, datamodule) -> None:
        """The constant a step's summed token loss is divided by (see :mod:`peftlab.methods.loss`). Any constant
        works (on_before_optimizer_step divides it out); one near the real count keeps the summed loss at the scale
        of a mean, which fp16's gradient scaler expects. Deterministic, so a resumed run computes exactly what the
        uninterrupted one did."""
        tokens = getattr(datamodule, "target_tokens_per_batch", None)
        self._token_scale = float(tokens()) if callable(tokens) and self.task != "classification" else 1.0

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
                            self.generation_settings(), continues=self.task == "causal_lm",
                            streamer=getattr(self, "streamer", None))
        finally:
            if sharded_root:
                self.model.reshard()
        return {"text": text}

    def generation_settings(self) -> GenerationSettings:
        """How ``predict_step`` generates: ``self.generation`` when set (``peftlab predict --generation.*``,
        ``Run.predict``, which also sets ``self.streamer`` for a streamed answer), else greedy decoding of
        ``max_new_tokens`` tokens."""
        settings = getattr(self, "generation", None) or GenerationSettings()
        return settings if settings.max_new_tokens else replace(settings, max_new_tokens=self.hparams.max_new_tokens)

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
