"""Every registered method x every backbone family through the same assertions (peft's TEST_CASES pattern), in three
columns: train (exact parameter count, frozen weights unchanged, metrics, predictions), save -> load (the export
that ``peftlab fit`` writes, loaded by ``load_run``, gives the same logits) and merge (merged == unmerged logits for
a method whose class merges, a one-line refusal for one that does not)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_data, tiny_trainer
from peftlab.errors import PeftLabError
from peftlab.methods import METHODS, FullFineTuning, LoRA, PeftModule, PromptTuning, PTuningV2
from peftlab.methods.registry import method_names

# Exact trainable-parameter counts, by hand from the tiny models' shapes (see conftest):
# bert: hidden 32, FFN 64, 2 layers, head 32*2+2 = 66; llama: hidden 64, KV dim 32 (2 of 4 heads), FFN 128, 2 layers;
# t5: d_model 64 (2 heads of 32), FFN 128, 2 encoder + 2 decoder layers. N = 4 virtual tokens, MLP hidden 8.
HEAD = 32 * 2 + 2
MLP8 = lambda d_in, d_out: (d_in * 8 + 8) + (8 * d_out + d_out)  # noqa: E731 - Linear(d_in,8), Linear(8,d_out)
ADAPTER4 = lambda d: 2 * d * 4 + 4 + d  # noqa: E731 - down d->4 and up 4->d with biases
#: stands for the family's LoRA targets (conftest.FAMILIES: query/value, q_proj/v_proj, q/v) in a method's arguments
TARGETS = "<the family's targets>"
#: a count meaning "every parameter of the model" (full fine-tuning)
ALL = "all"

# LoRA r=4 on the targets: r (d_in + d_out) per adapted layer
LORA4 = {
    "bert": 2 * 2 * 4 * (32 + 32) + HEAD,
    "llama": 2 * (4 * (64 + 64) + 4 * (64 + 32)),
    "t5": 6 * 2 * 4 * (64 + 64)}  # q and v in 2 encoder self, 2 decoder self and 2 cross attentions
# one value per output feature of each target (DoRA's magnitudes, VeRA's b): bert 4 x 32, llama q 64 + v 32 per
# layer, t5 12 x 64
TARGET_OUTPUTS = {"bert": 2 * 2 * 32, "llama": 2 * (64 + 32), "t5": 6 * 2 * 64}
TARGET_LAYERS = {"bert": 2 * 2, "llama": 2 * 2, "t5": 6 * 2}
# 4 input embeddings of the hidden size (the t5 prompt is on the encoder input only)
PROMPT4 = {"bert": 4 * 32, "llama": 4 * 64, "t5": 4 * 64}
PREFIX4 = {"bert": 2 * 2 * 4 * 32 + HEAD, "llama": 2 * 2 * 4 * 32, "t5": 2 * 2 * 4 * 64}

#: registry name -> [(case id, the method's arguments, {family: trainable parameters})]. Every method that
#: ``method_names()`` lists has a row here or is excluded below (test_the_matrix_covers_every_registered_method).
SPECS = {
    "full": [("full", {}, dict.fromkeys(FAMILIES, ALL))],
    "lora": [("lora", {"r": 4, "target_modules": TARGETS}, LORA4)],
    "qlora": [("qlora", {"r": 2, "target_modules": "all-linear", "optimizer": "adamw"}, {
        # every linear layer but the head: sum of r*(d_in+d_out)
        "llama": 2 * 2 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64),
        "t5": 2 * 2 * (4 * 128 + 192 + 192) + 2 * 2 * (8 * 128 + 192 + 192)})],
    # LoRA + one magnitude per output feature of each adapted layer
    "dora": [("dora", {"r": 4, "target_modules": TARGETS}, {f: LORA4[f] + TARGET_OUTPUTS[f] for f in FAMILIES})],
    # the variants that change LoRA's scaling, start or optimizer only: LoRA's count
    "rslora": [("rslora", {"r": 4, "target_modules": TARGETS}, LORA4)],
    "pissa": [("pissa", {"r": 4, "target_modules": TARGETS}, LORA4)],
    "lora_plus": [("lora_plus", {"r": 4, "target_modules": TARGETS}, LORA4)],
    # P (d_out x 4), E (4), Q (4 x d_in) per adapted layer: LoRA's count + 4 per layer
    "adalora": [("adalora", {"init_r": 4, "target_r": 2, "target_modules": TARGETS},
                 {f: LORA4[f] + 4 * TARGET_LAYERS[f] for f in FAMILIES})],
    "prompt_tuning": [("prompt", {"num_virtual_tokens": 4}, {
        "bert": 4 * 32 + HEAD, "llama": 4 * 64, "t5": 2 * 4 * 64})],  # t5: one prompt for encoder, one for decoder
    "p_tuning": [("ptuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 8}, {
        # E (N x d) + MLP d->8->8->d
        "bert": 4 * 32 + (32 * 8 + 8) + (8 * 8 + 8) + (8 * 32 + 32) + HEAD,
        "llama": 4 * 64 + (64 * 8 + 8) + (8 * 8 + 8) + (8 * 64 + 64),
        "t5": 2 * 4 * 64 + (64 * 8 + 8) + (8 * 8 + 8) + (8 * 64 + 64)})],
    "prefix_tuning": [
        # layers x 2 (K,V) x N x KV dim
        ("prefix", {"num_virtual_tokens": 4}, PREFIX4),
        ("prefix_mlp", {"num_virtual_tokens": 4, "prefix_projection": True, "prefix_hidden_size": 8}, {
            # E (N x KV dim) + MLP KV dim -> 8 -> layers*2*KV dim
            "bert": 4 * 32 + MLP8(32, 2 * 2 * 32) + HEAD,
            "llama": 4 * 32 + MLP8(32, 2 * 2 * 32),
            "t5": 4 * 64 + MLP8(64, 2 * 2 * 64)})],
    "p_tuning_v2": [("ptv2", {"num_virtual_tokens": 4, "prefix_hidden_size": 8}, {
        # E (N x hidden: the input tokens) + MLP hidden -> 8 -> layers*2*KV dim
        "bert": 4 * 32 + MLP8(32, 2 * 2 * 32) + HEAD,
        "llama": 4 * 64 + MLP8(64, 2 * 2 * 32),
        "t5": 4 * 64 + MLP8(64, 2 * 2 * 64)})],
    "adapters": [("adapters", {"bottleneck": 4}, {
        # Houlsby: after attention and FFN output projections; t5 decoder also after cross-attention
        "bert": 2 * 2 * ADAPTER4(32) + HEAD, "llama": 2 * 2 * ADAPTER4(64), "t5": (2 * 2 + 2 * 3) * ADAPTER4(64)})],
    # LoRA + 4 input embeddings (the head counted once, in LoRA's)
    "lora_prompt": [("lora_prompt", {"r": 4, "num_virtual_tokens": 4, "target_modules": TARGETS},
                     {f: LORA4[f] + PROMPT4[f] for f in FAMILIES})],
    # each part as the method alone; the head once
    "stack": [("stack", {"additive": {"method": "lora", "r": 4, "target_modules": TARGETS},
                         "prompt": {"method": "prefix_tuning", "num_virtual_tokens": 4}},
               {f: LORA4[f] + PREFIX4[f] - (HEAD if f == "bert" else 0) for f in FAMILIES})],
    "ia3": [("ia3", {}, {
        # peft's targets: one vector per output of the keys and values, per input of the FFN's output layer
        "bert": 2 * (32 + 32 + 32 + 64) + HEAD,  # key, value, attention output.dense (32 in), FFN output.dense (64 in)
        "llama": 2 * (32 + 32 + 128),  # k_proj, v_proj (32 outputs), down_proj (128 in)
        "t5": 2 * (64 + 64 + 128) + 2 * (4 * 64 + 128)})],  # k, v (+ cross k, v in the decoder), wo (128 in)
    # d (r) and b (d_out) per adapted layer
    "vera": [("vera", {"r": 8, "target_modules": TARGETS},
              {f: 8 * TARGET_LAYERS[f] + TARGET_OUTPUTS[f] + (HEAD if f == "bert" else 0) for f in FAMILIES})],
}

#: (method, family) -> why the combination cannot run in this suite. test_excluded_combinations_are_refused checks
#: that each is still refused, so an exclusion that stops being needed fails.
EXCLUDED = {
    # bitsandbytes' CPU kernels pack 4-bit weights in blocks of 64 input features; tiny_bert's layers have 32
    ("qlora", "bert"): "QLoRA on CPU needs linear layers with >= 64 input features",
}


def shipped_methods() -> list[str]:
    """The registered methods defined in peftlab (other tests register methods of their own while they run)."""
    return [n for n in method_names() if METHODS[n].__module__.startswith("peftlab.")]


def with_targets(kwargs, targets):
    """``kwargs`` with :data:`TARGETS` replaced by the family's targets (nested too: a stack's parts)."""
    if kwargs == TARGETS:
        return targets
    return {k: with_targets(v, targets) for k, v in kwargs.items()} if isinstance(kwargs, dict) else kwargs


#: the shipped methods whose update folds into the backbone's weights: pinned here, so a class that stops (or
#: starts) declaring it fails test_the_methods_that_merge_are_pinned instead of moving to the other merge branch
MERGES = {"lora", "adalora", "dora", "rslora", "pissa", "lora_plus", "qlora", "vera", "ia3", "stack"}


#: (column, case id) -> a defect a column found and that is not fixed yet: the case is xfail(strict=True), so fixing
#: it fails the suite until the entry goes. Columns: train, save_load, merge.
DEFECTS: dict[tuple[str, str], str] = {}


#: methods whose training is also tested in their own files (test_lora_variants, test_stack, test_ia3, test_vera,
#: test_compose): their train-column cases run with -m slow, to keep the default suite's time; their save -> load
#: and merge cases (fast) always run
TRAINED_ELSEWHERE = {"dora", "rslora", "pissa", "lora_plus", "adalora", "lora_prompt", "stack", "ia3", "vera"}


def matrix(column: str) -> list:
    """``(name, family, kwargs, expected count)`` for every shipped method x family not excluded; a method with no
    row in SPECS gets one case per family, which fails naming it."""
    cases = []
    for name in shipped_methods():
        for fam in FAMILIES:
            if (name, fam) in EXCLUDED:
                continue
            for case, kwargs, counts in SPECS.get(name, [(name, None, {})]):
                defect = DEFECTS.get((column, f"{case}-{fam}"))
                marks = [pytest.mark.xfail(reason=defect, strict=True)] if defect else []
                if column == "train" and name in TRAINED_ELSEWHERE:
                    marks.append(pytest.mark.slow)
                cases.append(pytest.param(name, fam, kwargs, counts.get(fam), id=f"{case}-{fam}", marks=marks))
    return cases


def spec_of(name, kwargs):
    if kwargs is None:
        pytest.fail(f"method {name!r} is registered but has no row in tests/unit/test_methods.py SPECS and no EXCLUDED "
                    "reason: add its arguments and exact counts")
    return kwargs


def build(name, family, kwargs, num_labels=None):
    backbone, task, _, targets = family
    cls = METHODS[name]
    return cls(backbone=backbone, task=task, num_labels=num_labels, learning_rate=1e-2,
               **with_targets(spec_of(name, kwargs), targets)).build()


def test_the_matrix_covers_every_registered_method():
    shipped = set(shipped_methods())
    missing = {(n, f) for n in shipped for f in FAMILIES if n not in SPECS and (n, f) not in EXCLUDED}
    assert missing == set(), "registered methods with neither a row in SPECS nor an EXCLUDED reason"
    assert set(SPECS) - shipped == set(), "rows for methods that are not registered"
    assert {n for n, _ in EXCLUDED} <= shipped and {f for _, f in EXCLUDED} <= set(FAMILIES)
    for name, variants in SPECS.items():
        for case, _, counts in variants:  # an exact count for every family the method runs on
            assert set(counts) == {f for f in FAMILIES if (name, f) not in EXCLUDED}, case
    for column, case in DEFECTS:  # each names a case of its column
        assert case in {p.id for p in matrix(column)}, (column, case)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the exclusions are the CPU's")
@pytest.mark.parametrize("name, family, fam", [(n, f, f) for n, f in EXCLUDED], indirect=["family"],
                         ids=[f"{n}-{f}" for n, f in EXCLUDED])
def test_excluded_combinations_are_refused(name, family, fam):
    (_, kwargs, _), *_ = SPECS.get(name, [(name, {}, {})])
    with pytest.raises(PeftLabError, match=EXCLUDED[(name, fam)]):
        build(name, family, kwargs, num_labels=2 if family[1] == "classification" else None)


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


# ---------------------------------------------------------------- column 1: train
@pytest.mark.parametrize("name, family, kwargs, expected", matrix("train"), indirect=["family"])
def test_every_method_on_every_family(name, family, kwargs, expected):
    backbone, task, source, targets = family
    data = make_data(source, task, backbone, max_eval_samples=4)
    model = build(name, family, kwargs, num_labels=data.num_labels)
    if expected == ALL:
        assert model.trainable_count == model.total_count
    else:
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
    if expected == ALL:
        assert not frozen
    # predictions: probabilities, or generated text (generate works for every method)
    out = tiny_trainer().predict(model, datamodule=data)
    if task == "classification":
        assert out[0]["probs"].shape == (len(out[0]["pred"]), 2)
    else:
        texts = [t for b in out for t in b["text"]]
        assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


# ---------------------------------------------------------------- columns 2 and 3: save -> load, merge
LABELS = ["fresh", "rotten"]


def perturbed(name, family, kwargs):
    """The built module with every trainable parameter moved by seeded noise (as training would, but in no time):
    a zero-started part (LoRA's B, VeRA's b, AdaLoRA's E) would otherwise make both columns trivially equal. Seeded
    (the method's own random start too), so a case computes the same numbers whatever ran before it."""
    torch.manual_seed(0)
    module = build(name, family, kwargs, num_labels=len(LABELS) if family[1] == "classification" else None)
    batch = fixed_batch(module)
    before = logits(module, batch)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=generator).to(p))
    after = logits(module, batch)
    assert float((after - before).abs().max()) > 1e-4  # the perturbation reaches the logits, beyond the tolerances
    return module, batch, after


def fixed_batch(module) -> dict:
    batch = module.tokenizer(["A moving, beautifully shot film.", "Dull."], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if module.task == "seq2seq":
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    return batch


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("name, family, kwargs, expected", matrix("save_load"), indirect=["family"])
def test_save_then_load_gives_the_same_logits(name, family, kwargs, expected, tmp_path):
    from peftlab.adapters import read_meta
    from peftlab.api import load_run
    from peftlab.export import export_adapter

    module, batch, want = perturbed(name, family, kwargs)
    # as peftlab fit's AdapterExport writes it: <run dir>/adapter/last, with the data's label names
    export_adapter(module, tmp_path / "adapter" / "last",
                   label_names=LABELS if module.task == "classification" else None)
    run = load_run(str(tmp_path))
    got = logits(run.module, batch)
    if "converted_from" in read_meta(tmp_path / "adapter" / "last"):
        # exported as another method (PiSSA: a plain LoRA on the original backbone): the same function computed
        # in another order, equal up to float rounding
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # the trained tensors themselves, in the same model: bit-equal
        assert type(run.module) is type(module)
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("name, family, kwargs, expected", matrix("merge"), indirect=["family"])
def test_merged_equals_unmerged(name, family, kwargs, expected):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peftlab.merge import merged_model

    module, batch, want = perturbed(name, family, kwargs)
    assert module.merge_refusal() is None  # no case in the matrix has settings that refuse what its class allows
    if name in MERGES:
        merged = merged_model(module)
        torch.testing.assert_close(logits(merged, batch), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(module, batch), want, atol=0, rtol=0)  # the module itself is unchanged
        # folded, not wrapped: no adapter layer is left to compute the update a second time
        left = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
        assert left == [], left[:3]
    else:
        with pytest.raises(PeftLabError, match="cannot be merged") as err:
            merged_model(module)
        assert "\n" not in str(err.value)


def test_the_methods_that_merge_are_pinned():
    assert {n for n in shipped_methods() if METHODS[n].can_merge()} == MERGES


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
