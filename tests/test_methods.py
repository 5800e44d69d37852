"""Every method x every backbone family through the same assertions (peft's TEST_CASES pattern)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_data, tiny_trainer
from peftlab.errors import PeftLabError
from peftlab.methods import (  # noqa: E402
    BottleneckAdapter,
    FullFineTuning,
    LoRA,
    PeftModule,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    QLoRA,
)

# Exact trainable-parameter counts, by hand from the tiny models' shapes (see conftest):
# bert: hidden 32, 2 layers, head 32*2+2 = 66; llama: hidden 64, KV dim 32 (2 of 4 heads), FFN 128, 2 layers;
# t5: d_model 64 (2 heads of 32), FFN 128, 2 encoder + 2 decoder layers. N = 4 virtual tokens, MLP hidden 8.
HEAD = 32 * 2 + 2
MLP8 = lambda d_in, d_out: (d_in * 8 + 8) + (8 * d_out + d_out)  # noqa: E731 - Linear(d_in,8), Linear(8,d_out)
ADAPTER4 = lambda d: 2 * d * 4 + 4 + d  # noqa: E731 - down d->4 and up 4->d with biases
MATRIX = [
    # (id, class, kwargs, {family: trainable parameters})
    ("lora", LoRA, {"r": 4}, {
        "bert": 2 * 2 * 4 * (32 + 32) + HEAD,
        "llama": 2 * (4 * (64 + 64) + 4 * (64 + 32)),
        "t5": 6 * 2 * 4 * (64 + 64)}),  # q and v in 2 encoder self, 2 decoder self and 2 cross attentions
    ("full", FullFineTuning, {}, {}),  # all parameters, checked below
    ("prompt", PromptTuning, {"num_virtual_tokens": 4}, {
        "bert": 4 * 32 + HEAD, "llama": 4 * 64, "t5": 2 * 4 * 64}),  # t5: one prompt for encoder, one for decoder
    ("ptuning", PTuning, {"num_virtual_tokens": 4, "encoder_hidden_size": 8}, {
        # E (N x d) + MLP d->8->8->d
        "bert": 4 * 32 + (32 * 8 + 8) + (8 * 8 + 8) + (8 * 32 + 32) + HEAD,
        "llama": 4 * 64 + (64 * 8 + 8) + (8 * 8 + 8) + (8 * 64 + 64),
        "t5": 2 * 4 * 64 + (64 * 8 + 8) + (8 * 8 + 8) + (8 * 64 + 64)}),
    ("prefix", PrefixTuning, {"num_virtual_tokens": 4}, {
        # layers x 2 (K,V) x N x KV dim
        "bert": 2 * 2 * 4 * 32 + HEAD, "llama": 2 * 2 * 4 * 32, "t5": 2 * 2 * 4 * 64}),
    ("prefix_mlp", PrefixTuning, {"num_virtual_tokens": 4, "prefix_projection": True, "prefix_hidden_size": 8}, {
        # E (N x KV dim) + MLP KV dim -> 8 -> layers*2*KV dim
        "bert": 4 * 32 + MLP8(32, 2 * 2 * 32) + HEAD,
        "llama": 4 * 32 + MLP8(32, 2 * 2 * 32),
        "t5": 4 * 64 + MLP8(64, 2 * 2 * 64)}),
    ("ptv2", PTuningV2, {"num_virtual_tokens": 4, "prefix_hidden_size": 8}, {
        # E (N x hidden: the input tokens) + MLP hidden -> 8 -> layers*2*KV dim
        "bert": 4 * 32 + MLP8(32, 2 * 2 * 32) + HEAD,
        "llama": 4 * 64 + MLP8(64, 2 * 2 * 32),
        "t5": 4 * 64 + MLP8(64, 2 * 2 * 64)}),
    ("adapters", BottleneckAdapter, {"bottleneck": 4}, {
        # Houlsby: after attention and FFN output projections; t5 decoder also after cross-attention
        "bert": 2 * 2 * ADAPTER4(32) + HEAD, "llama": 2 * 2 * ADAPTER4(64), "t5": (2 * 2 + 2 * 3) * ADAPTER4(64)}),
    ("qlora", QLoRA, {"r": 2, "target_modules": "all-linear", "optimizer": "adamw"}, {
        # every linear layer but the head: sum of r*(d_in+d_out)
        "llama": 2 * 2 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64),
        "t5": 2 * 2 * (4 * 128 + 192 + 192) + 2 * 2 * (8 * 128 + 192 + 192)}),
]


def frozen_snapshot(model):
    """Frozen parameters by name; 4-bit layers by their dequantized output on a fixed input, because
    bitsandbytes repacks 4-bit storage for its CPU kernels on the first forward (same values, new layout)."""
    import bitsandbytes as bnb

    snap = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            probe = torch.linspace(-1, 1, module.in_features * 3).reshape(3, module.in_features)
            was_training = module.training
            module.eval()
            with torch.no_grad():
                module(probe)  # the first inference call repacks the storage for bnb's CPU kernel
                snap[name + "(probe)"] = module(probe).clone()  # so both snapshots take the same path
            module.train(was_training)
    for n, p in model.named_parameters():
        if not p.requires_grad and type(p).__name__ != "Params4bit":
            snap[n] = p.detach().clone()
    return snap


def build(method, backbone, task, data, targets, **kw):
    if method in (LoRA,) and "target_modules" not in kw:
        kw["target_modules"] = targets
    return method(backbone=backbone, task=task, num_labels=data.num_labels, learning_rate=1e-2, **kw).build()


CASES = [pytest.param(fam, cls, kw, counts.get(fam), id=f"{name}-{fam}")
         for name, cls, kw, counts in MATRIX for fam in FAMILIES
         if not (cls is QLoRA and fam == "bert")]  # bnb's CPU kernels need >= 64 input features: see integration


@pytest.mark.parametrize("family, method, kwargs, expected", [(c.values[0], *c.values[1:]) for c in CASES],
                         ids=[c.id for c in CASES], indirect=["family"])
def test_every_method_on_every_family(family, method, kwargs, expected):
    backbone, task, source, targets = family
    data = make_data(source, task, backbone, max_eval_samples=4)
    model = build(method, backbone, task, data, targets, **kwargs)
    if expected is not None:
        assert model.trainable_count == expected
    frozen = frozen_snapshot(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(model, datamodule=data)
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))
    if task == "classification":
        assert 0.0 <= metrics["test/acc"] <= 1.0
    else:
        assert metrics["test/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["test/loss"])).item(), rel=1e-4)
    after = frozen_snapshot(model)
    assert after.keys() == frozen.keys()
    for n, p in frozen.items():  # frozen backbone weights are bit-identical after training ...
        assert torch.equal(after[n], p), n
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in trainable.items())  # ... the trainable ones moved
    if method is FullFineTuning:
        assert not frozen and model.trainable_count == model.total_count
    # predictions: probabilities, or generated text (generate works for every method)
    out = tiny_trainer().predict(model, datamodule=data)
    if task == "classification":
        assert out[0]["probs"].shape == (len(out[0]["pred"]), 2)
    else:
        texts = [t for b in out for t in b["text"]]
        assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_lora_parameter_count_bert(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRA(backbone=tiny_bert, num_labels=data.num_labels, r=4, target_modules=["query", "value"]).build()
    # per layer: query and value each get A (4x32) and B (32x4); 2 layers; plus the classifier head 32*2+2
    assert model.trainable_count == 2 * 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2) == 1090
    base = FullFineTuning(backbone=tiny_bert, num_labels=data.num_labels).build()
    # total = backbone + LoRA matrices + peft's trainable copy of the head (it keeps the original too),
    # the same convention as peft's print_trainable_parameters
    assert model.total_count == base.total_count + 2 * 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2)


def test_lora_parameter_count_llama_gqa(tiny_llama):
    model = LoRA(backbone=tiny_llama, task="causal_lm", r=8, target_modules=["q_proj", "v_proj"]).build()
    # q_proj 64->64: 8*64 + 64*8; v_proj 64->32 (2 KV heads of 16): 8*64 + 32*8; 2 layers
    assert model.trainable_count == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8)) == 3584


def test_lora_all_linear_and_ffn(tiny_llama):
    ffn = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["up_proj"]).build()
    assert ffn.trainable_count == 2 * (2 * 64 + 128 * 2)
    every = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules="all-linear").build()
    # q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64, per layer
    per_layer = sum(2 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert every.trainable_count == 2 * per_layer


def test_lora_bias_and_modules_to_save(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    plain = LoRA(backbone=tiny_bert, num_labels=2, r=4).build()
    with_bias = LoRA(backbone=tiny_bert, num_labels=2, r=4, bias="lora_only").build()
    # lora_only trains the biases of the adapted layers: query and value, 32 each, 2 layers
    assert with_bias.trainable_count - plain.trainable_count == 2 * 2 * 32
    pooler = LoRA(backbone=tiny_bert, num_labels=2, r=4, modules_to_save=["classifier", "pooler"]).build()
    assert pooler.trainable_count - plain.trainable_count == 32 * 32 + 32
    assert data.num_labels == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "model.r"),
        ({"alpha": 0}, "model.alpha"),
        ({"dropout": 1.5}, "model.dropout"),
        ({"target_modules": ["qeury"]}, "Did you mean 'query'"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_lora_bad_settings(tiny_bert, kwargs, message):
    with pytest.raises(PeftLabError, match=message):
        LoRA(backbone=tiny_bert, num_labels=2, **kwargs).build()


def test_target_module_error_lists_layers(tiny_bert):
    with pytest.raises(PeftLabError) as err:
        LoRA(backbone=tiny_bert, num_labels=2, target_modules=["q_proj"]).build()
    assert "query" in str(err.value) and "value" in str(err.value) and "all-linear" in str(err.value)


def test_task_backbone_mismatch(tiny_bert):
    with pytest.raises(PeftLabError, match="no seq2seq head"):
        LoRA(backbone=tiny_bert, task="seq2seq").build()


def test_missing_backbone_directory(tmp_path):
    with pytest.raises(PeftLabError, match="no such directory"):
        LoRA(backbone=str(tmp_path / "nope"), num_labels=2).build()


def test_attach_is_the_only_hook(tiny_bert, sentiment_csv):
    class BitFit(PeftModule):
        def attach(self, backbone):
            for name, p in backbone.named_parameters():
                p.requires_grad_(name.endswith("bias"))
            return backbone

    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = BitFit(backbone=tiny_bert, num_labels=data.num_labels).build()
    biases = sum(p.numel() for n, p in model.model.named_parameters() if n.endswith("bias"))
    # the base class also trains the new classification head's weight (32 x 2): nothing else to write
    assert model.trainable_count == biases + 32 * 2
    tiny_trainer(max_steps=2).fit(model, datamodule=data)


def test_label_count_mismatch_is_refused(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRA(backbone=tiny_bert, num_labels=3).build()
    with pytest.raises(PeftLabError, match="2 labels but the model was built with num_labels=3"):
        tiny_trainer(max_steps=1).fit(model, datamodule=data)


def test_checkpoint_holds_only_trainable_and_resumes(tiny_bert, sentiment_csv, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRA(backbone=tiny_bert, num_labels=2, r=4).build()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_trainer(max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(model, datamodule=data)
    state = torch.load(ckpt.last_model_path, weights_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable and len(trainable) == 10  # 2 layers x (q,v) x (A,B) + head w,b
    assert state["global_step"] == 3

    resumed = LoRA(backbone=tiny_bert, num_labels=2, r=4).build()
    trainer = tiny_trainer(max_steps=5, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(resumed, datamodule=data, ckpt_path=ckpt.last_model_path)
    assert trainer.global_step == 5

    other = LoRA(backbone=tiny_bert, num_labels=2, r=8).build()
    with pytest.raises(PeftLabError, match="wrong shape"):
        tiny_trainer(max_steps=5).fit(other, datamodule=data, ckpt_path=ckpt.last_model_path)


def test_predict_classification_and_generation(tiny_bert, sentiment_csv, tiny_llama, generation_jsonl):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRA(backbone=tiny_bert, num_labels=2, r=4).build()
    out = tiny_trainer().predict(model, datamodule=data)
    assert out[0]["probs"].shape[1] == 2
    assert torch.allclose(out[0]["probs"].sum(-1), torch.ones(len(out[0]["pred"])))

    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    model = LoRA(backbone=tiny_llama, task="causal_lm", r=4, target_modules=["q_proj"], max_new_tokens=3).build()
    out = tiny_trainer().predict(model, datamodule=data)
    assert sum(len(b["text"]) for b in out) == 4


def test_schedules():
    from peftlab.methods.base import lr_lambda

    lin = lr_lambda("linear", 10, 110)
    assert lin(0) == pytest.approx(1 / 11) and lin(10) == 1.0 and lin(60) == pytest.approx(0.5) and lin(110) == 0.0
    cos = lr_lambda("cosine", 0, 100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert lr_lambda("constant", 5, 100)(99) == 1.0


def test_backbone_dtype_is_explicit(tmp_path, tiny_llama):
    """transformers 5 loads a checkpoint in its stored dtype by default; peftlab loads fp32 unless told."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama).half().save_pretrained(tmp_path / "fp16")
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_llama}/{f}", tmp_path / "fp16" / f)
    full = FullFineTuning(backbone=str(tmp_path / "fp16"), task="causal_lm").build()
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    half = LoRA(backbone=str(tmp_path / "fp16"), task="causal_lm", target_modules=["q_proj"], dtype="auto").build()
    assert any(p.dtype == torch.float16 for p in half.parameters())


@pytest.mark.parametrize("method, kwargs", [
    (LoRA, {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    (PromptTuning, {"num_virtual_tokens": 4}),  # logits carry 4 extra virtual positions
    (PTuningV2, {"num_virtual_tokens": 4, "prefix_hidden_size": 8}),
])
def test_exact_match_means_greedy_decoding_reproduces_the_target(tiny_llama, method, kwargs):
    """``val/exact_match`` on causal LMs: 1 for an example exactly when greedy generation from its prompt
    returns its whole target. Targets are the model's own greedy continuation (a match) or that continuation
    with its last token changed (not a match), so any misalignment of logits and labels changes the value."""
    torch.manual_seed(0)
    module = method(backbone=tiny_llama, task="causal_lm", **kwargs).build().eval()
    prompt_len, new = 6, 3
    prompts = torch.randint(5, 500, (4, prompt_len))
    with torch.no_grad():
        greedy = module.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                       max_new_tokens=new, do_sample=False, pad_token_id=0)[:, prompt_len:]
        assert greedy.shape == (4, new)
        targets = greedy.clone()
        targets[1::2, -1] = (targets[1::2, -1] + 1) % 500 + 3  # wrong last token for examples 1 and 3
        labels = torch.cat([torch.full_like(prompts, -100), targets], dim=1)
        batch = {"input_ids": torch.cat([prompts, targets], dim=1), "attention_mask": torch.ones_like(labels),
                 "labels": labels}
        module._reset_metrics("val")
        module._eval_step(batch, "val")
    assert module.metrics["val"]["exact_match"].compute().item() == 0.5


@pytest.fixture(scope="module")
def tiny_bert_cls(tiny_bert, tmp_path_factory):
    """tiny_bert whose tokenizer names its leading <s> as the [CLS] token (as BERT/RoBERTa tokenizers do)."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_bert_cls")
    shutil.copytree(tiny_bert, path, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(tiny_bert, cls_token="<s>").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method, kwargs", [
    (PTuningV2, {"num_virtual_tokens": 4, "prefix_hidden_size": 8}),
    ("LoRAPromptTuning", {"num_virtual_tokens": 4, "r": 2}),
])
def test_input_tokens_go_after_cls_for_classification(tiny_bert_cls, tiny_bert, method, kwargs):
    """With a [CLS]-first tokenizer the prompt is inserted after [CLS], so the head still pools [CLS];
    without one (and for language modelling) it is prepended."""
    if isinstance(method, str):
        from peftlab.methods import LoRAPromptTuning as method
    for backbone, after in ((tiny_bert_cls, True), (tiny_bert, False)):
        module = method(backbone=backbone, num_labels=2, **kwargs).build()
        assert module.model.after_first is after
        enc = module.tokenizer(["a good film", "bad"], return_tensors="pt", padding=True)
        types = torch.zeros_like(enc["input_ids"])
        out = module.model._with_prompt(enc["input_ids"], enc["attention_mask"], token_type_ids=types)
        words = module.model.peft_model.get_base_model().get_input_embeddings()(enc["input_ids"])
        prompt = module.model.prompt.weight.expand(2, -1, -1)
        k = 1 if after else 0
        expected = torch.cat([words[:, :k], prompt, words[:, k:]], dim=1)
        assert torch.equal(out["inputs_embeds"], expected)
        mask = enc["attention_mask"]
        assert torch.equal(out["attention_mask"], torch.cat([mask[:, :k], torch.ones(2, 4, dtype=mask.dtype),
                                                             mask[:, k:]], dim=1))
        assert out["token_type_ids"].shape == out["attention_mask"].shape


def test_starts_with_cls_on_the_packaged_tokenizers():
    from types import SimpleNamespace

    from peftlab.backbones import load_tokenizer
    from peftlab.methods.p_tuning_v2 import starts_with_cls

    minilm = load_tokenizer("packaged:all-MiniLM-L6-v2")
    smollm = load_tokenizer("packaged:SmolLM2-135M-Instruct")
    assert starts_with_cls(SimpleNamespace(task="classification", tokenizer=minilm))
    assert not starts_with_cls(SimpleNamespace(task="causal_lm", tokenizer=minilm))
    assert not starts_with_cls(SimpleNamespace(task="classification", tokenizer=smollm))


def test_ptuning_v2_zero_init_starts_prefixes_at_zero(tiny_llama):
    torch.manual_seed(0)
    zero = PTuningV2(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=4, prefix_hidden_size=8, init="zero").build()
    random = PTuningV2(backbone=tiny_llama, task="causal_lm", num_virtual_tokens=4, prefix_hidden_size=8).build()
    tokens = torch.arange(4)[None]
    for module, expect_zero in ((zero, True), (random, False)):
        prefixes = module.model.peft_model.prompt_encoder["default"](tokens)
        assert bool((prefixes == 0).all()) is expect_zero
    assert zero.trainable_count == random.trainable_count


# ---------------------------------------------------------------- head_learning_rate
@pytest.mark.parametrize("method, kwargs", [(LoRA, {"r": 2}), (PTuningV2, {"num_virtual_tokens": 4,
                                                                          "prefix_hidden_size": 8})])
def test_head_learning_rate_moves_only_the_head_at_its_rate(tiny_bert, sentiment_csv, method, kwargs):
    # AdamW's first step moves every parameter by lr * g / (|g| + eps), i.e. by ~lr wherever the gradient is
    # not tiny: so the largest step of the head shows the head's rate and the largest step of the rest the method's
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = method(backbone=tiny_bert, num_labels=2, learning_rate=1e-3, head_learning_rate=5e-2, **kwargs).build()
    head = {id(p) for p in model.head_parameters()}
    assert sum(p.numel() for p in model.head_parameters()) == HEAD
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    (optimizer,) = trainer.optimizers
    by_lr = {}
    for g in optimizer.param_groups:
        by_lr.setdefault(g["initial_lr"], set()).update(id(p) for p in g["params"])
    assert by_lr == {5e-2: head, 1e-3: {id(p) for p in model.parameters() if p.requires_grad} - head}
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    head_names = [n for n, p in model.named_parameters() if id(p) in head]
    assert max(step[n] for n in head_names) == pytest.approx(5e-2, rel=1e-3)
    assert max(v for n, v in step.items() if n not in head_names) == pytest.approx(1e-3, rel=1e-3)


def test_head_learning_rate_composes_with_a_methods_own_groups(tiny_bert, sentiment_csv):
    from peftlab.methods import LoRAPromptTuning

    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRAPromptTuning(backbone=tiny_bert, num_labels=2, r=2, num_virtual_tokens=3, learning_rate=1e-3,
                             prompt_learning_rate=2e-2, head_learning_rate=5e-2).build()
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    sizes = {}
    for g in trainer.optimizers[0].param_groups:
        sizes[g["initial_lr"]] = sizes.get(g["initial_lr"], 0) + sum(p.numel() for p in g["params"])
    assert sizes == {1e-3: model.trainable_count - HEAD - 3 * 32, 2e-2: 3 * 32, 5e-2: HEAD}


def test_head_learning_rate_unset_keeps_one_rate(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRA(backbone=tiny_bert, num_labels=2, r=2, learning_rate=1e-3).build()
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    assert {g["initial_lr"] for g in trainer.optimizers[0].param_groups} == {1e-3}


def test_head_learning_rate_must_be_positive(tiny_bert):
    with pytest.raises(PeftLabError, match="model.head_learning_rate must be > 0"):
        LoRA(backbone=tiny_bert, num_labels=2, head_learning_rate=0.0).build()


def test_head_learning_rate_is_ignored_with_a_warning_without_a_head(tiny_llama, generation_jsonl):
    # method configs set it for classification and are layered on causal LM configs too: warn, do not fail
    data = make_data(generation_jsonl, "causal_lm", tiny_llama)
    with pytest.warns(UserWarning, match="head_learning_rate is ignored: task 'causal_lm'"):
        model = LoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"], learning_rate=1e-3,
                     head_learning_rate=1e-2).build()
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    assert {g["initial_lr"] for g in trainer.optimizers[0].param_groups} == {1e-3}


def test_head_learning_rate_without_a_trainable_head(tiny_bert):
    class NoHead(PeftModule):
        train_head = False

        def attach(self, backbone):
            backbone.bert.embeddings.word_embeddings.weight.requires_grad_(True)
            return backbone

    with pytest.raises(PeftLabError, match="trains no classification head"):
        NoHead(backbone=tiny_bert, num_labels=2, head_learning_rate=1e-2).build()
