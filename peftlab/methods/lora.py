"""LoRA (Hu et al. 2021) through peft: W' = W + (alpha / r) * B A with A, B of rank r, W frozen."""

from __future__ import annotations

from typing import Literal

from torch import nn

from peftlab.errors import PeftLabError, did_you_mean
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod


class LoRA(PeftBackedMethod):
    """Low-rank adapters on the chosen linear layers (peft's ``LoraConfig``).

    Merges into the backbone (``peftlab merge``) and composes exactly with other LoRAs (``peftlab compose``).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA input path.
        target_modules: module-name suffixes to adapt (``query``, ``value``, ``q_proj``, ``v_proj``, FFN layers
            such as ``intermediate.dense`` / ``up_proj``), or ``all-linear`` for every linear layer but the head.
        bias: which biases to train: ``none``, ``all`` or ``lora_only``.
        modules_to_save: modules trained in full and saved with the adapter; ``None`` lets peft pick the
            classification head (``classifier`` / ``score``) for classification.
        **kwargs: the :class:`PeftModule` arguments (backbone, learning rate, ...).
    """

    name = "lora"
    composable = True
    advice = ("increase the rank to 16 or 32; add target modules (K, O, then the FFN)",
              "decrease the rank to 4; add dropout (0.1); train fewer epochs")

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | str = ["query", "value"],  # noqa: B006 - shown as the CLI default
        bias: Literal["none", "all", "lora_only"] = "none",
        modules_to_save: list[str] | None = None,
        **kwargs,
    ):
        if r < 1:
            raise PeftLabError(f"model.r (LoRA rank) must be >= 1 (got {r})")
        if alpha <= 0:
            raise PeftLabError(f"model.alpha must be > 0 (got {alpha}); the usual choice is 2 * r")
        if not 0.0 <= dropout < 1.0:
            raise PeftLabError(f"model.dropout must be in [0, 1) (got {dropout})")
        super().__init__(**kwargs)

    def lora_config_args(self) -> dict:
        """The ``peft.LoraConfig`` arguments of this method's settings (QLoRA and LoRA + prompt reuse them)."""
        h = self.hparams
        return dict(r=h.r, lora_alpha=h.alpha, lora_dropout=h.dropout, bias=h.bias,
                    target_modules=h.target_modules, modules_to_save=h.modules_to_save)

    def peft_config(self, backbone: nn.Module):
        from peft import LoraConfig

        check_target_modules(backbone, self.hparams.target_modules)
        return LoraConfig(task_type=PEFT_TASK[self.task], **self.lora_config_args())

    def lora_model(self):
        """The ``peft.PeftModel`` holding the LoRA layers (LoRA + prompt wraps it)."""
        self._require_built("merging")
        return self.model

    def merged_model(self, dtype: str = "float32") -> nn.Module:
        """``W + (alpha / r) B A`` folded into every adapted layer of a copy of the model (peft's merge_and_unload)."""
        import copy

        from peftlab.merge import DTYPES

        if dtype not in DTYPES:
            raise PeftLabError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return copy.deepcopy(self.lora_model()).merge_and_unload().to(DTYPES[dtype]).eval()


def check_target_modules(model: nn.Module, targets: list[str] | str) -> None:
    """Fail with the list of adaptable layer names when a target matches no module."""
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        # peft reads a single string as a regular expression over full module names, not as a suffix
        import re

        if not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
            raise PeftLabError(
                f"model.target_modules {targets!r} is a single string, which peft matches as a regular expression "
                "against full module names, and it matches none; give a list of layer names, e.g. [query, value]"
            )
        return
    if not targets:
        raise PeftLabError("model.target_modules is empty; name at least one layer, e.g. [query, value]")
    names = [n for n, _ in model.named_modules()]
    linear_suffixes = sorted({n.split(".")[-1] for n, m in model.named_modules()
                              if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")})
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise PeftLabError(
                f"target module {target!r} (model.target_modules) is not in this backbone; its linear layers are: "
                f"{', '.join(linear_suffixes)}.{did_you_mean(target, linear_suffixes)} Or use 'all-linear'."
            )
