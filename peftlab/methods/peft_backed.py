"""Shared base of the methods that are a peft config (LoRA, QLoRA, prompt tuning, P-tuning, prefix tuning)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from peftlab.adapters import PEFT_TASK  # noqa: F401 - also importable from here
from peftlab.backbones import torch_dtype
from peftlab.methods.base import PeftModule


class PeftBackedMethod(PeftModule):
    """A method expressed as a peft config: subclasses implement :meth:`peft_config`.

    The trained model is a ``peft.PeftModel``, and :meth:`export` writes peft's own adapter format, which
    plain ``peft.PeftModel.from_pretrained(base, dir)`` loads.
    """

    train_head = False  # peft adds the classification head to modules_to_save itself
    #: the ``peft_type`` of this method's exports: an adapter saved by plain peft (no peftlab_meta.json) is read as
    #: the first registered method of its type (``peftlab compose``)
    peft_type: ClassVar[str | None] = None

    def peft_config(self, backbone: nn.Module):
        """The ``peft`` config for this method (``task_type`` from :data:`PEFT_TASK`)."""
        raise NotImplementedError

    def attach(self, backbone: nn.Module) -> nn.Module:
        from peft import get_peft_model

        from peftlab.compat import bridge_cache_argument

        peft_model = get_peft_model(backbone, self.peft_config(backbone))
        if peft_model.active_peft_config.is_prompt_learning:
            bridge_cache_argument(peft_model)  # transformers >= 5.24 with peft <= 0.21.2, see peftlab.compat
        return peft_model

    def merged_model(self, dtype: str = "float32") -> nn.Module:
        """For a ``mergeable`` method (LoRA's family, AdaLoRA): peft's ``merge_and_unload`` on a copy of the model,
        cast to ``dtype``, a plain transformers model (``self`` unchanged). Refused otherwise."""
        if not type(self).mergeable:
            return super().merged_model(dtype)
        import copy

        self._require_built("merging")
        out_dtype = torch_dtype(dtype)
        return copy.deepcopy(self.model).merge_and_unload().to(out_dtype).eval()

    def export(self, directory) -> str:
        """peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` loads it)."""
        self.model.save_pretrained(directory)
        return "peft"
