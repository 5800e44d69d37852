"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

Written here rather than taken from peft: peft has no bottleneck adapter (its "adapters" are LoRA
variants, IA3, ...), and the ``adapters`` library pins its own transformers version.

An adapter is a residual bottleneck ``h + up(act(down(h)))`` with ``down: d -> b`` and ``up: b -> d``;
``up`` starts at zero, so the adapted model starts out exactly equal to the backbone. It is placed on
the output of a sub-layer's output projection, before the residual connection and layer norm:

* ``houlsby``: after the attention output projection and after the feed-forward output projection;
* ``pfeiffer``: after the feed-forward output projection only.

Parameters per adapter: ``2 * d * b + b + d``.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn

from peftlab.errors import PeftLabError
from peftlab.methods.base import PeftModule

# Output projections of the attention and feed-forward sub-layers, by architecture family:
# BERT/RoBERTa, Llama/Mistral/Qwen, GPT-2, T5, OPT/BART.
ATTENTION_OUT = r"(attention\.output\.dense|self_attn\.o_proj|attn\.c_proj|SelfAttention\.o|EncDecAttention\.o|self_attn\.out_proj|encoder_attn\.out_proj)$"
FFN_OUT = r"(layer\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj|DenseReluDense\.wo|\.fc2)$"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """``h + scaling * up(dropout(act(down(h))))``, identity at initialisation."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0,
                 scaling: float = 1.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scaling = scaling
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaling * self.up(self.dropout(self.act(self.down(h.to(self.down.weight.dtype))))).to(h.dtype)


class WithAdapter(nn.Module):
    """A frozen output projection followed by a trainable :class:`Bottleneck` on its output."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x, *args, **kwargs):
        return self.adapter(self.base(x, *args, **kwargs))

    # some models read the projection's weight directly (T5 checks ``wo.weight.dtype``)
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)


def out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2)
        return module.nf
    if hasattr(module, "out_features"):  # bitsandbytes Linear4bit/8bit
        return module.out_features
    raise PeftLabError(f"cannot place an adapter after {type(module).__name__}: unknown output size")


class BottleneckAdapter(PeftModule):
    """Residual bottleneck adapters after the attention and/or feed-forward output projections.

    Args:
        bottleneck: bottleneck size b (64 is the usual start).
        placement: ``houlsby`` (after attention and feed-forward) or ``pfeiffer`` (after feed-forward only).
        target_modules: override the placement with module-name suffixes or regular expressions
            (e.g. ``[output.dense]``); default: the output projections of the backbone's family.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        dropout: dropout inside the adapter.
        scaling: multiplier of the adapter's output.
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "adapters"
    family = "adapter"
    scaled_knobs = ("bottleneck",)
    stack_role = "additive"
    advice = ("a larger bottleneck (128-256)", "a smaller bottleneck (16-32); dropout 0.1; fewer epochs")

    @classmethod
    def describe(cls, args: dict) -> str:
        return f"{cls.__name__} (bottleneck {args['bottleneck']}, {args['placement']})"

    def __init__(
        self,
        bottleneck: int = 64,
        placement: Literal["houlsby", "pfeiffer"] = "houlsby",
        target_modules: list[str] | None = None,
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        dropout: float = 0.0,
        scaling: float = 1.0,
        **kwargs,
    ):
        if bottleneck < 1:
            raise PeftLabError(f"model.bottleneck must be >= 1 (got {bottleneck})")
        super().__init__(**kwargs)

    def adapter_targets(self, backbone: nn.Module) -> list[str]:
        s = self.hparams
        names = [n for n, _ in backbone.named_modules() if n]
        if s["target_modules"]:
            patterns = [re.compile(rf"(^|\.){re.escape(t)}$") for t in s["target_modules"]]
            found = [n for n in names if any(p.search(n) for p in patterns)]
            if not found:
                raise PeftLabError(
                    f"model.target_modules {s['target_modules']} match no module of this backbone; "
                    "name output projections such as output.dense, o_proj or down_proj"
                )
            return found
        pattern = FFN_OUT if s["placement"] == "pfeiffer" else f"{ATTENTION_OUT}|{FFN_OUT}"
        found = [n for n in names if re.search(pattern, n)]
        if not found:
            raise PeftLabError(
                f"no attention/feed-forward output projections recognised in {type(backbone).__name__}; "
                "set model.target_modules to the names of the layers to put adapters after"
            )
        return found

    def attach(self, backbone: nn.Module) -> nn.Module:
        s = self.hparams
        for name in self.adapter_targets(backbone):
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            base = getattr(parent, child)
            weight = next(base.parameters())
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            adapter = Bottleneck(out_features(base), s["bottleneck"], s["activation"], s["dropout"], s["scaling"])
            setattr(parent, child, WithAdapter(base, adapter.to(device=weight.device, dtype=dtype)))
        return backbone
