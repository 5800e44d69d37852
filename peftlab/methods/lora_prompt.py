"""LoRA + prompt tuning trained together (the design notes' example of combining methods): a preset of :class:`Stack`.

peft's mixed-adapter model (``PeftMixedModel``) accepts only LoRA-family adapters, not prompt learning, so the soft
prompt is peftlab's own: an ``N x hidden`` embedding inserted in the inputs of a LoRA ``PeftModel`` (the wrapper
P-tuning v2 uses). It is the stack ``{additive: {method: lora, ...}, prompt: {method: prompt_tuning, ...}}`` with
flat arguments (``r``, ``num_virtual_tokens``, ``prompt_learning_rate``), kept as a class of its own because shipped
configs and studies name it (``experiments/instruction/study.yaml``, ``configs/methods/lora_prompt.yaml``).
"""

from __future__ import annotations

from typing import Literal

from peftlab.errors import PeftLabError
from peftlab.methods.base import PeftModule
from peftlab.methods.stack import StackedMethod, parse_part


class LoRAPromptTuning(StackedMethod):
    """LoRA + prompt tuning: the :class:`Stack` ``{additive: {method: lora, ...}, prompt: {method: prompt_tuning,
    ...}}`` under its earlier name and arguments (configs/methods/lora_prompt.yaml).

    LoRA on the chosen layers plus ``num_virtual_tokens`` trainable input embeddings (after [CLS] for
    classification). Trainable: the LoRA count + ``num_virtual_tokens x hidden`` (+ the head for classification).
    Exported in peftlab's format. Not merged: configure the same parts as a :class:`Stack` to merge.

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (``alpha / r``).
        dropout: dropout on the LoRA path.
        target_modules: layers to adapt (as for :class:`LoRA`).
        bias: ``none``, ``all`` or ``lora_only``.
        modules_to_save: modules trained in full; ``None`` lets peft pick the classification head.
        num_virtual_tokens: soft-prompt length N.
        prompt_init: ``vocab`` starts each prompt row from a random vocabulary embedding (the scale of real
            inputs; Lester et al. 2021), ``text`` from the embeddings of ``prompt_init_text``.
        prompt_init_text: the text for ``prompt_init: text``.
        prompt_learning_rate: learning rate of the prompt (default: ``learning_rate``).
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "lora_prompt"
    # not mergeable (tests/unit/test_registry.py): the same parts as a Stack merge
    mergeable = False
    merged_model = PeftModule.merged_model
    scaled_knobs = ("r", "num_virtual_tokens")
    alpha_per_r = 2.0
    adapts_targets = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | str = ["query", "value"],  # noqa: B006 - shown as the CLI default
        bias: Literal["none", "all", "lora_only"] = "none",
        modules_to_save: list[str] | None = None,
        num_virtual_tokens: int = 20,
        prompt_init: Literal["vocab", "text"] = "vocab",
        prompt_init_text: str = "Classify the sentiment of this movie review:",
        prompt_learning_rate: float | None = None,
        **kwargs,
    ):
        if prompt_learning_rate is not None and prompt_learning_rate <= 0:
            raise PeftLabError(f"model.prompt_learning_rate must be > 0 (got {prompt_learning_rate})")
        if r < 1:  # the same checks and messages as LoRA's (the part is built later)
            raise PeftLabError(f"model.r (LoRA rank) must be >= 1 (got {r})")
        if alpha <= 0:
            raise PeftLabError(f"model.alpha must be > 0 (got {alpha}); the usual choice is 2 * r")
        if not 0.0 <= dropout < 1.0:
            raise PeftLabError(f"model.dropout must be in [0, 1) (got {dropout})")
        parts = {
            "additive": parse_part({"method": "lora", "r": r, "alpha": alpha, "dropout": dropout,
                                    "target_modules": target_modules, "bias": bias,
                                    "modules_to_save": modules_to_save}, "additive"),
            "prompt": parse_part({"method": "prompt_tuning", "num_virtual_tokens": num_virtual_tokens,
                                  "init": prompt_init, "init_text": prompt_init_text,
                                  **({"learning_rate": prompt_learning_rate} if prompt_learning_rate else {})},
                                 "prompt"),
        }
        super().__init__(**kwargs)
        self._parts = parts

    def trainable_parts(self) -> dict[str, int]:
        prompt = self.model.prompt.weight.numel()
        return {"LoRA (+ head)": self.trainable_count - prompt, "soft prompt": prompt}
