"""LoRA + prompt tuning trained together (the notes' "Combining methods" example).

peft's mixed-adapter model (``PeftMixedModel``) accepts only LoRA-family adapters, not prompt learning,
so the soft prompt is peftlab's own: an ``N x hidden`` embedding prepended to the inputs of a LoRA
``PeftModel`` (the same wrapper P-tuning v2 uses). One optimizer covers both parts; the prompt may have
its own learning rate (soft prompts usually want a larger one).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from peftlab.errors import PeftLabError
from peftlab.methods.base import PeftModule
from peftlab.methods.lora import LoRA
from peftlab.methods.p_tuning_v2 import InputTokensModel, starts_with_cls
from peftlab.methods.prompt_tuning import check_virtual_tokens


class LoRAPromptTuning(LoRA):
    """LoRA on the chosen layers plus ``num_virtual_tokens`` trainable input embeddings.

    Trainable: the LoRA count + ``num_virtual_tokens x hidden`` (+ the head for classification).

    Args:
        num_virtual_tokens: soft-prompt length N.
        prompt_init: ``vocab`` starts each prompt row from a random vocabulary embedding (the scale of real
            inputs; Lester et al. 2021), ``text`` from the embeddings of ``prompt_init_text``.
        prompt_init_text: the text for ``prompt_init: text``.
        prompt_learning_rate: learning rate of the prompt (default: ``learning_rate``).
        **kwargs: the :class:`LoRA` and :class:`PeftModule` arguments.
    """

    name = "lora_prompt"
    composable = False  # the soft prompt is not a weight update
    # not mergeable yet: folding the LoRA part in would still need the prompt at inference
    merged_model = PeftModule.merged_model
    export = PeftModule.export  # peftlab's format: plain peft has no LoRA + prompt model

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        prompt_init: Literal["vocab", "text"] = "vocab",
        prompt_init_text: str = "Classify the sentiment of this movie review:",
        prompt_learning_rate: float | None = None,
        **kwargs,
    ):
        check_virtual_tokens(num_virtual_tokens)
        if prompt_learning_rate is not None and prompt_learning_rate <= 0:
            raise PeftLabError(f"model.prompt_learning_rate must be > 0 (got {prompt_learning_rate})")
        super().__init__(**kwargs)

    def attach(self, backbone: nn.Module) -> nn.Module:
        words = backbone.get_input_embeddings().weight
        prompt = nn.Embedding(self.hparams.num_virtual_tokens, words.shape[1])
        prompt.to(device=words.device, dtype=words.dtype)
        with torch.no_grad():
            prompt.weight.copy_(words[self._init_token_ids(words.shape[0])])
        return InputTokensModel(super().attach(backbone), prompt, self.task, after_first=starts_with_cls(self))

    def _init_token_ids(self, vocab_size: int) -> list[int]:
        h = self.hparams
        n = h.num_virtual_tokens
        if h.prompt_init == "text" and self.tokenizer is not None:
            ids = self.tokenizer(h.prompt_init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise PeftLabError("model.prompt_init_text tokenizes to nothing; give a text or use prompt_init: vocab")
            return (ids * (n // len(ids) + 1))[:n]
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (n,), generator=generator, device="cpu").tolist()

    def optimizer_groups(self) -> list[dict]:
        prompt = [self.model.prompt.weight]
        rest = [p for p in self.parameters() if p.requires_grad and p is not self.model.prompt.weight]
        lr = self.hparams.prompt_learning_rate
        return [{"params": rest}, {"params": prompt, **({"lr": lr} if lr else {})}]

    def trainable_parts(self) -> dict[str, int]:
        prompt = self.model.prompt.weight.numel()
        return {"LoRA (+ head)": self.trainable_count - prompt, "soft prompt": prompt}
