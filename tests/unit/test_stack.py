"""Stacks: any additive method (LoRA family, bottleneck adapters) with any prompt method (prompt tuning, prefix
tuning, P-tuning v2), trained together, saved and exported together, merged with the prompt part kept."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_data, tiny_trainer
from peftlab.errors import PeftLabError
from peftlab.methods import BottleneckAdapter, LoRA, LoRAPromptTuning, PrefixTuning, PTuningV2, Stack

N = 3  # virtual tokens
PREFIX = {"method": "prefix_tuning", "num_virtual_tokens": N}
PTV2 = {"method": "p_tuning_v2", "num_virtual_tokens": N, "prefix_hidden_size": 8}
PROMPT = {"method": "prompt_tuning", "num_virtual_tokens": N}


def lora(targets, **kw):
    return {"method": "lora", "r": 2, "target_modules": targets, **kw}


ADAPTERS = {"method": "adapters", "bottleneck": 4}


def batch_for(module, task):
    torch.manual_seed(3)
    ids = torch.randint(5, 500, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        batch["decoder_input_ids"] = ids[:, :4]
    return batch


def logits(module, batch):
    module.eval()
    with torch.no_grad():
        return module(**batch).logits


def perturb(module, scale=0.05):
    """Move every trainable parameter (as training would), reproducibly."""
    torch.manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


# ---------------------------------------------------------------- one part at a time equals the method alone
@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
@pytest.mark.parametrize("additive", ["lora", "adapters"])
def test_stack_with_the_prompt_part_off_equals_the_additive_method(family, additive):
    """``prompt: null`` (no prompt part): the same parameters, names, start and outputs as the method alone.
    (Zero prefixes or zero input tokens are not "off": their keys still take a share of every softmax.)"""
    backbone, task, _, targets = family
    spec = lora(targets) if additive == "lora" else ADAPTERS
    alone_cls, alone_kw = (LoRA, {"r": 2, "target_modules": targets}) if additive == "lora" else \
        (BottleneckAdapter, {"bottleneck": 4})
    torch.manual_seed(0)
    alone = alone_cls(backbone=backbone, task=task, num_labels=2, **alone_kw).build()
    torch.manual_seed(0)
    stack = Stack(backbone=backbone, task=task, num_labels=2, additive=spec, prompt=None).build()
    a, b = dict(alone.named_parameters()), dict(stack.named_parameters())
    assert list(a) == list(b) and stack.trainable_count == alone.trainable_count
    assert [n for n, p in a.items() if p.requires_grad] == [n for n, p in b.items() if p.requires_grad]
    perturb(alone)
    with torch.no_grad():
        for name, p in b.items():
            p.copy_(a[name])
    batch = batch_for(stack, task)
    assert torch.equal(logits(stack, batch), logits(alone, batch))


@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
@pytest.mark.parametrize("prompt", ["prefix", "ptv2"])
@pytest.mark.parametrize("additive", ["lora", "adapters"])
def test_stack_with_the_additive_part_at_its_start_equals_the_prompt_method(family, prompt, additive):
    """LoRA's B and the adapters' up projection start at zero: the stack then computes exactly what the prompt
    method alone computes with the same prompt weights (so the prompt part is wired as in that method)."""
    backbone, task, _, targets = family
    spec, (cls, kw) = (PREFIX, (PrefixTuning, {"num_virtual_tokens": N})) if prompt == "prefix" else \
        (PTV2, (PTuningV2, {"num_virtual_tokens": N, "prefix_hidden_size": 8}))
    alone = cls(backbone=backbone, task=task, num_labels=2, **kw).build()
    stack = Stack(backbone=backbone, task=task, num_labels=2, prompt=spec,
                  additive=lora(targets) if additive == "lora" else ADAPTERS).build()
    perturb(alone)
    parts = stack.part_parameters()
    mine = dict(parts["prompt"] + parts["head"])
    theirs = {n: p for n, p in alone.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(theirs)  # the prompt part (and head) under the names of the method alone
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(theirs[name])
    batch = batch_for(stack, task)
    torch.testing.assert_close(logits(stack, batch), logits(alone, batch), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- counts, gradients, learning rates
@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
@pytest.mark.parametrize("prompt", ["prompt", "prefix", "ptv2"])
def test_counts_are_the_sum_of_the_parts(family, prompt):
    backbone, task, _, targets = family
    spec = {"prompt": PROMPT, "prefix": PREFIX, "ptv2": PTV2}[prompt]
    stack = Stack(backbone=backbone, task=task, num_labels=2, additive=lora(targets), prompt=spec).build()
    additive = LoRA(backbone=backbone, task=task, num_labels=2, r=2, target_modules=targets).build()
    if prompt == "prompt":  # peftlab's input tokens: N x hidden
        prompt_count = N * stack.model.prompt.weight.shape[1]
    else:
        cls, kw = (PrefixTuning, {"num_virtual_tokens": N}) if prompt == "prefix" else \
            (PTuningV2, {"num_virtual_tokens": N, "prefix_hidden_size": 8})
        prompt_count = cls(backbone=backbone, task=task, num_labels=2, **kw).build().trainable_count
    head = 32 * 2 + 2 if task == "classification" else 0
    assert stack.trainable_count == additive.trainable_count + prompt_count - (head if prompt != "prompt" else 0)
    parts = stack.trainable_parts()
    assert parts["additive: lora"] == additive.trainable_count - head
    assert sum(parts.values()) == stack.trainable_count


@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
@pytest.mark.parametrize("parts", ["lora+prefix", "adapters+ptv2"])
def test_both_parts_get_gradients_train_and_have_their_own_rates(family, parts):
    backbone, task, source, targets = family
    # tanh adapters: a 4-unit ReLU bottleneck can go all quiet on these tiny models (then its down projection gets
    # no gradient, in the adapter method alone too), which would not be the stack's doing
    prompt_lr = 5e-2 if parts == "lora+prefix" else 3e-3
    additive, prompt = (lora(targets, learning_rate=2e-2), {**PREFIX, "learning_rate": prompt_lr}) \
        if parts == "lora+prefix" else ({**ADAPTERS, "activation": "tanh", "learning_rate": 2e-2},
                                        {**PTV2, "learning_rate": prompt_lr})
    data = make_data(source, task, backbone, max_eval_samples=4)
    stack = Stack(backbone=backbone, task=task, num_labels=data.num_labels, learning_rate=1e-2, additive=additive,
                  prompt=prompt).build()
    before = {kind: {n: p.detach().clone() for n, p in params} for kind, params in stack.part_parameters().items()}
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(stack, datamodule=data)
    after = {kind: dict(params) for kind, params in stack.part_parameters().items()}
    for kind in ("additive", "prompt"):
        assert before[kind] and all(not torch.equal(after[kind][n], v) for n, v in before[kind].items()), \
            (kind, [n for n, v in before[kind].items() if torch.equal(after[kind][n], v)])
    rates = {}
    for g in trainer.optimizers[0].param_groups:
        for p in g["params"]:
            rates[id(p)] = g["initial_lr"]
    assert {rates[id(p)] for p in after["additive"].values()} == {2e-2}
    assert {rates[id(p)] for p in after["prompt"].values()} == {prompt_lr}
    assert {rates[id(p)] for p in after["head"].values()} <= {1e-2}
    out = tiny_trainer().predict(stack, datamodule=data)  # predicts / generates
    assert out


def test_lora_plus_in_a_stack_keeps_its_b_rate(tiny_bert):
    stack = Stack(backbone=tiny_bert, num_labels=2, learning_rate=1e-3,
                  additive={"method": "lora_plus", "r": 2, "loraplus_lr_ratio": 8.0, "learning_rate": 2e-3},
                  prompt=PREFIX).build()
    groups = stack.optimizer_groups()
    b = {id(p) for n, p in stack.named_parameters() if ".lora_B." in n}
    assert [g.get("lr") for g in groups if {id(p) for p in g["params"]} == b] == [8 * 2e-3]


# ---------------------------------------------------------------- merge
@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
@pytest.mark.parametrize("prompt", ["prompt", "prefix", "ptv2"])
@pytest.mark.parametrize("additive", ["lora", "dora", "pissa"])
def test_merge_then_predict_equals_predict_before_merge(family, prompt, additive, tmp_path):
    """The additive part folds into the weights, the prompt part is kept and saved next to the merged model; the
    merged model alone loads with transformers (no LoRA left), with its prompt part through load_merged."""
    import transformers

    from peftlab.merge import merge_to_directory, probe_batch
    from peftlab.methods.stack import load_merged

    backbone, task, _, targets = family
    spec = {"prompt": PROMPT, "prefix": PREFIX, "ptv2": PTV2}[prompt]
    stack = Stack(backbone=backbone, task=task, num_labels=2, prompt=spec,
                  additive={**lora(targets), "method": additive}).build()
    perturb(stack)
    report = merge_to_directory(stack, tmp_path / "m", probe_batch=probe_batch(stack))
    assert report["max_abs_logit_difference"] < 1e-5
    batch = batch_for(stack, task)
    expected = logits(stack, batch)
    reloaded = load_merged(str(tmp_path / "m"))
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "causal_lm": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}[task]
    plain = auto.from_pretrained(tmp_path / "m")
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.named_parameters())


def test_a_stack_without_a_mergeable_part_is_refused_in_one_line(tiny_bert):
    """Refused from its settings alone, so LoRAMerge (check_mergeable at fit start) refuses before training."""
    from peftlab.merge import check_mergeable, merged_model

    stack = Stack(backbone=tiny_bert, num_labels=2, additive=ADAPTERS, prompt=PTV2)
    with pytest.raises(PeftLabError, match=r"adapters\) adds layers") as err:
        check_mergeable(stack)  # not built
    assert "\n" not in str(err.value)
    with pytest.raises(PeftLabError, match=r"adapters\) adds layers"):
        merged_model(stack.build())
    check_mergeable(Stack(backbone=tiny_bert, num_labels=2, additive={"method": "dora"}, prompt=PTV2))


# ---------------------------------------------------------------- saved, restored, exported together
@pytest.mark.parametrize("parts", ["lora+prefix", "adapters+ptv2", "pissa+prompt"])
def test_export_and_checkpoint_restore_both_parts(tmp_path, tiny_llama, generation_jsonl, parts):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from peftlab.api import load_run
    from peftlab.export import export_adapter

    additive, prompt = {"lora+prefix": (lora(["q_proj"]), PREFIX), "adapters+ptv2": (ADAPTERS, PTV2),
                        "pissa+prompt": ({**lora(["q_proj", "v_proj"]), "method": "pissa"}, PROMPT)}[parts]
    data = make_data(generation_jsonl, "causal_lm", tiny_llama, max_eval_samples=4)
    kw = dict(backbone=tiny_llama, task="causal_lm", additive=additive, prompt=prompt)
    stack = Stack(learning_rate=2e-2, **kw).build()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(stack, datamodule=data)
    batch = batch_for(stack, "causal_lm")
    expected = logits(stack, batch)
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert {n for n, p in stack.named_parameters() if p.requires_grad} == set(state)
    restored = Stack(**kw).build()
    restored.on_load_checkpoint({"state_dict": state})
    restored.load_state_dict(state, strict=False)
    torch.testing.assert_close(logits(restored, batch), expected)
    export_adapter(stack, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "peftlab_meta.json").read_text())
    assert meta["init_args"]["additive"] == additive and meta["init_args"]["prompt"] == prompt
    run = load_run(str(tmp_path / "adapter"))
    assert type(run.module) is Stack
    torch.testing.assert_close(logits(run.module, batch), expected)
    assert len(run.predict(["Review: fine\nVerdict:"], max_new_tokens=2)) == 1


# ---------------------------------------------------------------- LoRAPromptTuning is a preset of it
@pytest.mark.parametrize("family", ["bert", "llama", "t5"], indirect=True)
def test_lora_prompt_tuning_is_the_stack_of_lora_and_prompt_tuning(family):
    """Same parameters (names, start values), trainable set and outputs as the Stack it presets; the names and the
    prompt's start are those LoRAPromptTuning always had (checkpoints and exports written before still load)."""
    backbone, task, _, targets = family
    kw = dict(backbone=backbone, task=task, num_labels=2)
    torch.manual_seed(0)
    preset = LoRAPromptTuning(r=2, target_modules=targets, num_virtual_tokens=N, **kw).build()
    torch.manual_seed(0)
    stack = Stack(additive={"method": "lora", "r": 2, "alpha": 16, "target_modules": targets}, prompt=PROMPT,
                  **kw).build()
    a, b = dict(preset.named_parameters()), dict(stack.named_parameters())
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert "model.prompt.weight" in a and any(n.startswith("model.peft_model.base_model.model.") and ".lora_A.default."
                                              in n for n in a)
    words = preset.model.peft_model.get_base_model().get_input_embeddings().weight
    ids = torch.randint(0, words.shape[0], (N,), generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(a["model.prompt.weight"], words[ids])  # the earlier "vocab" start
    perturb(preset)
    with torch.no_grad():
        for n, p in b.items():
            p.copy_(a[n])
    batch = batch_for(stack, task)
    assert torch.equal(logits(preset, batch), logits(stack, batch))
    assert set(preset.hparams) >= {"r", "alpha", "num_virtual_tokens", "prompt_init", "prompt_learning_rate"}
    assert "additive" not in preset.hparams  # exports record its own arguments, which load_run gives back


def test_lora_prompt_tuning_starts_where_it_always_did(tiny_bert):
    """The prompt embedding is created (drawing from the RNG) before the LoRA layers, as the earlier LoRAPromptTuning
    did, so a seed gives the same LoRA start as before: a LoRA built after creating an embedding of that shape."""
    from torch import nn

    class EarlierOrder(LoRA):
        def attach(self, backbone):
            nn.Embedding(N, backbone.get_input_embeddings().embedding_dim)
            return super().attach(backbone)

    torch.manual_seed(0)
    earlier = EarlierOrder(backbone=tiny_bert, num_labels=2, r=2).build()
    torch.manual_seed(0)
    preset = LoRAPromptTuning(backbone=tiny_bert, num_labels=2, r=2, num_virtual_tokens=N).build()
    mine = dict(preset.named_parameters())
    for name, p in earlier.named_parameters():
        if p.requires_grad:
            assert torch.equal(mine[name.replace("model.", "model.peft_model.", 1)], p), name


# ---------------------------------------------------------------- settings are checked in one line
@pytest.mark.parametrize("additive, prompt, message", [
    ({"method": "qlora"}, PREFIX, "not a stackable additive method"),
    ({"method": "lora", "rank": 4}, PREFIX, "model.additive.rank is not an argument of lora"),
    ({"method": "lora", "backbone": "x"}, PREFIX, "share the stack's backbone"),
    ({"method": "lora", "optimizer": "adamw_8bit"}, PREFIX, "set model.optimizer"),
    ({"method": "lora", "learning_rate": -1}, PREFIX, "learning_rate must be > 0"),
    ({"method": "lora"}, {"method": "p_tuning"}, "not a stackable prompt method"),
    ({"method": "lora"}, {"method": "prompt_tuning", "init": "random"}, "choose vocab"),
    (None, None, "both null"),
])
def test_bad_parts_are_refused_in_one_line(tiny_bert, additive, prompt, message):
    with pytest.raises(PeftLabError, match=message) as err:
        Stack(backbone=tiny_bert, num_labels=2, additive=additive, prompt=prompt)
    assert "\n" not in str(err.value)


def test_a_bad_value_in_a_part_names_the_part(tiny_bert):
    with pytest.raises(PeftLabError, match=r"model.additive \(lora\): model.r \(LoRA rank\) must be >= 1"):
        Stack(backbone=tiny_bert, num_labels=2, additive={"method": "lora", "r": 0}, prompt=PREFIX).check()


# ---------------------------------------------------------------- through the CLI
def test_fit_params_and_merge_through_the_cli(tmp_path, tiny_bert, sentiment_csv, capsys):
    from conftest import ROOT, run_main, write_config
    from peftlab.methods.stack import load_merged

    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, method="peftlab.methods.LoRA", run_name="s")
    preset = str(ROOT / "configs/methods/stack.yaml")
    override = ["--model.init_args.backbone", tiny_bert, "--model.init_args.additive",
                json.dumps({"method": "lora", "r": 2, "target_modules": ["query", "value"]})]
    code, out, err = run_main(["params", "--config", cfg, "--config", preset, *override, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    lora_count = 2 * 2 * 2 * (32 + 32)
    assert report["parts"] == {"additive: lora": lora_count, "prompt: prefix_tuning": 2 * 2 * 10 * 32, "head": 66}
    code, out, err = run_main(["fit", "--config", cfg, "--config", preset, *override, "--trainer.max_steps", "3"],
                              capsys)
    assert code == 0, err
    run = tmp_path / "runs/s/version_0"
    code, out, err = run_main(["merge", str(run), "--output", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["max_abs_logit_difference"] < 1e-5
    assert load_merged(str(tmp_path / "merged")).trainable_count == 2 * 2 * 10 * 32 + 66
