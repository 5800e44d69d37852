"""Prefix tuning (Li & Liang 2021) through peft: trainable K/V prefixes in every attention layer."""

from __future__ import annotations

from typing import Literal

from torch import nn

from peftlab.errors import PeftLabError
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod
from peftlab.methods.prompt_tuning import check_virtual_tokens


class PrefixTuning(PeftBackedMethod):
    """K/V prefixes prepended in every attention layer: ``Attention(Q, [K_p; K], [V_p; V])``.

    * ``prefix_projection: false`` stores the prefixes directly:
      ``num_layers x 2 x num_virtual_tokens x num_kv_heads x head_dim`` parameters.
    * ``prefix_projection: true`` generates them from an embedding E (``num_virtual_tokens x d``) through a
      two-layer MLP ``d -> prefix_hidden_size -> num_layers * 2 * num_kv_heads * head_dim`` (tanh), the
      reparameterization of the paper; after training the prefixes can be computed once and the MLP dropped.
      peft's d is ``num_kv_heads x head_dim``, which is the hidden size except on grouped-query-attention
      models (Llama-2-70B, SmolLM2, ...), where it is smaller.

    Args:
        num_virtual_tokens: prefix length per layer (10-100 is the usual range).
        prefix_projection: generate the prefixes with the MLP (see above).
        prefix_hidden_size: hidden size of that MLP.
        init: ``zero`` starts with K = V = 0 (with the MLP, its last layer is zero): the prefixes add nothing
            to the attention output, though their score-0 keys still take a share of the softmax, so the
            start is close to, not exactly, the backbone;
            ``random`` is peft's N(0, 1) start, which starts far from the backbone (docs/methods.md, "Prefix
            tuning", has the measurement).
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "prefix_tuning"
    family = "soft prompt"
    scaled_knobs = ("num_virtual_tokens",)
    stack_role = "prompt"
    supports_packing = False  # virtual tokens per row
    pads_exactly = False  # virtual positions ahead of the padding
    supports_gradient_checkpointing = False  # the prefixes are in the attention cache (see PeftModule)
    advice = ("more virtual tokens; prefix_projection: true", "fewer virtual tokens; fewer epochs")

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        prefix_projection: bool = False,
        prefix_hidden_size: int = 512,
        init: Literal["zero", "random"] = "zero",
        **kwargs,
    ):
        check_virtual_tokens(num_virtual_tokens)
        if prefix_hidden_size < 1:
            raise PeftLabError(f"model.prefix_hidden_size must be >= 1 (got {prefix_hidden_size})")
        super().__init__(**kwargs)

    def peft_config(self, backbone: nn.Module):
        from peft import PrefixTuningConfig

        h = self.hparams
        return PrefixTuningConfig(task_type=PEFT_TASK[self.task], num_virtual_tokens=h.num_virtual_tokens,
                                  prefix_projection=h.prefix_projection, encoder_hidden_size=h.prefix_hidden_size,
                                  init_weights="zero" if h.init == "zero" else None)
