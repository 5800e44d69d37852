"""Adapter sets: many adapters on one backbone, hot-swapped and mixed per batch (peftlab.adapter_set).

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_adapter_set_runs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import exported, tokenized
from peftlab.api import load_adapters, load_run
from peftlab.errors import PeftLabError
from peftlab.methods import (
    BottleneckAdapter,
    FullFineTuning,
    LoRA,
    PromptTuning,
    Stack,
)

TEXTS = ["A moving, beautifully shot film.", "Dull and far too long.", "Funny", "an odd, quiet little drama"]


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
