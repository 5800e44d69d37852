"""IA3, a shipped peft-backed method (peftlab/methods/ia3.py + configs/methods/ia3.yaml): exact counts on BERT and
Llama, fit through the CLI, params / estimate-memory / recommend, plain-peft loading of the export, merge."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import llama_logits, make_data, run_main, tiny_trainer, write_config
from peftlab.export import export_adapter
from peftlab.merge import merge_to_directory, probe_batch
from peftlab.methods import IA3

# tiny_bert (hidden 32, FFN 64, 2 layers), peft's BERT targets: key and value (32 outputs each) and every
# output.dense at its input (attention output 32, FFN down 64), plus the new head (32 * 2 + 2)
BERT = 2 * (32 + 32 + 32 + 64) + 32 * 2 + 2
# tiny_llama (2 layers): k_proj and v_proj (32 outputs each: 2 KV heads of 16) and down_proj's input (128)
LLAMA = 2 * (32 + 32 + 128)


def test_preset_counts_exactly_on_bert_and_llama(tiny_bert, tiny_llama):
    assert IA3(backbone=tiny_bert, num_labels=2).build().trainable_count == BERT
    assert IA3(backbone=tiny_llama, task="causal_lm").build().trainable_count == LLAMA
    assert IA3.preset_args() == {"target_modules": None, "feedforward_modules": None, "learning_rate": 5.0e-3,
                                 "warmup_ratio": 0.06}
    assert IA3.can_merge() and not IA3.composable and IA3.stack_role is None and IA3.peft_type == "IA3"


@pytest.mark.parametrize("backbone, task, expected", [("tiny_bert", "classification", BERT),
                                                      ("tiny_llama", "causal_lm", LLAMA)])
def test_params_estimate_memory_all_and_recommend_list_it(request, tmp_path, capsys, backbone, task, expected):
    path = request.getfixturevalue(backbone)
    config = tmp_path / "ia3.yaml"
    config.write_text(f"model:\n  class_path: peftlab.methods.IA3\n  init_args:\n    backbone: {path}\n"
                      f"data:\n  task: {task}\n")
    code, out, err = run_main(["params", "--config", str(config), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["trainable"] == expected
    code, out, err = run_main(["estimate-memory", "--backbone", path, "--task", task, "--seq_len", "16",
                               "--method", "all", "--json"], capsys)
    assert code == 0, err
    (est,) = [e for e in json.loads(out) if e["method"] == "IA3"]
    assert est["trainable"] == expected and est["optimizer_states"] == 8 * expected  # fp32 AdamW: 2 states
    if task == "classification":
        code, out, err = run_main(["recommend", "--backbone", path, "--task_type", task,
                                   "--output", str(tmp_path / "rec.yaml")], capsys)
        assert code == 0, err
        line = next(x for x in out.splitlines() if x.strip().startswith("ia3 "))
        assert "IA3" in line and f"{expected:,}" in line


@pytest.mark.parametrize("backbone, data, task, expected", [
    ("tiny_bert", "sentiment_csv", "classification", BERT), ("tiny_llama", "generation_jsonl", "causal_lm", LLAMA)])
def test_fit_through_the_cli(request, tmp_path, capsys, backbone, data, task, expected):
    config = write_config(tmp_path, request.getfixturevalue(backbone), request.getfixturevalue(data),
                          method="peftlab.methods.IA3", data={"task": task})
    code, out, err = run_main(["fit", "--config", config], capsys)
    assert code == 0, err
    assert f"trainable   {expected:,} / " in out


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, tiny_llama, generation_jsonl):
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    torch.manual_seed(0)
    model = IA3(backbone=tiny_llama, task="causal_lm", learning_rate=5e-2).build()
    tiny_trainer(max_steps=3).fit(model, datamodule=data)
    root = tmp_path_factory.mktemp("ia3")
    export_adapter(model.eval(), root / "adapter")
    return model, root


def test_export_loads_with_plain_peft(trained_llama, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, root = trained_llama
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), root / "adapter")
    trained, base = llama_logits(model, tiny_llama), llama_logits(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_llama)
    assert (trained - base).abs().max() > 1e-4  # training moved the vectors off 1: the comparison below can fail
    torch.testing.assert_close(llama_logits(plain, tiny_llama), trained, atol=1e-5, rtol=1e-5)


def test_merged_equals_unmerged(trained_llama, tiny_llama):
    from transformers import AutoModelForCausalLM

    model, root = trained_llama
    report = merge_to_directory(model, root / "merged", probe_batch=probe_batch(model))
    assert report["max_abs_logit_difference"] < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert not any("ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(llama_logits(merged, tiny_llama), llama_logits(model, tiny_llama), atol=1e-5, rtol=1e-5)
