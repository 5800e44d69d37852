"""The prompt-learning methods against independent computations, on whatever library versions are installed.

These tests pin down what ``peftlab.compat`` works around (transformers >= 5.24 renamed the KV-cache argument;
peft <= 0.21.2 still uses the old name): without the workaround, prefix methods crash on BERT and cached
generation with prompt tuning, P-tuning and prefix tuning silently returns other tokens. Each expected value
here is computed without peft's forward: by hand (BERT), through the plain transformers model with the
virtual tokens or a hand-built cache, or by greedy decoding that recomputes the whole sequence each step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from peftlab.methods import PrefixTuning, PromptTuning, PTuning, PTuningV2


def _peft_model(module):
    return module.model.peft_model if hasattr(module.model, "peft_model") else module.model


def _prefix_kv(module, batch: int):
    """Per layer (keys, values) of shape [batch, kv_heads, N, head_dim], from the method's own parameters and
    peft's documented prefix layout (N x layers*2*kv_dim, split per layer into K then V)."""
    peft_model = _peft_model(module)
    cfg = peft_model.peft_config["default"]
    encoder = peft_model.prompt_encoder["default"]
    n, layers = cfg.num_virtual_tokens, cfg.num_layers
    idx = torch.arange(n)
    flat = encoder(idx) if hasattr(encoder, "transform") else (
        encoder.transform(encoder.embedding(idx)) if cfg.prefix_projection else encoder.embedding(idx))
    heads = cfg.num_attention_heads
    kv = flat.view(n, layers * 2, heads, -1).permute(1, 2, 0, 3)  # [2 * layers, heads, N, head_dim]
    return [(kv[2 * i].expand(batch, -1, -1, -1), kv[2 * i + 1].expand(batch, -1, -1, -1)) for i in range(layers)]


def _bert_by_hand(module, input_ids, attention_mask):
    """BertForSequenceClassification's logits written out: prefix K/V in every layer's attention, the input
    tokens (P-tuning v2) inserted where the method puts them, positions after the prefix (as transformers
    numbers positions after a cache)."""
    peft_model = _peft_model(module)
    model = peft_model.get_base_model()
    bert, cfg = model.bert, model.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    head_dim = cfg.hidden_size // heads
    n = peft_model.peft_config["default"].num_virtual_tokens
    kv = _prefix_kv(module, len(input_ids))
    emb = bert.embeddings
    x = emb.word_embeddings(input_ids)
    mask = attention_mask
    if hasattr(module.model, "prompt"):  # P-tuning v2's input tokens E
        k = 1 if module.model.after_first else 0
        prompt = module.model.prompt.weight[None].expand(len(x), -1, -1)
        x = torch.cat([x[:, :k], prompt, x[:, k:]], 1)
        mask = torch.cat([mask[:, :k], mask.new_ones(len(x), prompt.shape[1]), mask[:, k:]], 1)
    batch, length = x.shape[:2]
    positions = torch.arange(n, n + length)
    h = emb.LayerNorm(x + emb.position_embeddings(positions) + emb.token_type_embeddings(torch.zeros_like(positions)))
    keep = torch.cat([mask.new_ones(batch, n), mask], 1)
    additive = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i, layer in enumerate(bert.encoder.layer[:layers]):
        att = layer.attention.self

        def split(t):
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        q = split(att.query(h))
        key = torch.cat([kv[i][0], split(att.key(h))], 2)
        value = torch.cat([kv[i][1], split(att.value(h))], 2)
        probs = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(head_dim) + additive, -1)
        context = (probs @ value).transpose(1, 2).reshape(batch, length, heads * head_dim)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
        ffn = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a)))
        h = layer.output.LayerNorm(ffn + a)
    return model.classifier(torch.tanh(bert.pooler.dense(h[:, 0])))


@pytest.fixture(scope="module")
def tiny_bert_with_cls(tiny_bert, tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_bert_with_cls")
    shutil.copytree(tiny_bert, path, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(tiny_bert, cls_token="<s>").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method, kwargs", [
    (PrefixTuning, {"init": "random"}),
    (PrefixTuning, {"prefix_projection": True, "prefix_hidden_size": 16}),
    (PTuningV2, {"prefix_hidden_size": 16}),
    (PTuningV2, {"prefix_hidden_size": 16, "cls": True}),
    (PTuningV2, {"input_tokens": False, "prefix_projection": False}),
], ids=["prefix", "prefix_mlp", "ptv2", "ptv2_after_cls", "ptv2_deep_only"])
def test_prefix_methods_on_bert_equal_a_hand_written_forward(tiny_bert, tiny_bert_with_cls, method, kwargs):
    kwargs = dict(kwargs)
    backbone = tiny_bert_with_cls if kwargs.pop("cls", False) else tiny_bert
    torch.manual_seed(0)
    module = method(backbone=backbone, num_labels=2, num_virtual_tokens=4, **kwargs).build().eval()
    if method is PTuningV2 and kwargs.get("input_tokens", True):  # a non-zero prefix MLP output
        torch.nn.init.normal_(module.model.peft_model.prompt_encoder["default"].transform[-1].weight, std=0.5)
    input_ids = torch.randint(5, 500, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 5:] = 0
    with torch.no_grad():
        got = module(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = _bert_by_hand(module, input_ids, attention_mask)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the prefixes matter: the backbone alone gives other logits
    with torch.no_grad():
        plain = _peft_model(module).get_base_model()(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (plain - got).abs().max() > 1e-3


def test_prompt_tuning_forward_equals_the_backbone_on_prepended_embeddings(tiny_llama):
    torch.manual_seed(0)
    module = PromptTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=3).build().eval()
    peft_model = module.model
    input_ids = torch.randint(5, 500, (2, 6))
    with torch.no_grad():
        got = module(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        base = peft_model.get_base_model()
        prompt = peft_model.prompt_encoder["default"].embedding.weight[None].expand(2, -1, -1)
        embeds = torch.cat([prompt, base.get_input_embeddings()(input_ids)], 1)
        expected = base(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prefix_tuning_forward_on_llama_equals_the_backbone_with_a_hand_built_cache(tiny_llama):
    from transformers import DynamicCache

    from peftlab.compat import uses_cache_argument

    torch.manual_seed(0)
    module = PrefixTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=3, init="random").build().eval()
    base = module.model.get_base_model()
    input_ids = torch.randint(5, 500, (2, 6))
    with torch.no_grad():
        got = module(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        cache = DynamicCache()
        for i, (k, v) in enumerate(_prefix_kv(module, 2)):
            cache.update(k.clone(), v.clone(), i)
        name = "cache" if uses_cache_argument(base) else "past_key_values"
        expected = type(base).forward(base, input_ids=input_ids, attention_mask=torch.ones(2, 9, dtype=torch.long),
                                      **{name: cache}).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


GENERATIVE = [
    (PromptTuning, {}),
    (PTuning, {"encoder_hidden_size": 8}),
    (PrefixTuning, {"init": "random"}),
    (PTuningV2, {"prefix_hidden_size": 8}),
]


@pytest.mark.parametrize("method, kwargs", GENERATIVE, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cached_generation_equals_greedy_recomputation(tiny_llama, tiny_t5, family, method, kwargs):
    """Greedy generate (peft's, with its KV cache) returns the logits of recomputing the whole sequence through
    the method's forward at each step. On transformers 5.24 without peftlab.compat it does not (the virtual
    tokens are inserted again at every step, or the prefix is dropped)."""
    torch.manual_seed(0)
    task, backbone = ("causal_lm", tiny_llama) if family == "llama" else ("seq2seq", tiny_t5)
    module = method(backbone=backbone, task=task, num_virtual_tokens=4, **kwargs).build().eval()
    prompts = torch.randint(5, 500, (3, 6))
    mask = torch.ones_like(prompts)
    steps = 4
    with torch.no_grad():
        out = module.model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                    pad_token_id=0, eos_token_id=None, output_logits=True,
                                    return_dict_in_generate=True) if method is not PTuningV2 else None
        if out is None:  # peftlab's own generate (input tokens), which returns tokens only
            tokens = module.model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=steps)
        else:
            tokens = out.sequences
        seq = prompts if task == "causal_lm" else torch.zeros(3, 1, dtype=torch.long)
        for step in range(steps):
            if task == "causal_lm":
                logits = module.model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            else:
                logits = module.model(input_ids=prompts, attention_mask=mask, decoder_input_ids=seq).logits[:, -1]
            if out is not None:
                torch.testing.assert_close(out.logits[step], logits, rtol=1e-4, atol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    n = min(tokens.shape[1], seq.shape[1])
    assert torch.equal(tokens[:, :n], seq[:, :n])


def test_the_bridge_is_applied_only_where_needed_and_survives_deepcopy(tiny_llama):
    from peftlab.compat import bridge_cache_argument, uses_cache_argument

    module = PromptTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=2).build()
    base = module.model.get_base_model()
    needed = uses_cache_argument(base)
    assert ("forward" in vars(base)) == needed  # an instance-level forward only where transformers uses `cache`
    assert bridge_cache_argument(module.model) == needed
    if needed:
        clone = copy.deepcopy(module.model)  # merging deep-copies the model: the bridge must call the copy
        assert clone.get_base_model().forward.__self__ is clone.get_base_model()
        assert "past_key_values" in __import__("inspect").signature(base.forward).parameters
