"""peftlab export-lora: plain LoRA exports for serving engines, exact where the method is a LoRA, converted by SVD
(with measured fidelity) where its update folds into the weights, refused in one line otherwise."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_data, run_main, tiny_trainer
from conftest import trained as shared_trained
from peftlab.api import load_run
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.lora_export import export_lora, low_rank, vllm_command
from peftlab.methods import IA3, AdaLoRA, BottleneckAdapter, DoRA, LoRA, PiSSA, PrefixTuning, PromptTuning, VeRA

QV = ["q_proj", "v_proj"]


def trained(method, backbone, source, steps=3, **kw):
    return shared_trained(method, backbone, "causal_lm", source, steps, **kw)[0]


def plain_peft(backbone, directory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone), str(directory)).eval()


@pytest.mark.parametrize("method, kw, conversion, rank", [
    (LoRA, {"r": 4, "target_modules": QV}, "none", 4),
    (PiSSA, {"r": 4, "target_modules": QV}, "exact", 8),  # A' = [A; A0], B' = [B, -B0]: rank 2r
], ids=["lora", "pissa"])
def test_plain_lora_runs_are_written_exactly(tmp_path, tiny_llama, generation_jsonl, method, kw, conversion, rank):
    model = trained(method, tiny_llama, generation_jsonl, **kw)
    export_adapter(model, tmp_path / "src")  # as a run exports it: with the data's prompt format
    loaded = load_run(str(tmp_path / "src")).module
    report = export_lora(loaded, tmp_path / "out", source=tmp_path / "src")
    assert (report["conversion"], report["rank"]) == (conversion, rank)
    meta = json.loads((tmp_path / "out" / "peftlab_meta.json").read_text())
    assert meta["prompt_format"] == json.loads((tmp_path / "src" / "peftlab_meta.json").read_text())["prompt_format"]
    assert meta["prompt_format"]["kind"] == "template"
    assert report["fidelity"]["max_abs_logit_difference"] < 1e-4
    assert report["fidelity"]["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    plain_peft(tiny_llama, tmp_path / "out")  # loads on the original backbone, as an engine would


CONVERTED = [
    (DoRA, {"r": 4, "target_modules": QV}),
    (AdaLoRA, {"init_r": 4, "target_r": 2, "target_modules": QV}),
    (IA3, {}),
    (VeRA, {"r": 8, "target_modules": QV}),
]


@pytest.mark.parametrize("method, kw", CONVERTED, ids=lambda x: getattr(x, "__name__", ""))
def test_converted_runs_are_exact_at_full_rank_and_report_their_loss_below(tmp_path, tiny_llama, generation_jsonl,
                                                                           method, kw):
    model = trained(method, tiny_llama, generation_jsonl, **kw)
    # rank 64 >= every adapted layer's smaller side on the tiny Llama (hidden 64): the SVD keeps the whole delta
    full = export_lora(model, tmp_path / "full", rank=64)
    assert full["conversion"] == "SVD to rank 64" and full["rank"] == 64
    assert full["energy_kept_min"] == pytest.approx(1.0, abs=1e-6)
    assert full["fidelity"]["max_abs_logit_difference"] < 1e-3
    low = export_lora(model, tmp_path / "low", rank=1)
    assert low["energy_kept_min"] < 1.0
    assert low["fidelity"]["max_abs_logit_difference"] > full["fidelity"]["max_abs_logit_difference"]
    assert low["fidelity"]["mean_kl"] >= 0.0
    # the written adapter is a plain LoRA that peft loads alone and that peftlab rebuilds as one
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 64, 64, False)
    batch = model.tokenizer(["Review: fine\nVerdict:"], return_tensors="pt")
    run = load_run(str(tmp_path / "full"))
    assert type(run.module) is LoRA
    with torch.no_grad():
        torch.testing.assert_close(run.module(**batch).logits, plain_peft(tiny_llama, tmp_path / "full")(**batch).logits)
        torch.testing.assert_close(run.module(**batch).logits, model(**batch).logits, atol=1e-3, rtol=0)
    assert json.loads((tmp_path / "full" / "peftlab_meta.json").read_text())["converted_from"]["method"].endswith(
        method.__name__)


def test_dora_conversion_keeps_the_magnitudes(tmp_path, tiny_llama, generation_jsonl):
    """peft 0.21's own convert_to_lora factors s B A and drops DoRA's rescaling: the merged delta must not."""
    model = trained(DoRA, tiny_llama, generation_jsonl, r=4, target_modules=QV)
    layer = model.model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)  # a change s B A alone cannot show
    report = export_lora(model, tmp_path / "d", rank=64)
    assert report["fidelity"]["max_abs_logit_difference"] < 1e-3


def test_a_seq2seq_lora_is_written_and_measured(tmp_path, tiny_t5, generation_jsonl):
    data = make_data(generation_jsonl, "seq2seq", tiny_t5, max_eval_samples=4)
    model = LoRA(backbone=tiny_t5, task="seq2seq", learning_rate=5e-2, r=2, target_modules=["q", "v"]).build()
    tiny_trainer(max_steps=2).fit(model, datamodule=data)
    report = export_lora(model.eval(), tmp_path / "t5")
    assert report["conversion"] == "none" and report["fidelity"]["max_abs_logit_difference"] < 1e-4


def test_low_rank_is_the_truncated_svd_zero_padded():
    torch.manual_seed(0)
    delta = torch.randn(6, 3) @ torch.randn(3, 5)  # rank 3
    a, b, kept = low_rank(delta, 8)
    assert a.shape == (8, 5) and b.shape == (6, 8) and kept == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=0)
    a1, b1, kept1 = low_rank(delta, 1)
    s = torch.linalg.svdvals(delta)
    assert kept1 == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-5)
    assert float(torch.linalg.matrix_norm(delta - b1 @ a1)) == pytest.approx(float(s[1:].square().sum().sqrt()),
                                                                            rel=1e-4)


@pytest.mark.parametrize("method, kw, words", [
    (PromptTuning, {"num_virtual_tokens": 3}, "peftlab serve"),
    (PrefixTuning, {"num_virtual_tokens": 3}, "peftlab serve"),
    (BottleneckAdapter, {"bottleneck": 4}, "peftlab serve"),
    # a fully trained embedding is not a linear layer's weight change (the tiny Llama has no biases to train)
    (LoRA, {"r": 4, "target_modules": QV, "modules_to_save": ["embed_tokens"]}, "besides linear weights .*embed_tokens"),
], ids=["prompt", "prefix", "adapters", "lora-embedding"])
def test_what_cannot_be_a_lora_is_refused_in_one_line(tmp_path, tiny_llama, generation_jsonl, method, kw, words):
    model = trained(method, tiny_llama, generation_jsonl, steps=1, **kw)
    with pytest.raises(PeftLabError, match=words) as info:
        export_lora(model, tmp_path / "x")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_cli_converts_and_prints_the_vllm_line(tmp_path, tiny_llama, generation_jsonl, capsys):
    model = trained(DoRA, tiny_llama, generation_jsonl, r=4, target_modules=QV)
    export_adapter(model, tmp_path / "adapter")
    code, out, err = run_main(["export-lora", str(tmp_path / "adapter"), "--output", str(tmp_path / "served"),
                               "--rank", "32"], capsys)
    assert code == 0, err
    report = json.loads(out[out.index("{"):])
    assert report["vllm"] == f"vllm serve {tiny_llama} --enable-lora --max-lora-rank 32 --lora-modules NAME={tmp_path / 'served'}"
    assert report["rank"] == 32 and 0 <= report["fidelity"]["top1_agreement"] <= 1
    code, out, err = run_main(["export-lora", str(tmp_path / "adapter"), "--output", str(tmp_path / "y"),
                               "--rank", "0"], capsys)
    assert code != 0 and "--rank must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_vllm_line_names_the_next_allowed_rank():
    assert vllm_command("b", "d", 8) == "vllm serve b --enable-lora --lora-modules NAME=d"
    assert "--max-lora-rank 64" in vllm_command("b", "d", 48)
    assert vllm_command("b", "d", 1024).startswith("not servable by vLLM")
