"""Adapter sets: many adapters on one backbone, hot-swapped and mixed per batch (peftlab.adapter_set)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import exported, trained_module
from peftlab.api import load_adapters, load_run
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.methods import (
    BottleneckAdapter,
    FullFineTuning,
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


def tokenized(run, texts, pad_left=True):
    tok = run.module.tokenizer
    tok.padding_side = "left" if pad_left else "right"
    batch = tok(texts, padding=True, return_tensors="pt")
    tok.padding_side = "right"
    return dict(batch)


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


def test_add_remove_switch_at_run_time(tmp_path, tiny_llama, monkeypatch):
    import peftlab.methods.base as base

    a = exported(tmp_path, "a", LoRA, tiny_llama, seed=1, r=2, target_modules=["q_proj"])
    b = exported(tmp_path, "b", PromptTuning, tiny_llama, seed=2, num_virtual_tokens=2)
    adapters = load_adapters({"a": a})

    def no_second_backbone(*args, **kwargs):
        raise AssertionError("an adapter set must not load the backbone again")

    monkeypatch.setattr(base, "load_backbone", no_second_backbone)
    adapters.add("b", b)
    monkeypatch.undo()
    assert adapters.names == ["a", "b"]
    adapters.switch("b")
    assert adapters.predict(TEXTS[:2], max_new_tokens=3) == load_run(b).predict(TEXTS[:2], max_new_tokens=3)
    adapters.switch("a")
    assert adapters.predict(TEXTS[:2], max_new_tokens=3) == load_run(a).predict(TEXTS[:2], max_new_tokens=3)
    before = adapters.parameter_count()
    adapters.remove("b")
    assert adapters.names == ["a"] and adapters.parameter_count() < before
    with pytest.raises(PeftLabError, match="no adapter 'b' in the set; it has: a"):
        adapters.predict(TEXTS, adapter="b")
    with pytest.raises(PeftLabError, match="already in the set"):
        adapters.add("a", a)
    adapters.switch(None)  # the plain backbone
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    batch = tokenized(adapters.run("a"), TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(adapters.forward(batch, None), plain(**batch).logits, rtol=0, atol=1e-5)


def test_classification_adapters_with_their_own_heads(tmp_path, tiny_bert):
    two, three = ["rotten", "fresh"], ["neg", "mixed", "pos"]
    paths = {"lora2": exported(tmp_path, "l2", LoRA, tiny_bert, "classification", 1, two, r=2),
             "other2": exported(tmp_path, "o2", LoRA, tiny_bert, "classification", 4, ["no", "yes"], r=4,
                                target_modules=["value"]),
             "bottleneck3": exported(tmp_path, "b3", BottleneckAdapter, tiny_bert, "classification", 2, three,
                                     bottleneck=4),
             "prompt3": exported(tmp_path, "p3", PromptTuning, tiny_bert, "classification", 3, three,
                                 num_virtual_tokens=2)}
    adapters = load_adapters(paths)
    for name, path in paths.items():
        got, want = adapters.predict(TEXTS, adapter=name), load_run(path).predict(TEXTS)
        assert [r["label"] for r in got] == [r["label"] for r in want]
        for g, w in zip(got, want):
            assert list(g["probs"]) == list(w["probs"])
            assert max(abs(g["probs"][k] - w["probs"][k]) for k in g["probs"]) < 1e-5
    # a mixed batch: the two-label LoRAs routed per row (each row with its own head and label names), the rest grouped
    assert adapters.routing() == {"lora2": "per row", "other2": "per row", "bottleneck3": "grouped",
                                  "prompt3": "grouped"}
    names = ["lora2", "other2", "bottleneck3", "other2", "prompt3", "lora2"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    for got, text, name in zip(adapters.predict(texts, adapter=names), texts, names):
        want = adapters.predict([text], adapter=name)[0]
        assert got["label"] == want["label"] and list(got["probs"]) == list(want["probs"])
        assert max(abs(got["probs"][k] - want["probs"][k]) for k in got["probs"]) < 1e-5


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


def test_refusals_are_one_line(tmp_path, tiny_llama, tiny_bert):
    from peftlab.merge import merge_to_directory

    lora = exported(tmp_path, "lora", LoRA, tiny_llama, r=2, target_modules=["q_proj"])
    adapters = load_adapters({"lora": lora})
    full = exported(tmp_path, "full", FullFineTuning, tiny_llama)
    with pytest.raises(PeftLabError, match="full fine-tuning trains every weight of the backbone") as err:
        adapters.add("full", full)
    assert "\n" not in str(err.value)
    merged = tmp_path / "merged"
    merge_to_directory(load_run(lora).module, merged)
    with pytest.raises(PeftLabError, match="is a merged model"):
        adapters.add("merged", str(merged))
    other = exported(tmp_path, "bert", LoRA, tiny_bert, "classification", label_names=["a", "b"], r=2)
    with pytest.raises(PeftLabError, match="needs a different backbone: backbone .* task 'classification'"):
        adapters.add("bert", other)
    with pytest.raises(PeftLabError, match="not allowed"):
        adapters.add("base", lora)
    with pytest.raises(PeftLabError, match="streams one answer of one adapter"):  # a streamer sees one answer
        adapters.predict(["a", "b"], adapter=["lora", None], streamer=object())
    # methods that rewrite the backbone's weights say so themselves (exports of PiSSA are plain LoRA and load)
    pissa = LoRA(backbone=tiny_llama, task="causal_lm", init="pissa")
    assert "rewrites the backbone's weights" in pissa.adapter_set_refusal()
    stack = Stack(backbone=tiny_llama, task="causal_lm", additive={"method": "pissa", "r": 2},
                  prompt={"method": "prefix_tuning", "num_virtual_tokens": 2})
    assert "additive part" in stack.adapter_set_refusal()
    assert adapters.names == ["lora"]


def test_recommend_for_many_tasks_points_at_adapter_sets_and_serve(tmp_path, tiny_bert, capsys):
    import peftlab.api
    from conftest import run_main
    from peftlab.commands import COMMANDS

    code, out, err = run_main(["recommend", "--num_tasks", "12", "--backbone", tiny_bert, "--output",
                               str(tmp_path / "rec.yaml")], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("serving"))
    assert "peftlab.api.load_adapters(" in line and "peftlab serve task_a=" in line and "docs/multi-adapter.md" in line
    assert hasattr(peftlab.api, "load_adapters") and "serve" in COMMANDS  # the advice names real commands


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


@pytest.mark.parametrize("cls, kw, expect", [
    (LoRA, {"r": 2, "target_modules": ["q_proj"]}, "vllm serve"),
    (LoRA, {"r": 2, "target_modules": ["q_proj"], "use_dora": True}, "Not loadable by vLLM: DoRA's magnitude"),
    (LoRA, {"r": 2, "target_modules": ["q_proj"], "bias": "all"}, "Not loadable by vLLM: trained biases"),
    (PromptTuning, {"num_virtual_tokens": 2}, "Not loadable by vLLM: PromptTuning's export is not a plain LoRA"),
    (BottleneckAdapter, {"bottleneck": 4}, "Not loadable by vLLM: BottleneckAdapter's export is not a plain LoRA"),
], ids=["lora", "dora", "bias", "prompt", "bottleneck"])
def test_export_says_which_server_loads_it(tmp_path, tiny_llama, cls, kw, expect):
    card = (Path(exported(tmp_path, "a", cls, tiny_llama, **kw)) / "README.md").read_text()
    assert "peftlab serve NAME=<this directory>" in card and expect in card
    assert ("vllm serve" in card) == (expect == "vllm serve")


def test_a_mixed_batch_gives_a_chat_run_its_own_special_tokens(tmp_path, tiny_chat_llama, capsys, monkeypatch):
    """A chat run's rows are rendered by its chat template, which writes its own special tokens: routed per row
    beside a prompt-template run's rows (which get the tokenizer's BOS), each row is encoded as its run alone
    encodes it, and answers as that run alone does."""
    from conftest import chat_rows, run_main, write_config, write_jsonl

    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    cfg = write_config(tmp_path, tiny_chat_llama, source, trainer={"max_steps": 2},
                       data={"task": "chat", "max_length": 256}, model={"target_modules": ["q_proj"]})
    assert run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)[0] == 0
    chat_dir = str(next((tmp_path / "runs").rglob("version_*")))
    plain_dir = exported(tmp_path, "plain", LoRA, tiny_chat_llama, seed=3, r=2, target_modules=["v_proj"])
    adapters = load_adapters({"chat": chat_dir, "plain": plain_dir})
    assert adapters.routing() == {"chat": "per row", "plain": "per row"}
    texts, names = ["Fresh or rotten? A superb film.", "Review: dull\nVerdict:"], ["chat", "plain"]
    alone = [load_run(chat_dir).predict([texts[0]], max_new_tokens=5)[0],
             load_run(plain_dir).predict([texts[1]], max_new_tokens=5)[0]]
    from peftlab.api import Run

    seen = []
    encode = Run.encode
    monkeypatch.setattr(Run, "encode", lambda self, t, **kw: seen.append(kw["add_special_tokens"]) or
                        encode(self, t, **kw))
    assert adapters.predict(texts, adapter=names, max_new_tokens=5) == alone
    assert seen == [[False, True]]  # one routed batch: the chat row without the tokenizer's BOS, the other with it


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
