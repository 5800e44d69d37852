"""Shared base of the methods that are a peft config (LoRA, QLoRA, prompt tuning, P-tuning, prefix tuning)."""

from __future__ import annotations

from torch import nn

from peftlab.methods.base import PeftModule

PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


class PeftBackedMethod(PeftModule):
    """A method expressed as a peft config: subclasses implement :meth:`peft_config`.

    The trained model is a ``peft.PeftModel``, and :meth:`export` writes peft's own adapter format, which
    plain ``peft.PeftModel.from_pretrained(base, dir)`` loads.
    """

    train_head = False  # peft adds the classification head to modules_to_save itself

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

    def export(self, directory) -> str:
        """peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` loads it)."""
        self.model.save_pretrained(directory)
        return "peft"
