"""LoRA variants as methods of their own: DoRA, rsLoRA, PiSSA / OLoRA and LoRA+.

Each is :class:`~peftlab.methods.LoRA` with one option set (``use_dora``, ``use_rslora``, ``init``,
``loraplus_lr_ratio``; every LoRA argument still applies, and the options also combine on ``LoRA`` and
``QLoRA`` directly). They exist as classes so that each variant has a name and a preset
(``configs/methods/<name>.yaml``) that ``peftlab estimate-memory``, ``recommend`` and the docs list, and so that
what a variant can do is declared on its class: DoRA and PiSSA do not compose (``composable``), all four merge.
docs/methods.md has the formula of each and when to pick it.
"""

from __future__ import annotations

from typing import Literal

from peftlab.errors import PeftLabError
from peftlab.methods.lora import LoRA


class DoRA(LoRA):
    """DoRA (Liu et al. 2024): weight-decomposed LoRA, ``W' = m * (W + s B A) / ||W + s B A||_c``.

    Each adapted weight is split into a magnitude ``m`` (one trainable value per output feature, initialised to
    the column norms of ``W``) and a direction updated by LoRA. Trainable: LoRA's ``r (d_in + d_out)`` plus
    ``d_out`` per adapted layer (``peftlab params`` shows the magnitudes as a part). Each forward recomputes the
    norm of ``W + s B A``, which costs activations and time (``estimate-memory`` counts them). Merges exactly;
    does not compose (the update is not a weighted sum of deltas).

    Args:
        use_dora: must stay true (false is :class:`LoRA`).
        **kwargs: the :class:`LoRA` arguments (r, alpha, target_modules, ...) and :class:`PeftModule` ones.
    """

    name = "dora"
    composable = False  # m * (W + dW) / ||W + dW|| is not linear in dW
    advice = ("increase the rank to 16; add target modules (K, O, then the FFN)",
              "decrease the rank to 4; add dropout (0.1); train fewer epochs")

    def __init__(self, use_dora: bool = True, **kwargs):
        if not use_dora:
            raise PeftLabError("DoRA with use_dora: false is plain LoRA; use peftlab.methods.LoRA")
        super().__init__(use_dora=use_dora, **kwargs)


class RSLoRA(LoRA):
    """rsLoRA (Kalajdzievski 2023): LoRA scaled by ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Same parameters as LoRA; with ``alpha / r`` the update's scale shrinks as the rank grows, so large ranks learn
    no better than small ones, which ``alpha / sqrt(r)`` avoids. The exported ``adapter_config.json`` records
    ``use_rslora: true``; merges and composes exactly (compose uses each adapter's own scaling).

    Args:
        use_rslora: must stay true (false is :class:`LoRA`).
        **kwargs: the :class:`LoRA` arguments and :class:`PeftModule` ones.
    """

    name = "rslora"

    def __init__(self, use_rslora: bool = True, **kwargs):
        if not use_rslora:
            raise PeftLabError("RSLoRA with use_rslora: false is plain LoRA; use peftlab.methods.LoRA")
        super().__init__(use_rslora=use_rslora, **kwargs)


class PiSSA(LoRA):
    """PiSSA (Meng et al. 2024) / OLoRA (Büyükakyüz 2024): LoRA started from the principal part of ``W``.

    ``init: pissa``: ``B0 A0`` is the top-``r`` part of the SVD of ``W`` (``B0 = U_r sqrt(S_r / s)``,
    ``A0 = sqrt(S_r / s) V_r^T``); ``init: olora``: the first ``r`` columns / rows of a QR decomposition of ``W``.
    The frozen weight becomes the residual ``W - s B0 A0``, so the model starts exactly where the backbone is,
    but training moves the principal directions first. Same parameter count as LoRA. Because the backbone is
    changed, merging and exporting convert back to the original: the merged model is the plain backbone plus the
    trained delta ``s (B A - B0 A0)``, and the export is a plain LoRA of rank ``2r`` on the original backbone that
    plain peft loads (:meth:`LoRA.export`). Does not compose in training (its backbone is the residual); its
    exports, plain LoRAs, do.

    Args:
        init: ``pissa`` or ``olora``.
        **kwargs: the :class:`LoRA` arguments (r, alpha, ``pissa_niter``, ...) and :class:`PeftModule` ones.
    """

    name = "pissa"
    composable = False  # the training model's backbone is W - s B0 A0 (its exports compose: plain LoRA)

    def __init__(self, init: Literal["pissa", "olora"] = "pissa", **kwargs):
        if init not in ("pissa", "olora"):
            raise PeftLabError(f"PiSSA needs init: pissa or olora (got {init!r}); other inits are plain LoRA")
        super().__init__(init=init, **kwargs)


class LoRAPlus(LoRA):
    """LoRA+ (Hayou et al. 2024): ``B`` trained at ``loraplus_lr_ratio`` times the learning rate of ``A``.

    Same parameters, update and exported adapter as LoRA (a plain peft LoRA: the ratio changes only training);
    the optimizer gets every ``B`` in a group of its own. Merges and composes exactly.

    Args:
        loraplus_lr_ratio: learning rate of ``B`` / learning rate of ``A`` (the paper suggests 16).
        **kwargs: the :class:`LoRA` arguments and :class:`PeftModule` ones.
    """

    name = "lora_plus"

    def __init__(self, loraplus_lr_ratio: float = 16.0, **kwargs):
        if loraplus_lr_ratio is None:
            raise PeftLabError("LoRAPlus needs model.loraplus_lr_ratio (e.g. 16); without it use peftlab.methods.LoRA")
        super().__init__(loraplus_lr_ratio=loraplus_lr_ratio, **kwargs)
