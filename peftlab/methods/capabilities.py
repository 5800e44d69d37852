"""What a method declares about itself: the class attributes and methods that ``merge``, ``compose``, ``params``,
``estimate-memory``, ``recommend``, stacks, adapter sets, the server and the exporters read, so that adding a method
touches no other file. :class:`~peftlab.methods.base.PeftModule` inherits them; a method overrides what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from peftlab.adapters import write_peftlab_adapter
from peftlab.errors import PeftLabError
from peftlab.methods.registry import METHODS, preset_args, preset_path


class Capabilities:
    """The capability contract of a method class (defaults here; docs/extending.md has the table)."""

    #: short name: the key of :data:`METHODS` and of ``--method`` in estimate-memory; None = not registered
    name: ClassVar[str | None] = None
    #: the family it is listed with (:data:`~peftlab.methods.registry.FAMILIES`: ``baseline``, ``low-rank``,
    #: ``soft prompt``, ``adapter``, ``composition``); listings show families in that order
    family: ClassVar[str | None] = None
    #: the preset config (a YAML with a ``model:`` section); default ``configs/methods/<name>.yaml``
    preset: ClassVar[str | None] = None
    #: the trained update folds into the backbone's weights (``peftlab merge``): the class provides
    #: :meth:`merged_model` (peft-backed methods get peft's ``merge_and_unload`` from ``PeftBackedMethod``)
    mergeable: ClassVar[bool] = False
    #: trained adapters combine exactly as a weighted sum of their weight updates (``peftlab compose``);
    #: :meth:`compose_refusal` refines it per exported adapter
    composable: ClassVar[bool] = False
    #: the part of a :class:`~peftlab.methods.Stack` this method can be: ``additive`` (a weight update or added
    #: layers, attached in place) or ``prompt`` (virtual tokens / prefixes); None: not stackable
    stack_role: ClassVar[Literal["additive", "prompt"] | None] = None
    #: the size knobs of ``params`` / ``estimate-memory`` / ``recommend`` (``r``, ``num_virtual_tokens``,
    #: ``bottleneck``) that set the init argument of the same name in this method's preset
    scaled_knobs: ClassVar[tuple[str, ...]] = ()
    #: with ``r`` in ``scaled_knobs``: ``--r`` also sets ``alpha = alpha_per_r * r``; None: alpha is left alone
    alpha_per_r: ClassVar[float | None] = None
    #: the preset's ``target_modules`` name layers of the backbone it was written for; on another backbone they
    #: become the same projections there (:func:`peftlab.analysis.params.adapt_targets`)
    adapts_targets: ClassVar[bool] = False
    #: dtype of the trainable parameters in training: ``float32`` (PEFT: peft keeps adapters in fp32) or
    #: ``precision`` (full fine-tuning: a half-precision working copy under mixed precision); memory estimates
    trainable_dtype: ClassVar[Literal["float32", "precision"]] = "float32"
    #: activation recomputation (``gradient_checkpointing``) is correct for this method; prefix methods, whose K/V
    #: prefixes go through the attention cache, set False and are refused in one line
    supports_gradient_checkpointing: ClassVar[bool] = True
    #: causal-LM training rows may hold several examples (``data.packing``); methods that add virtual tokens
    #: per row (prompt / prefix families) cannot share them between packed examples
    supports_packing: ClassVar[bool] = True
    #: a left-padded batch (generation) gives every row exactly what it gives alone; methods whose virtual tokens
    #: come before the padding set False (peft drops ``position_ids`` for them, so the padding shifts the distance
    #: between virtual and real tokens): their rows are batched with rows of the same length only
    pads_exactly: ClassVar[bool] = True
    #: what to try when the method (underfits, overfits); ``peftlab recommend`` prints it
    advice: ClassVar[tuple[str, str]] = ("a larger adapter or a higher learning rate; more steps",
                                         "a smaller adapter; dropout; fewer steps; stop early on validation loss")

    @classmethod
    def can_merge(cls) -> bool:
        """Whether the method's update folds into the backbone's weights (``mergeable``)."""
        return cls.mergeable

    @classmethod
    def compose_refusal(cls, config: dict, task: str | None) -> str | None:
        """Why an exported adapter of this method (its ``adapter_config.json``, its task) cannot join a weighted sum
        (``peftlab compose``), worded to follow the adapter's path; None when it can."""
        if not cls.composable:
            names = ", ".join(n for n, c in METHODS.items() if c.composable)
            return f"is a {cls.__name__} adapter, which does not compose by weighted sum; only {names} compose"
        if task == "classification":
            return "is a classification adapter: its trained heads cannot be summed; compose adapters of generative tasks"
        return None

    @classmethod
    def scaled_preset(cls, args: dict[str, Any], fit_targets: Callable[[list[str]], Any] | None = None,
                      **knobs: Any) -> dict[str, Any]:
        """``args`` (preset init arguments) with the size ``knobs`` this method declares applied (``scaled_knobs``,
        ``alpha_per_r``; others are ignored) and, with ``adapts_targets``, its ``target_modules`` list passed through
        ``fit_targets`` (the preset's layers on another backbone). Changes and returns ``args``."""
        for knob, value in knobs.items():
            if value is not None and knob in cls.scaled_knobs:
                args[knob] = value
                if knob == "r" and cls.alpha_per_r is not None:
                    args["alpha"] = cls.alpha_per_r * value
        if fit_targets is not None and cls.adapts_targets and isinstance(args.get("target_modules"), list):
            args["target_modules"] = fit_targets(args["target_modules"])
        return args

    @classmethod
    def describe(cls, args: dict[str, Any]) -> str:
        """A short description of the method with init arguments ``args`` (``peftlab recommend``'s summary)."""
        return cls.__name__

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

    def multitask_refusal(self) -> str | None:
        """Why this method cannot be one task of a multi-task run (:class:`peftlab.multitask.MultiTask`), in one
        line; None (default) when it can: every method that only adds parts to a shared backbone."""
        return self.adapter_set_refusal()

    def serving_engine_refusal(self) -> str | None:
        """Why a serving engine's multi-LoRA loader (vLLM's ``--enable-lora``) cannot load this method's export, in
        one line naming what serves it instead; None when it can. Default: the export is not a plain LoRA (a method
        whose update folds into the weights can be converted to one: ``peftlab export-lora``)."""
        fix = ("convert it with peftlab export-lora (fidelity measured) or serve it with peftlab serve"
               if type(self).can_merge() else "serve it with peftlab serve (docs/multi-adapter.md)")
        return (f"{type(self).__name__}'s export is not a plain LoRA adapter, which is all vLLM's multi-LoRA server "
                f"loads; {fix}")

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
        return preset_path(cls)

    @classmethod
    def preset_args(cls) -> dict[str, Any]:
        """``init_args`` of the preset config (empty without one), minus the backbone it was written for."""
        return preset_args(cls)
