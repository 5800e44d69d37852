"""VeRA, a shipped peft-backed method (peftlab/methods/vera.py + configs/methods/vera.yaml): exact counts on BERT
and Llama, fit through the CLI, params / estimate-memory (--r scales it) / recommend, plain-peft loading of the
export (the shared projections travel with it), merge."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import llama_logits, make_data, run_main, tiny_trainer, write_config
from peftlab.export import export_adapter
from peftlab.merge import merge_to_directory, probe_batch
from peftlab.methods import VeRA

HEAD = 32 * 2 + 2  # tiny_bert's new classification head


def bert(r):
    """query and value of tiny_bert (32 outputs each, 2 layers): d (r) and b (32) per layer, plus the head."""
    return 2 * 2 * (r + 32) + HEAD


def llama(r):
    """q_proj (64 outputs) and v_proj (32: 2 KV heads of 16) of tiny_llama, 2 layers: d (r) and b per layer."""
    return 2 * ((r + 64) + (r + 32))


QV = ["q_proj", "v_proj"]


def test_counts_exactly_on_bert_and_llama(tiny_bert, tiny_llama):
    assert VeRA(backbone=tiny_bert, num_labels=2, r=8).build().trainable_count == bert(8)
    assert VeRA(backbone=tiny_llama, task="causal_lm", r=8, target_modules=QV).build().trainable_count == llama(8)
    assert VeRA.preset_args() == {"r": 256, "target_modules": ["query", "value"], "d_initial": 0.1, "dropout": 0.0,
                                  "learning_rate": 1.0e-2, "warmup_ratio": 0.06}
    assert VeRA.can_merge() and not VeRA.composable and VeRA.stack_role is None and VeRA.peft_type == "VERA"
    assert VeRA.describe(VeRA.scaled_preset(VeRA.preset_args(), r=16)) == "VeRA r=16"


@pytest.mark.parametrize("backbone, task, expected", [("tiny_bert", "classification", bert(256)),
                                                      ("tiny_llama", "causal_lm", llama(256))])
def test_params_estimate_memory_all_and_recommend_list_it(request, tmp_path, capsys, backbone, task, expected):
    path = request.getfixturevalue(backbone)
    targets = "" if task == "classification" else f"    target_modules: {QV}\n"
    config = tmp_path / "vera.yaml"
    config.write_text(f"model:\n  class_path: peftlab.methods.VeRA\n  init_args:\n    backbone: {path}\n{targets}"
                      f"data:\n  task: {task}\n")
    code, out, err = run_main(["params", "--config", str(config), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["trainable"] == expected
    # the preset's [query, value] become q_proj / v_proj on the Llama (adapts_targets)
    code, out, err = run_main(["estimate-memory", "--backbone", path, "--task", task, "--seq_len", "16",
                               "--method", "all", "--json"], capsys)
    assert code == 0, err
    (est,) = [e for e in json.loads(out) if e["method"] == "VeRA"]
    assert est["trainable"] == expected and est["optimizer_states"] == 8 * expected  # fp32 AdamW: 2 states
    code, out, err = run_main(["estimate-memory", "--backbone", path, "--task", task, "--seq_len", "16",
                               "--method", "vera", "--r", "16", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)[0]["trainable"] == (bert(16) if task == "classification" else llama(16))
    if task == "classification":
        code, out, err = run_main(["recommend", "--backbone", path, "--task_type", task,
                                   "--output", str(tmp_path / "rec.yaml")], capsys)
        assert code == 0, err
        line = next(x for x in out.splitlines() if x.strip().startswith("vera "))
        assert "VeRA" in line and f"{expected:,}" in line


@pytest.mark.parametrize("backbone, data, task, model, expected", [
    ("tiny_bert", "sentiment_csv", "classification", {"r": 8}, bert(8)),
    ("tiny_llama", "generation_jsonl", "causal_lm", {"r": 8, "target_modules": QV}, llama(8))])
def test_fit_through_the_cli(request, tmp_path, capsys, backbone, data, task, model, expected):
    config = write_config(tmp_path, request.getfixturevalue(backbone), request.getfixturevalue(data),
                          method="peftlab.methods.VeRA", data={"task": task}, model=model)
    code, out, err = run_main(["fit", "--config", config], capsys)
    assert code == 0, err
    assert f"trainable   {expected:,} / " in out


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, tiny_llama, generation_jsonl):
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    torch.manual_seed(0)
    model = VeRA(backbone=tiny_llama, task="causal_lm", r=8, target_modules=QV, learning_rate=5e-2).build()
    tiny_trainer(max_steps=3).fit(model, datamodule=data)
    root = tmp_path_factory.mktemp("vera")
    export_adapter(model.eval(), root / "adapter")
    return model, root


def test_export_loads_with_plain_peft(trained_llama, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, root = trained_llama
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), root / "adapter")
    trained, base = llama_logits(model, tiny_llama), llama_logits(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_llama)
    assert (trained - base).abs().max() > 1e-4  # training moved b off 0: the comparison below can fail
    torch.testing.assert_close(llama_logits(plain, tiny_llama), trained, atol=1e-5, rtol=1e-5)


def test_merged_equals_unmerged(trained_llama, tiny_llama):
    from transformers import AutoModelForCausalLM

    model, root = trained_llama
    report = merge_to_directory(model, root / "merged", probe_batch=probe_batch(model))
    assert report["max_abs_logit_difference"] < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert not any("vera" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(llama_logits(merged, tiny_llama), llama_logits(model, tiny_llama), atol=1e-5, rtol=1e-5)
