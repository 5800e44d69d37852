"""Method-specific behaviour of the method zoo (the shared matrix lives in test_methods.py).

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_zoo_runs.py."""

from __future__ import annotations

import pytest
import torch

from conftest import make_data, tiny_trainer
from peftlab.errors import PeftLabError
from peftlab.methods import BottleneckAdapter, FullFineTuning, LoRA, PrefixTuning, PromptTuning, PTuningV2, QLoRA


def logits(model, data):
    data.setup()
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------- prompt tuning
def test_prompt_tuning_text_init_copies_token_embeddings(tiny_llama):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama)("a great film")["input_ids"]  # as peft tokenizes it
    n = 2 * len(ids) + 1  # longer than the text: peft repeats the tokens to fill N
    model = PromptTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=n, init="text",
                         init_text="a great film").build()
    expected = (ids * 3)[:n]
    words = model.model.get_base_model().get_input_embeddings().weight[expected]
    prompt = model.model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, words)


def test_prompt_tuning_bad_settings(tiny_llama):
    with pytest.raises(PeftLabError, match="num_virtual_tokens must be >= 1"):
        PromptTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=0).build()
    with pytest.raises(PeftLabError, match="init_text is empty"):
        PromptTuning(backbone=tiny_llama, task="causal_lm", init="text", init_text=" ").build()


# ---------------------------------------------------------------- prefix tuning / P-tuning v2
@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_v2_paper_mode_is_prefix_tuning(tiny_llama, projection):
    kw = dict(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=4, prefix_hidden_size=8)
    paper = PTuningV2(input_tokens=False, prefix_projection=projection, **kw).build()
    prefix = PrefixTuning(prefix_projection=projection, **kw).build()
    assert paper.trainable_count == prefix.trainable_count


def test_ptuning_v2_shares_one_embedding_for_input_and_prefixes(tiny_llama, generation_jsonl):
    model = PTuningV2(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=4, prefix_hidden_size=8).build()
    wrapper = model.model
    encoder = wrapper.peft_model.prompt_encoder["default"]
    assert wrapper.prompt is encoder.embedding  # one E: the input tokens and the prefix MLP's input
    assert encoder.embedding.weight.shape == (4, 64)  # N x hidden, not N x KV dim (32)
    parts = model.trainable_parts()
    assert parts == {"embedding E": 4 * 64, "prefix MLP": (64 * 8 + 8) + (8 * 128 + 128), "head": 0}
    assert sum(parts.values()) == model.trainable_count
    # E acts on the input: changing it changes the output even with the prefix MLP's output fixed
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    before = logits(model, data)
    with torch.no_grad():
        encoder.transform[-1].weight.zero_()
        encoder.transform[-1].bias.zero_()
    fixed_prefix = logits(model, data)
    with torch.no_grad():
        encoder.embedding.weight.add_(1.0)
    assert not torch.allclose(fixed_prefix, logits(model, data))
    assert not torch.allclose(before, fixed_prefix)  # and the prefixes act on attention


def test_ptuning_v2_input_tokens_need_projection(tiny_llama):
    with pytest.raises(PeftLabError, match="input_tokens: true needs model.prefix_projection: true"):
        PTuningV2(backbone=tiny_llama, task="causal_lm", prefix_projection=False).build()


def test_ptuning_v2_generation_matches_its_forward(tiny_llama, generation_jsonl):
    """The hand-written greedy loop picks the argmax of the model's own forward at every step."""
    model = PTuningV2(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=4, prefix_hidden_size=8).build().eval()
    data = make_data(generation_jsonl, "causal_lm", tiny_llama)
    ids = torch.tensor([data.tokenizer("Review: good\nVerdict:")["input_ids"]])
    out = model.model.generate(ids, max_new_tokens=3, pad_token_id=0)
    assert out.shape[1] <= ids.shape[1] + 3 and torch.equal(out[:, : ids.shape[1]], ids)
    with torch.no_grad():
        first = model.model(input_ids=ids).logits[:, -1].argmax(-1)
    assert out[0, ids.shape[1]] == first[0]


# ---------------------------------------------------------------- adapters
def test_adapters_start_as_identity(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    torch.manual_seed(1)
    plain = FullFineTuning(backbone=tiny_bert, num_labels=2).build()
    torch.manual_seed(1)  # same head initialisation
    adapted = BottleneckAdapter(backbone=tiny_bert, num_labels=2, bottleneck=4).build()
    assert torch.equal(logits(plain, data), logits(adapted, data))


def test_adapter_placement_and_targets(tiny_bert, tiny_llama):
    per = 2 * 64 * 4 + 4 + 64
    houlsby = BottleneckAdapter(backbone=tiny_llama, task="causal_lm", bottleneck=4).build()
    pfeiffer = BottleneckAdapter(backbone=tiny_llama, task="causal_lm", bottleneck=4, placement="pfeiffer").build()
    assert (houlsby.trainable_count, pfeiffer.trainable_count) == (4 * per, 2 * per)
    names = [n for n, m in pfeiffer.model.named_modules() if type(m).__name__ == "WithAdapter"]
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    custom = BottleneckAdapter(backbone=tiny_llama, task="causal_lm", bottleneck=4, target_modules=["o_proj"]).build()
    assert custom.trainable_count == 2 * per
    with pytest.raises(PeftLabError, match="match no module"):
        BottleneckAdapter(backbone=tiny_bert, num_labels=2, target_modules=["nope"]).build()


# ---------------------------------------------------------------- QLoRA
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_quantizes_the_backbone(tiny_llama, quant_type, double_quant):
    import bitsandbytes as bnb

    model = QLoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj", "v_proj"],
                  quant_type=quant_type, double_quant=double_quant, compute_dtype="float32").build()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of both blocks; the LM head stays unquantized
    state = layers[0].weight.quant_state
    assert state.quant_type == quant_type and bool(state.nested) == double_quant
    assert layers[0].compute_dtype == torch.float32
    lora = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj", "v_proj"]).build()
    # the same adapter, and the same total once 4-bit weights are counted unpacked
    assert (model.trainable_count, model.total_count) == (lora.trainable_count, lora.total_count)


@pytest.mark.parametrize("name, cls_name", [("paged_adamw_32bit", "PagedAdamW32bit"),
                                            ("paged_adamw_8bit", "PagedAdamW8bit"), ("adamw_8bit", "AdamW8bit"),
                                            ("adamw", "AdamW")])
def test_optimizer_choice(tiny_llama, generation_jsonl, name, cls_name):
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=2)
    model = QLoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"], optimizer=name).build()
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(model, datamodule=data)
    assert type(trainer.optimizers[0]).__name__ == cls_name


def test_qlora_refuses_layers_too_small_for_cpu_kernels(tiny_bert):
    with pytest.raises(PeftLabError, match="needs linear layers with >= 64 input features"):
        QLoRA(backbone=tiny_bert, num_labels=2, r=2).build()


@pytest.mark.parametrize("method, kw", [(PromptTuning, {"num_virtual_tokens": 3}), (LoRA, {"r": 2})])
def test_decoder_classification_is_independent_of_padding(tiny_llama, sentiment_csv, method, kw):
    """Decoder classifiers read the last position; left padding keeps it the last real token, also when
    soft prompts make the model see embeddings instead of ids."""
    data = make_data(sentiment_csv, "classification", tiny_llama)
    assert data.pad_left
    model = method(backbone=tiny_llama, num_labels=2, target_modules=["q_proj"], **kw).build() if method is LoRA else \
        method(backbone=tiny_llama, num_labels=2, **kw).build()
    model.eval()
    data.setup()
    rows = [data.datasets["validation"][i] for i in range(4)]
    batch = data.collate(rows, pad_left=True)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # lengths differ, so there is padding
    def run(b):
        with torch.no_grad():
            return model(**{k: v for k, v in b.items() if k != "labels"}).logits

    alone = torch.cat([run(data.collate([r])) for r in rows])
    left_error = (run(batch) - alone).abs().max()
    right_error = (run(data.collate(rows, pad_left=False)) - alone).abs().max()
    # LoRA sees ids and is exact either way; with soft prompts, peft puts the prompt before the padding,
    # so RoPE distances shift a little (<1e-3 here), while right padding reads a pad position
    assert left_error < 2e-3
    if method is PromptTuning:
        assert right_error > 10 * left_error


def test_qlora_trains_after_validation(tiny_llama, generation_jsonl):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval forward; training after a
    validation (sanity check, val_check_interval) must still work."""
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    model = QLoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj", "v_proj"]).build()
    trainer = tiny_trainer(max_steps=4, num_sanity_val_steps=1, val_check_interval=2)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4


# ---------------------------------------------------------------- LoRA + prompt tuning
@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
def test_lora_plus_prompt_trains_both_parts(family):
    from peftlab.methods import LoRAPromptTuning

    backbone, task, source, targets = family
    data = make_data(source, task, backbone, max_eval_samples=4)
    model = LoRAPromptTuning(backbone=backbone, task=task, num_labels=data.num_labels, r=2, target_modules=targets,
                             num_virtual_tokens=3, learning_rate=1e-2, prompt_learning_rate=5e-2).build()
    lora_only = LoRA(backbone=backbone, task=task, num_labels=data.num_labels, r=2, target_modules=targets).build()
    hidden = model.model.prompt.weight.shape[1]
    assert model.trainable_count == lora_only.trainable_count + 3 * hidden
    assert model.trainable_parts() == {"LoRA (+ head)": lora_only.trainable_count, "soft prompt": 3 * hidden}
    prompt0 = model.model.prompt.weight.detach().clone()
    lora_b0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(model, datamodule=data)
    # one optimizer, the prompt in its own group with its own learning rate
    (optimizer,) = trainer.optimizers
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [1e-2, 5e-2]
    assert not torch.equal(model.model.prompt.weight, prompt0)
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in lora_b0.items())  # every LoRA B moved
    out = tiny_trainer().predict(model, datamodule=data)
    assert out


def test_lora_plus_prompt_saved_and_restored_together(tmp_path, tiny_llama, generation_jsonl):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from peftlab.methods import LoRAPromptTuning

    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    kw = dict(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"], num_virtual_tokens=3)
    model = LoRAPromptTuning(learning_rate=1e-2, **kw).build()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(model, datamodule=data)
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert any("prompt" in k for k in state) and any("lora_A" in k for k in state)
    restored = LoRAPromptTuning(**kw).build()
    restored.on_load_checkpoint({"state_dict": state})
    restored.load_state_dict(state, strict=False)
    for n, p in restored.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(model.named_parameters())[n]), n


def test_p_tuning_lstm_encoder(tiny_llama, generation_jsonl):
    from peftlab.methods import PTuning

    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    model = PTuning(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=4, encoder="lstm",
                    encoder_hidden_size=8, encoder_num_layers=1, learning_rate=1e-2).build()
    encoder = model.model.prompt_encoder["default"]
    assert isinstance(encoder.lstm_head, torch.nn.LSTM) and encoder.lstm_head.bidirectional
    lstm = 2 * 4 * (8 * 64 + 8 * 8 + 2 * 8)  # 2 directions x 4 gates x (W_ih, W_hh, two biases)
    mlp = (16 * 16 + 16) + (16 * 64 + 64)  # MLP head 2h -> 2h -> hidden
    assert model.trainable_count == 4 * 64 + lstm + mlp
    tiny_trainer(max_steps=2).fit(model, datamodule=data)


def test_qlora_releases_the_memory_mapped_checkpoint(tiny_llama):
    """Parameters kept in the checkpoint's dtype get their own storage (else the mapped file stays resident)."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftlab.methods.qlora import release_checkpoint_mapping

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    release_checkpoint_mapping(model)
    for name, p in model.named_parameters():
        assert p.data_ptr() != before[name][0], name
        assert torch.equal(p.detach(), before[name][1]), name
