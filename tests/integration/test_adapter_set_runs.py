"""Adapter sets: many adapters on one backbone, hot-swapped and mixed per batch (peftlab.adapter_set).

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_adapter_set.py."""

from __future__ import annotations

import pytest
import torch

from conftest import exported, tokenized, trained_module
from peftlab.api import load_adapters, load_run
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.methods import (
    BottleneckAdapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    Stack,
)

TEXTS = ["A moving, beautifully shot film.", "Dull and far too long.", "Funny", "an odd, quiet little drama"]


#: every family that leaves the backbone intact, on the tiny Llama (causal LM)
CAUSAL_CASES = {
    "lora": (LoRA, {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    "dora": (LoRA, {"r": 2, "target_modules": ["v_proj"], "use_dora": True}),
    "bottleneck": (BottleneckAdapter, {"bottleneck": 8}),
    "prompt": (PromptTuning, {"num_virtual_tokens": 3}),
    "ptuning": (PTuning, {"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
    "prefix": (PrefixTuning, {"num_virtual_tokens": 3}),
    "prefix_mlp": (PrefixTuning, {"num_virtual_tokens": 3, "prefix_projection": True, "prefix_hidden_size": 8}),
    "ptv2": (PTuningV2, {"num_virtual_tokens": 3, "prefix_hidden_size": 8}),
    "stack": (Stack, {"additive": {"method": "lora", "r": 2, "target_modules": ["q_proj"]},
                      "prompt": {"method": "prefix_tuning", "num_virtual_tokens": 2}}),
}


@pytest.fixture(scope="module")
def causal_set(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("set")
    modules = {name: trained_module(cls, tiny_llama, seed=i, **kw)
               for i, (name, (cls, kw)) in enumerate(CAUSAL_CASES.items())}
    paths = {name: str(export_adapter(module, tmp / name)) for name, module in modules.items()}
    return paths, load_adapters(paths), modules


def test_every_family_in_the_set_equals_the_run_loaded_alone(causal_set):
    paths, adapters, trained = causal_set
    for name, path in paths.items():
        alone = load_run(path)
        batch = tokenized(alone, TEXTS)
        with torch.no_grad():
            expected = alone.module(**batch).logits
            # the export loads back as trained (peft's prompt-learning exports hold the encoder's output)
            torch.testing.assert_close(expected, trained[name](**batch).logits, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(adapters.forward(batch, name), expected, rtol=0, atol=1e-5, msg=name)
        assert adapters.predict(TEXTS, adapter=name, max_new_tokens=4) == alone.predict(TEXTS, max_new_tokens=4)
    # the adapters differ from each other and from the plain backbone (the checks above could not pass by accident)
    outs = [adapters.forward(tokenized(alone, TEXTS[:1]), n)[:, -1] for n in ("lora", "bottleneck", "prefix", None)]
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(outs) for b in outs[i + 1:])


def test_memory_is_one_backbone_plus_the_adapters(causal_set, tiny_llama):
    from transformers import AutoModelForCausalLM

    paths, adapters, _ = causal_set
    backbone = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    alone = {name: load_run(path).module.total_count for name, path in paths.items()}
    assert "per row" in adapters.routing().values()  # the per-row pool is built and counted, and holds no copy
    assert adapters.parameter_count() == backbone + sum(total - backbone for total in alone.values())
    # the backbone's weights are the set's one copy, in every adapter's model
    weight = adapters.backbone.get_submodule("model.layers.0.self_attn.q_proj").weight
    for name in paths:
        module = adapters.run(name).module
        assert any(p is weight for p in module.parameters()), name


def test_mixed_batch_equals_each_row_alone(causal_set):
    _, adapters, _ = causal_set
    # peft routes LoRA rows in one pass (not DoRA's: peft refuses adapter_names with DoRA); the rest are grouped
    assert {n for n, how in adapters.routing().items() if how == "per row"} == {"lora"}
    names = ["lora", None, "prompt", "prefix", "ptv2", "lora", "bottleneck", "stack", "dora", "ptuning"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    mixed = adapters.predict(texts, adapter=names, max_new_tokens=4)
    assert mixed == [adapters.predict([t], adapter=n, max_new_tokens=4)[0] for t, n in zip(texts, names)]
    # logits of rows of one length (no padding), families whose logits have the input's positions
    same = ["lora", None, "prefix", "bottleneck", "lora", "stack", None, "dora"]
    batch = tokenized(adapters.run("lora"), ["one two three four"] * len(same))
    rows = adapters.forward(batch, same)
    for i, name in enumerate(same):
        alone = adapters.forward({k: v[i:i + 1] for k, v in batch.items()}, name)
        torch.testing.assert_close(rows[i:i + 1], alone, rtol=0, atol=1e-5, msg=str(name))
    with pytest.raises(PeftLabError, match="3 texts but 2 adapter names"):
        adapters.predict(texts[:3], adapter=["lora", None])


@pytest.mark.slow  # 4-bit matmuls on the CPU: ~50 s on the shared 2-core machine
def test_qlora_adapters_share_one_4bit_backbone(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes")
    from peftlab.methods import QLoRA

    kw = dict(r=2, target_modules=["q_proj", "v_proj"], compute_dtype="float32")
    paths = {"a": exported(tmp_path, "a", QLoRA, tiny_llama, seed=1, **kw),
             "b": exported(tmp_path, "b", QLoRA, tiny_llama, seed=2, **kw)}
    adapters = load_adapters(paths)
    assert type(adapters.backbone.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear4bit"
    assert adapters.routing() == {"a": "per row", "b": "per row"}
    names = ["a", "b", None, "b"]
    mixed = adapters.predict(TEXTS, adapter=names, max_new_tokens=3)
    for text, name, got in zip(TEXTS, names, mixed):
        if name:
            assert got == load_run(paths[name]).predict([text], max_new_tokens=3)[0]
    batch = tokenized(adapters.run("a"), ["one two three four"] * 4)
    rows = adapters.forward(batch, names)
    for i, name in enumerate(names):
        alone = load_run(paths[name]).module if name else None
        with torch.no_grad():
            want = alone(**{k: v[i:i + 1] for k, v in batch.items()}).logits if alone else \
                adapters.forward({k: v[i:i + 1] for k, v in batch.items()}, None)
        torch.testing.assert_close(rows[i:i + 1], want, rtol=0, atol=1e-5, msg=str(name))
    lora = exported(tmp_path, "lora", LoRA, tiny_llama, r=2, target_modules=["q_proj"])
    with pytest.raises(PeftLabError, match="needs a different backbone: quantization None"):
        adapters.add("lora", lora)


@pytest.mark.parametrize("name", list(CAUSAL_CASES))
def test_a_padded_batch_generates_what_each_row_generates_alone(causal_set, name):
    """Rows of different lengths in one predict call (left-padded for generation) get exactly their one-row answers.
    The prompt and prefix families put their virtual positions ahead of the padding (peft drops position_ids for
    them: a padded row's logits move by 2e-3 to 2e-2 on this model), so they declare pads_exactly = False and are
    batched by length; every other family is padded."""
    paths, _, _ = causal_set
    run = load_run(paths[name])
    texts = [*TEXTS, *(f"{t} {t}" for t in TEXTS)]  # eight rows of different lengths
    assert len({len(run.encode([t])["input_ids"][0]) for t in texts}) == 8
    alone = [run.predict([t], max_new_tokens=6)[0] for t in texts]
    assert run.predict(texts, batch_size=8, max_new_tokens=6) == alone
    exact = type(run.module).pads_exactly
    assert exact == (name in ("lora", "dora", "bottleneck")), name


def test_without_length_batches_the_prompt_family_would_differ(causal_set, monkeypatch):
    """What pads_exactly = False guards against: prompt tuning's last-position logits in a left-padded batch are not
    the row's own (so the equality above is not luck)."""
    paths, _, _ = causal_set
    run = load_run(paths["ptv2"])
    texts = ["Dull.", TEXTS[0] + " " + TEXTS[3]]
    with torch.no_grad():
        padded = run.module(**run.encode(texts)).logits[:, -1]
        alone = torch.cat([run.module(**run.encode([t])).logits[:, -1] for t in texts])
    assert (padded - alone).abs().max() > 1e-4
