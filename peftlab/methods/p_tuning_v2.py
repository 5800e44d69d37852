"""P-tuning v2 as peftlab's design notes define it: trainable input tokens *and* deep per-layer K/V prefixes.

The design notes define P-tuning v2 as: N virtual tokens inserted in the input, and from the *same*
N embeddings an MLP generates K/V prefixes for every attention layer, so the method acts on the input
and on attention. No mainstream library offers exactly that:

* peft's ``PrefixTuning`` (``prefix_projection: true``) is the deep part, but its embedding E has
  ``num_kv_heads x head_dim`` columns, which is not the hidden size on grouped-query-attention models,
  and nothing is inserted in the input;
* the original P-tuning v2 paper (Liu et al. 2022) uses deep prompts only, no input tokens, with the
  reparameterization optional: that is ``input_tokens: false`` here (numerically peft's prefix tuning).

So this module reuses peft's prefix machinery (which builds the right cache object for each
architecture) and swaps its prefix encoder for :class:`SharedPromptEncoder`, whose E
(``num_virtual_tokens x hidden``) is both the input tokens and the MLP's input.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from peftlab.backbones import transformers_model
from peftlab.errors import PeftLabError
from peftlab.methods.base import PeftModule
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod
from peftlab.methods.prompt_tuning import check_virtual_tokens


class SharedPromptEncoder(nn.Module):
    """E (N x hidden) -> Linear(hidden, h) -> tanh -> Linear(h, num_layers * 2 * kv_dim).

    Drop-in for peft's ``PrefixEncoder`` (same ``embedding`` attribute and forward signature).
    """

    prefix_projection = True

    def __init__(self, num_virtual_tokens: int, hidden: int, mlp_hidden: int, out_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)
        self.transform = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, out_dim))

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.transform(self.embedding(prefix))


def starts_with_cls(module) -> bool:
    """True for classification with a tokenizer that puts its [CLS] token first (see ``InputTokensModel``)."""
    tokenizer = getattr(module, "tokenizer", None)
    if module.task != "classification" or tokenizer is None or tokenizer.cls_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.cls_token_id


class InputTokensModel(nn.Module):
    """Wraps a ``PeftModel`` (or a plain transformers model) and prepends trainable prompt embeddings to the input
    on every forward/generate.

    Used by P-tuning v2 (the prompt is E, shared with the prefix encoder) and by stacks with an input-token prompt
    part (:class:`peftlab.methods.Stack`, LoRA + prompt tuning: the inner model is a LoRA ``PeftModel``, the
    backbone with bottleneck adapters, or the merged backbone).

    ``after_first``: insert the prompt after the first token instead of before it. Set for classification
    with tokenizers that start every input with [CLS] (BERT, RoBERTa's <s>, ...), whose head reads position 0:
    prepending would make the head pool a virtual token instead of the [CLS] its pooler was pretrained on
    (which is also how hand-written prompts are placed). peft's prompt tuning and P-tuning still prepend.
    """

    def __init__(self, peft_model: nn.Module, prompt: nn.Embedding, task: str, after_first: bool = False):
        super().__init__()
        self.peft_model = peft_model
        self.prompt = prompt
        self.task = task
        self.after_first = after_first

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_embeddings

    def inner_model(self) -> nn.Module:
        """The transformers model inside (``get_base_model()`` of a peft model, else the wrapped model itself)."""
        return transformers_model(self.peft_model)

    def _with_prompt(self, input_ids, attention_mask, labels=None, token_type_ids=None):
        embeds = self.inner_model().get_input_embeddings()(input_ids)
        batch, n = embeds.shape[0], self.num_virtual_tokens
        prompt = self.prompt.weight.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        k = 1 if self.after_first else 0  # tokens kept before the prompt

        def insert(x, middle):
            return torch.cat([x[:, :k], middle, x[:, k:]], dim=1)

        out = {"inputs_embeds": insert(embeds, prompt)}
        if attention_mask is not None:  # none: every position is attended, the virtual tokens too
            out["attention_mask"] = insert(attention_mask, attention_mask.new_ones(batch, n))
        if token_type_ids is not None:
            out["token_type_ids"] = insert(token_type_ids, token_type_ids.new_zeros(batch, n))
        if labels is not None:
            if self.task == "causal_lm":  # the virtual tokens predict nothing
                labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
            out["labels"] = labels
        return out

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        return self.peft_model(**self._with_prompt(input_ids, attention_mask, labels, token_type_ids), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, pad_token_id=None, streamer=None,
                 **_):
        """Greedy decoding, recomputing the sequence each step (no KV cache); a ``streamer`` gets the prompt, each
        new token and the end, as from ``transformers``' ``generate``.

        Written here because peft's ``generate`` with prefixes does not accept ``inputs_embeds``, which
        the input tokens need. Returns prompt + new tokens (causal LM) or the decoder tokens (seq2seq),
        like ``transformers``' ``generate``.
        """
        config = self.inner_model().config
        eos = config.eos_token_id
        pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        if self.task == "causal_lm":
            seq, mask = input_ids, attention_mask
        else:
            start = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
            seq = input_ids.new_full((batch, 1), start)
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        if streamer is not None:
            streamer.put(seq.cpu())
        for _ in range(max_new_tokens):
            if self.task == "causal_lm":
                logits = self(input_ids=seq, attention_mask=mask).logits
            else:
                logits = self(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=seq).logits
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if self.task == "causal_lm":
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            done |= nxt == eos if eos is not None else torch.zeros_like(done)
            if done.all():
                break
        if streamer is not None:
            streamer.end()
        return seq


class PTuningV2(PeftBackedMethod):
    """Virtual input tokens plus deep K/V prefixes in every layer, both from one embedding E.

    Parameters (``trainable_parts`` reports each): E = ``N x hidden``; MLP = ``hidden*h + h`` and
    ``h * (num_layers * 2 * kv_dim) + num_layers * 2 * kv_dim``; plus the classification head.

    Args:
        num_virtual_tokens: N, the number of input tokens and the prefix length of every layer.
        prefix_hidden_size: hidden size h of the MLP that generates the prefixes.
        input_tokens: insert E in the input (the design notes' definition, above). ``false`` gives the paper's deep
            prompts only, i.e. prefix tuning; then ``prefix_projection`` chooses the reparameterization.
        prefix_projection: only with ``input_tokens: false``: generate the prefixes through the MLP.
        init: with ``input_tokens``: ``zero`` zeroes the MLP's last layer, so the prefixes start at K = V = 0
            (as :class:`PrefixTuning` does by default); ``random`` keeps PyTorch's default initialization.
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "p_tuning_v2"
    family = "soft prompt"
    scaled_knobs = ("num_virtual_tokens",)
    stack_role = "prompt"
    supports_packing = False  # virtual tokens per row
    pads_exactly = False  # virtual positions ahead of the padding
    supports_gradient_checkpointing = False  # the prefixes are in the attention cache (see PeftModule)
    advice = ("more virtual tokens (e.g. 64-128) or a larger prefix_hidden_size; or move to LoRA",
              "fewer virtual tokens (10); train fewer epochs; stop early on validation loss")

    @classmethod
    def describe(cls, args: dict) -> str:
        return f"{cls.__name__} with {args['num_virtual_tokens']} virtual tokens"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        prefix_hidden_size: int = 512,
        input_tokens: bool = True,
        prefix_projection: bool = True,
        init: Literal["zero", "random"] = "random",
        **kwargs,
    ):
        check_virtual_tokens(num_virtual_tokens)
        if input_tokens and not prefix_projection:
            raise PeftLabError(
                "model.input_tokens: true needs model.prefix_projection: true (the input tokens are the MLP's "
                "input E); set input_tokens: false for the paper's deep prompts without reparameterization"
            )
        if prefix_hidden_size < 1:
            raise PeftLabError(f"model.prefix_hidden_size must be >= 1 (got {prefix_hidden_size})")
        super().__init__(**kwargs)

    def peft_config(self, backbone: nn.Module):
        from peft import PrefixTuningConfig

        h = self.hparams
        return PrefixTuningConfig(task_type=PEFT_TASK[self.task], num_virtual_tokens=h.num_virtual_tokens,
                                  prefix_projection=h.prefix_projection, encoder_hidden_size=h.prefix_hidden_size)

    def attach(self, backbone: nn.Module) -> nn.Module:
        peft_model = super().attach(backbone)
        h = self.hparams
        if not h.input_tokens:
            return peft_model
        cfg = peft_model.peft_config["default"]
        hidden = backbone.get_input_embeddings().embedding_dim
        encoder = SharedPromptEncoder(h.num_virtual_tokens, hidden, h.prefix_hidden_size,
                                      cfg.num_layers * 2 * cfg.token_dim)
        if h.init == "zero":
            last = encoder.transform[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        old = peft_model.prompt_encoder["default"]
        peft_model.prompt_encoder["default"] = encoder.to(old.embedding.weight.device)
        return InputTokensModel(peft_model, encoder.embedding, self.task, after_first=starts_with_cls(self))

    def export(self, directory) -> str:
        """With input tokens: peftlab's format (peft has no such method); without, peft's prefix-tuning adapter."""
        if self.hparams.input_tokens:
            return PeftModule.export(self, directory)
        return super().export(directory)

    def trainable_parts(self) -> dict[str, int]:
        """Trainable parameters of each part: input/prefix embedding E, prefix MLP, classification head."""
        parts = {"embedding E": 0, "prefix MLP": 0, "head": 0}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            key = "embedding E" if "embedding" in name else "prefix MLP" if "transform" in name else "head"
            parts[key] += p.numel()
        return parts
