"""Weighted multi-LoRA composition: exact by default, checked against an explicit weighted sum of deltas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_data, tiny_trainer
from peftlab.compose import compose
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.methods import LoRA

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_llama, generation_jsonl):
    """Two LoRAs of different ranks and alphas on two real tasks: review verdicts and plot language modelling."""
    root = tmp_path_factory.mktemp("adapters")
    tasks = [
        (generation_jsonl, {}, {"r": 2, "alpha": 4}),
        ("packaged:rotten_tomatoes_plots", {"prompt_template": "{text}", "response_template": "", "loss_on": "all",
                                            "max_train_samples": 64}, {"r": 4, "alpha": 16}),
    ]
    out = []
    for i, (source, data_kw, lora_kw) in enumerate(tasks):
        data = make_data(source, "causal_lm", tiny_llama, max_eval_samples=4, **data_kw)
        model = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=TARGETS, learning_rate=5e-2, **lora_kw).build()
        tiny_trainer(max_steps=4).fit(model, datamodule=data)
        export_adapter(model, root / f"a{i}")
        out.append(str(root / f"a{i}"))
    return out


def probe(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return tok(["Review: a fine film\nVerdict:", "The plot follows a detective"], padding=True, return_tensors="pt")


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def explicit_sum(tiny_llama, adapters, weights):
    """The backbone with W += sum_i w_i * (alpha_i / r_i) * B_i A_i, computed by hand from the files."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for directory, w in zip(adapters, weights):
            config = json.loads(open(f"{directory}/adapter_config.json").read())
            scale = config["lora_alpha"] / config["r"]
            tensors = load_file(f"{directory}/adapter_model.safetensors")
            for key, a in tensors.items():
                if ".lora_A." not in key:
                    continue
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                model.get_submodule(layer).weight += w * scale * (b @ a)
    return model


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, -0.5)])
def test_exact_composition_equals_weighted_sum_of_deltas(tiny_llama, two_adapters, weights):
    module = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=TARGETS).build()
    compose(module.model, two_adapters, list(weights))
    batch = probe(tiny_llama)
    expected = logits(explicit_sum(tiny_llama, two_adapters, weights), batch)
    torch.testing.assert_close(logits(module, batch), expected, atol=1e-5, rtol=1e-5)


def test_weights_one_zero_is_the_first_adapter(tiny_llama, two_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=TARGETS).build()
    compose(module.model, two_adapters, [1.0, 0.0])
    first = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), two_adapters[0])
    batch = probe(tiny_llama)
    torch.testing.assert_close(logits(module, batch), logits(first, batch), atol=1e-5, rtol=1e-5)


def test_approximate_modes_differ_and_linear_needs_equal_ranks(tiny_llama, two_adapters):
    module = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=TARGETS).build()
    with pytest.raises(PeftLabError, match="needs adapters of equal rank"):
        compose(module.model, two_adapters, [0.5, 0.5], mode="linear")
    batch = probe(tiny_llama)
    compose(module.model, two_adapters, [0.5, 0.5], mode="exact")
    exact = logits(module, batch)
    compose(module.model, two_adapters, [0.5, 0.5], mode="svd", svd_rank=1)
    assert not torch.allclose(logits(module, batch), exact, atol=1e-6)  # truncated to rank 1: not the sum


def test_incompatible_adapters_are_refused(tmp_path, tiny_llama, tiny_bert, two_adapters, sentiment_csv):
    other_targets = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=["q_proj"]).build()
    export_adapter(other_targets, tmp_path / "q_only")
    module = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=TARGETS).build()
    with pytest.raises(PeftLabError, match="adapt different layers"):
        compose(module.model, [two_adapters[0], str(tmp_path / "q_only")], [0.5, 0.5])
    export_adapter(LoRA(backbone=tiny_bert, task="causal_lm", target_modules=["query", "value"]).build(), tmp_path / "bert")
    with pytest.raises(PeftLabError, match="trained on different backbones"):
        compose(module.model, [two_adapters[0], str(tmp_path / "bert")], [0.5, 0.5])
    with pytest.raises(PeftLabError, match="2 adapters but 1 weights"):
        compose(module.model, two_adapters, [1.0])
    with pytest.raises(PeftLabError, match="classification adapter"):
        data = make_data(sentiment_csv, "classification", tiny_bert)
        export_adapter(LoRA(backbone=tiny_bert, num_labels=data.num_labels, r=2).build(), tmp_path / "cls")
        compose(module.model, [str(tmp_path / "cls"), str(tmp_path / "cls")], [0.5, 0.5])


def test_compose_command_writes_a_peft_adapter_and_a_merged_model(tmp_path, tiny_llama, two_adapters, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import run_main

    code, out, err = run_main(["compose", *two_adapters, "--weights", "0.7", "0.3", "--output",
                               str(tmp_path / "c")], capsys)
    assert code == 0, err
    batch = probe(tiny_llama)
    expected = logits(explicit_sum(tiny_llama, two_adapters, (0.7, 0.3)), batch)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "c")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    code, out, err = run_main(["compose", *two_adapters, "--weights", "0.7", "0.3", "--output",
                               str(tmp_path / "m"), "--merge"], capsys)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-5)
    code, out, err = run_main(["compose", two_adapters[0], "--weights", "1", "--output", str(tmp_path / "x")], capsys)
    assert code == 2 and "at least two adapters" in err and not (tmp_path / "x").exists()


def test_compose_callback_at_test_time(tmp_path, tiny_llama, generation_jsonl, two_adapters):
    from peftlab.callbacks import ComposeLoRA

    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    module = LoRA(backbone=tiny_llama, task="causal_lm", target_modules=TARGETS).build()
    cb = ComposeLoRA(adapters=two_adapters, weights=[0.6, 0.4])
    result = tiny_trainer(callbacks=[cb]).test(module, datamodule=data, verbose=False)[0]
    assert module.model.active_adapter == "composed" and torch.isfinite(torch.tensor(result["test/loss"]))
