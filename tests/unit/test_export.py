"""Adapter export (peft-loadable), load_run, atomic writes, and LoRA/QLoRA merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import trained
from peftlab.api import load_run
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.merge import merge_to_directory, merged_model, probe_batch
from peftlab.methods import (
    BottleneckAdapter,
    FullFineTuning,
    LoRA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    QLoRA,
)


def batch_of(data):
    data.setup()
    return next(iter(data.val_dataloader()))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


PEFT_CASES = [
    (LoRA, {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    (PromptTuning, {"num_virtual_tokens": 3}),
    (PTuning, {"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
    (PrefixTuning, {"num_virtual_tokens": 3, "prefix_projection": True, "prefix_hidden_size": 8}),
    (PrefixTuning, {"num_virtual_tokens": 3, "init": "random"}),
]


@pytest.mark.parametrize("method, kw", PEFT_CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_peft_methods_export_loads_with_plain_peft(tmp_path, tiny_llama, generation_jsonl, method, kw):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, data = trained(method, tiny_llama, "causal_lm", generation_jsonl, **kw)
    export_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "peftlab_meta.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter").eval()
    batch = batch_of(data)
    torch.testing.assert_close(logits(plain, batch), logits(model, batch))


def test_classification_lora_export_with_head(tmp_path, tiny_bert, sentiment_csv):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model, data = trained(LoRA, tiny_bert, "classification", sentiment_csv, r=4)
    export_adapter(model, tmp_path / "a")
    torch.manual_seed(123)  # a different random head: the trained one must come from the adapter
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    batch = {k: v for k, v in batch_of(data).items() if k != "labels"}
    torch.testing.assert_close(logits(plain, batch), logits(model, batch))


def test_qlora_export_loads_with_plain_peft(tmp_path, tiny_llama, generation_jsonl):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, data = trained(QLoRA, tiny_llama, "causal_lm", generation_jsonl, r=2, target_modules=["q_proj"])
    export_adapter(model, tmp_path / "q")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=model.quantization_config(),
                                                device_map={"": "cpu"})
    for module in base.modules():  # same kernel path as peftlab's (bnb's bf16 CPU inference repacking off)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    plain = PeftModel.from_pretrained(base, tmp_path / "q").eval()
    batch = batch_of(data)
    torch.testing.assert_close(logits(plain, batch), logits(model, batch))


@pytest.mark.parametrize("method, kw", [
    (BottleneckAdapter, {"bottleneck": 4}),
    (PTuningV2, {"num_virtual_tokens": 3, "prefix_hidden_size": 8}),
    (FullFineTuning, {}),
    (LoRA, {"r": 4, "target_modules": ["q_proj"]}),
], ids=["adapters", "ptv2", "full", "lora"])
def test_load_run_reproduces_outputs(tmp_path, tiny_llama, generation_jsonl, method, kw):
    model, data = trained(method, tiny_llama, "causal_lm", generation_jsonl, **kw)
    export_adapter(model, tmp_path / "adapter")
    run = load_run(str(tmp_path / "adapter"))
    assert type(run.module) is method
    batch = batch_of(data)
    torch.testing.assert_close(logits(run.module, batch), logits(model, batch))
    assert len(run.predict(["Review: fine\nVerdict:"], max_new_tokens=2)) == 1


def test_export_is_atomic(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    model, _ = trained(LoRA, tiny_bert, "classification", sentiment_csv, r=4)
    export_adapter(model, tmp_path / "adapter")
    good = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")  # a partial write, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError):
        export_adapter(FullFineTuning(backbone=model.hparams.backbone, num_labels=2).build(), tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary leftovers
    load_run(str(tmp_path / "adapter"))


def test_corrupt_adapter_is_rejected_clearly(tmp_path, tiny_bert, sentiment_csv):
    model, _ = trained(BottleneckAdapter, tiny_bert, "classification", sentiment_csv, bottleneck=4)
    export_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PeftLabError, match="corrupt or not a safetensors file"):
        load_run(str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").write_text("{broken")
    with pytest.raises(PeftLabError, match="not valid JSON"):
        load_run(str(tmp_path / "a"))


def test_adapter_from_another_backbone_is_rejected(tmp_path, tiny_bert, tiny_llama, sentiment_csv):
    model, _ = trained(BottleneckAdapter, tiny_bert, "classification", sentiment_csv, bottleneck=4)
    export_adapter(model, tmp_path / "a")
    with pytest.raises(PeftLabError, match="does not fit this BottleneckAdapter model"):
        load_run(str(tmp_path / "a"), backbone=tiny_llama)


# ---------------------------------------------------------------- merging
@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
def test_merged_lora_equals_unmerged_and_loads_without_peft(tmp_path, family):
    import transformers

    backbone, task, source, targets = family
    model, data = trained(LoRA, backbone, task, source, r=4, target_modules=targets)
    report = merge_to_directory(model, tmp_path / "merged", probe_batch=probe_batch(model))
    assert report["max_abs_logit_difference"] < 1e-5
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "causal_lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}[task]
    plain = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    batch = batch_of(data)
    if task == "classification":
        batch.pop("labels")
    torch.testing.assert_close(logits(plain, batch), logits(model, batch), atol=1e-5, rtol=1e-5)


def test_qlora_merge_dequantizes_and_reports_difference(tmp_path, tiny_llama, generation_jsonl):
    from transformers import AutoModelForCausalLM

    model, data = trained(QLoRA, tiny_llama, "causal_lm", generation_jsonl, r=2, target_modules=["q_proj", "v_proj"])
    report = merge_to_directory(model, tmp_path / "m", "float32", probe_batch(model))
    # dequant(W4) + dW in fp32 against the 4-bit forward: equal up to the kernels' rounding
    assert 0 <= report["max_abs_logit_difference"] < 1e-3
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert plain.dtype == torch.float32 and "quantization_config" not in plain.config.to_dict()
    bf16 = merged_model(model, "bfloat16")
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("method, kw", [(PrefixTuning, {}), (PromptTuning, {}), (BottleneckAdapter, {"bottleneck": 4})])
def test_merge_refuses_methods_that_cannot_merge(tiny_llama, method, kw):
    model = method(backbone=tiny_llama, task="causal_lm", **kw).build()
    with pytest.raises(PeftLabError, match="cannot be merged into the backbone"):
        merged_model(model)


# ---------------------------------------------------------------- through the CLI
def test_cli_exports_best_and_merges(tmp_path, tiny_bert, sentiment_csv, capsys):
    from conftest import run_main, tiny_config

    cfg = tiny_config(tmp_path, tiny_bert, sentiment_csv)
    code, out, err = run_main(["fit", "--config", cfg, "--trainer.val_check_interval", "2",
                               "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                               "--trainer.callbacks.monitor=val/acc", "--trainer.callbacks.mode=max",
                               "--trainer.callbacks+=peftlab.callbacks.LoRAMerge"], capsys)
    assert code == 0, err
    run = tmp_path / "runs/tiny/version_0"
    for name in ("best", "last"):
        assert (run / "adapter" / name / "adapter_model.safetensors").is_file()
        assert (run / "adapter" / name / "peftlab_config.yaml").is_file()
    assert "val/acc" in (run / "adapter/best/README.md").read_text()
    report = json.loads((run / "merged/merge_report.json").read_text())
    assert report["max_abs_logit_difference"] < 1e-5
    code, out, err = run_main(["merge", str(run), "--output", str(tmp_path / "m2")], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["max_abs_logit_difference"] < 1e-5
    # a method that cannot merge: one clear message, nothing written
    code, out, err = run_main(["fit", "--config", cfg, "--model", "peftlab.methods.PrefixTuning",
                               "--trainer.callbacks+=peftlab.callbacks.LoRAMerge"], capsys)
    assert code == 2 and "PrefixTuning cannot be merged" in err
