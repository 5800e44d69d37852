"""VeRA (Kopiczko et al. 2024) through peft: one frozen random pair of low-rank matrices shared by all layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod


class VeRA(PeftBackedMethod):
    """VeRA (Kopiczko et al. 2024): ``W' = W + diag(b) B diag(d) A`` with ``A`` (r x d_in) and ``B`` (d_out x r)
    frozen random matrices shared by every adapted layer, and only the scaling vectors ``d`` (r) and ``b``
    (d_out) trained per layer.

    Trainable: ``r + d_out`` per adapted layer, far fewer than LoRA's ``r (d_in + d_out)`` at the same rank,
    so VeRA uses large ranks (256). ``A`` and ``B`` come from ``projection_prng_key`` and are saved in the
    export, which plain peft loads. Merges exactly; does not compose (the update is a product of the trained
    vectors, not a weighted sum of deltas) and is not a stack part.

    Args:
        r: rank of the shared random projections.
        target_modules: layers to adapt: name suffixes (``[query, value]``), ``all-linear``, or one regular
            expression matched against full names.
        d_initial: starting value of ``d`` (``b`` starts at 0, so the model starts as the backbone).
        dropout: dropout on the adapted layers' input.
        projection_prng_key: seed of the shared random matrices ``A`` and ``B``.
        **kwargs: the :class:`PeftModule` arguments (backbone, learning rate, ...).
    """

    name = "vera"
    family = "low-rank"
    peft_type = "VERA"
    mergeable = True
    scaled_knobs = ("r",)
    adapts_targets = True
    advice = ("a larger rank (512, 1024: the trained vectors stay small); add target modules (K, O, the FFN)",
              "a smaller rank; dropout (0.1); fewer steps; stop early on validation loss")

    def __init__(self, r: int = 256, target_modules: list[str] | str = ["query", "value"],  # noqa: B006 - shown as the CLI default
                 d_initial: float = 0.1, dropout: float = 0.0, projection_prng_key: int = 0, **kwargs):
        super().__init__(**kwargs)

    def peft_config(self, backbone: nn.Module):
        from peft import VeraConfig

        h = self.hparams
        return VeraConfig(task_type=PEFT_TASK[self.task], r=h.r, target_modules=h.target_modules,
                          d_initial=h.d_initial, vera_dropout=h.dropout, projection_prng_key=h.projection_prng_key,
                          save_projection=True)

    @classmethod
    def describe(cls, args: dict[str, Any]) -> str:
        return f"{cls.__name__} r={args['r']}"
