"""Prompt tuning (Lester et al. 2021) through peft: N trainable input embeddings, the model fully frozen."""

from __future__ import annotations

from typing import Literal

from torch import nn

from peftlab.assets import resolve_model
from peftlab.backbones import building_on_meta
from peftlab.errors import PeftLabError
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod


def check_virtual_tokens(n: int) -> None:
    if n < 1:
        raise PeftLabError(f"model.num_virtual_tokens must be >= 1 (got {n}); 10-100 is the usual range")


class PromptTuning(PeftBackedMethod):
    """Learn ``num_virtual_tokens`` soft-prompt embeddings (N x hidden) prepended to every input.

    Trainable parameters: ``num_virtual_tokens * hidden`` (x2 on encoder-decoders, where peft keeps one
    prompt for the encoder and one for the decoder), plus the classification head for classification.

    Args:
        num_virtual_tokens: soft-prompt length N.
        init: ``random``, or ``text`` to start from the embeddings of ``init_text``'s tokens (repeated or
            cut to N), which usually trains faster and more stably.
        init_text: the text for ``init: text``.
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "prompt_tuning"
    family = "soft prompt"
    scaled_knobs = ("num_virtual_tokens",)
    stack_role = "prompt"
    supports_packing = False  # virtual tokens per row
    pads_exactly = False  # virtual positions ahead of the padding
    advice = ("more virtual tokens (50-100); init: text from a task description; or graduate to LoRA",
              "fewer virtual tokens; train fewer epochs; stop early on validation loss")

    @classmethod
    def describe(cls, args: dict) -> str:
        return f"{cls.__name__} with {args['num_virtual_tokens']} virtual tokens"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: Literal["random", "text"] = "random",
        init_text: str = "Classify the sentiment of this movie review:",
        **kwargs,
    ):
        check_virtual_tokens(num_virtual_tokens)
        if init == "text" and not init_text.strip():
            raise PeftLabError("model.init_text is empty; give a text or use init: random")
        super().__init__(**kwargs)

    def attach_reads_backbone_weights(self) -> bool:
        """``init: text`` starts the prompt from the text's token embeddings."""
        return self.hparams.init == "text"

    def peft_config(self, backbone: nn.Module):
        from peft import PromptTuningConfig

        h = self.hparams
        extra = {}
        if h.init == "text" and not building_on_meta():  # counting on meta: same shape, no tokenizer
            extra = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=h.init_text,
                         tokenizer_name_or_path=resolve_model(h.backbone))
        return PromptTuningConfig(task_type=PEFT_TASK[self.task], num_virtual_tokens=h.num_virtual_tokens, **extra)
