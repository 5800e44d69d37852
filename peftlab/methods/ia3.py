"""IA3 (Liu et al. 2022) through peft: learned per-channel rescaling of keys, values and FFN activations."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod


class IA3(PeftBackedMethod):
    """IA3 (Liu et al. 2022): learned vectors that rescale the outputs of ``target_modules`` (the inputs of
    ``feedforward_modules``), ``y = l * (W x)`` or ``y = W (l * x)``.

    One vector per adapted layer (its output size, or its input size for a feed-forward layer), started at 1 so
    the model starts as the backbone: the fewest trainable parameters of the additive methods. Merges exactly
    (``l`` folds into ``W``'s rows or columns); does not compose (a product of scalings is not a weighted sum
    of deltas) and is not a stack part (a stack's additive part is a LoRA or bottleneck adapters).

    Args:
        target_modules: layers whose activations are rescaled: name suffixes, or one regular expression
            matched against full names; default (null): peft's choice for the architecture (BERT: key, value,
            output.dense; Llama: k_proj, v_proj, down_proj).
        feedforward_modules: the feed-forward layers among them (rescaled at their input), same forms; default
            (null): peft's choice for the architecture (BERT: output.dense; Llama: down_proj).
        **kwargs: the :class:`PeftModule` arguments (backbone, learning rate, ...).
    """

    name = "ia3"
    family = "adapter"
    peft_type = "IA3"
    mergeable = True
    advice = ("a higher learning rate (IA3 trains few parameters; 1e-2); more steps; more target modules",
              "a lower learning rate; fewer steps; stop early on validation loss")

    def __init__(self, target_modules: list[str] | str | None = None,
                 feedforward_modules: list[str] | str | None = None, **kwargs):
        super().__init__(**kwargs)

    def peft_config(self, backbone: nn.Module):
        from peft import IA3Config

        h = self.hparams
        return IA3Config(task_type=PEFT_TASK[self.task], target_modules=h.target_modules,
                         feedforward_modules=h.feedforward_modules)

    @classmethod
    def describe(cls, args: dict[str, Any]) -> str:
        return f"{cls.__name__} on {args.get('target_modules') or 'peft default targets'}"
