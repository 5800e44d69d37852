"""LoRA variants (DoRA, rsLoRA, PiSSA / OLoRA, LoRA+, AdaLoRA) carried exactly through every peftlab tool: exact
parameter counts, merged == unmerged, plain-peft round trips, compose (exact or refused in one line), the memory
estimate, checkpoints and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_data, tiny_trainer
from conftest import trained as shared_trained
from peftlab.errors import PeftLabError
from peftlab.export import export_adapter
from peftlab.merge import merge_to_directory, probe_batch
from peftlab.methods import AdaLoRA, DoRA, LoRA, LoRAPlus, PiSSA, QLoRA, RSLoRA

HEAD = 32 * 2 + 2  # tiny_bert's new classification head
LLAMA_QV = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # LoRA r=4 on q_proj (64->64) and v_proj (64->32), 2 layers
QV = ["q_proj", "v_proj"]


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def trained(*args, **kw):  # seeded: these tests compare a run with its merged / exported / converted form
    return shared_trained(*args, seed=0, **kw)


def llama_batch(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return dict(tok(["Review: a fine film\nVerdict:", "The plot follows a detective"], padding=True,
                    return_tensors="pt"))


def plain_llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


# ---------------------------------------------------------------- exact counts
def test_dora_adds_one_magnitude_per_output_feature(tiny_bert, tiny_llama):
    lora = LoRA(backbone=tiny_bert, num_labels=2, r=4).build()
    dora = DoRA(backbone=tiny_bert, num_labels=2, r=4).build()
    # query and value (32 outputs each) in 2 layers: 4 magnitude vectors of 32
    assert dora.trainable_count == lora.trainable_count + 2 * 2 * 32 == 2 * 2 * 4 * (32 + 32) + HEAD + 128
    assert dora.trainable_parts() == {"A, B": 2 * 2 * 4 * 64, "DoRA magnitudes": 128, "head": HEAD}
    llama = DoRA(backbone=tiny_llama, task="causal_lm", r=4, target_modules=QV).build()
    assert llama.trainable_count == LLAMA_QV + 2 * (64 + 32)  # q_proj has 64 outputs, v_proj 32 (2 KV heads)
    assert lora.trainable_parts() == {}  # plain LoRA reports no parts, as before


def test_variants_with_lora_counts_and_settings(tiny_llama):
    for cls in (RSLoRA, PiSSA, LoRAPlus):
        assert cls(backbone=tiny_llama, task="causal_lm", r=4, target_modules=QV).build().trainable_count == LLAMA_QV
    rs = RSLoRA(backbone=tiny_llama, task="causal_lm", r=4, alpha=8, target_modules=QV).build()
    plain = LoRA(backbone=tiny_llama, task="causal_lm", r=4, alpha=8, target_modules=QV).build()
    q_rs = rs.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    q_plain = plain.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q_rs.scaling["default"] == 8 / 2.0 and q_plain.scaling["default"] == 8 / 4  # alpha / sqrt(r), alpha / r


def test_adalora_count_and_budget(tiny_bert):
    model = AdaLoRA(backbone=tiny_bert, num_labels=2, init_r=4, target_r=2).build()
    # P (32 x 4), E (4), Q (4 x 32) on query and value of 2 layers, + the head
    assert model.trainable_count == 2 * 2 * 4 * (32 + 32 + 1) + HEAD
    assert model.trainable_parts() == {"P, E, Q": 2 * 2 * 4 * 65, "head": HEAD, "ranks at start": 16,
                                       "ranks at the end (budget)": 8}


@pytest.mark.parametrize("kwargs, message", [
    ({"use_dora": True, "init": "pissa"}, "use_dora with init: pissa"),
    ({"pissa_niter": 4}, "pissa_niter"),
    ({"loraplus_lr_ratio": 0.0}, "loraplus_lr_ratio must be > 0"),
])
def test_variant_settings_that_do_not_go_together(tiny_bert, kwargs, message):
    with pytest.raises(PeftLabError, match=message):
        LoRA(backbone=tiny_bert, num_labels=2, **kwargs)


def test_variant_classes_refuse_being_plain_lora(tiny_bert):
    with pytest.raises(PeftLabError, match="is plain LoRA"):
        DoRA(backbone=tiny_bert, num_labels=2, use_dora=False)
    with pytest.raises(PeftLabError, match="init: pissa or olora"):
        PiSSA(backbone=tiny_bert, num_labels=2, init="default")
    with pytest.raises(PeftLabError, match="4-bit backbone"):
        QLoRA(backbone=tiny_bert, num_labels=2, init="pissa")


# ---------------------------------------------------------------- PiSSA / OLoRA start
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_starts_at_the_backbone_with_the_principal_part_moved(tiny_llama, init):
    base = plain_llama(tiny_llama)
    module = PiSSA(backbone=tiny_llama, task="causal_lm", r=4, target_modules=QV, init=init).build()
    batch = llama_batch(tiny_llama)
    torch.testing.assert_close(logits(module, batch), logits(base, batch), atol=1e-5, rtol=1e-5)
    layer = module.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    w = base.model.layers[0].self_attn.q_proj.weight
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    residual = layer.base_layer.weight
    assert not torch.allclose(residual, w, atol=1e-3)  # the frozen weight is the residual ...
    torch.testing.assert_close(residual + s * b @ a, w, atol=1e-5, rtol=1e-5)  # ... W - s B0 A0
    if init == "pissa":  # B0 A0 is the rank-4 truncated SVD of W
        u, sv, vh = torch.linalg.svd(w)
        torch.testing.assert_close(s * b @ a, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-5, rtol=1e-4)


def test_pissa_randomized_svd_is_reproducible(tiny_llama):
    """pissa_niter draws from the RNG: seeded, so a rebuilt module (resume, load_run) has the same residual."""
    kw = dict(backbone=tiny_llama, task="causal_lm", r=4, target_modules=QV, pissa_niter=2)
    torch.manual_seed(1)
    a = PiSSA(**kw).build()
    torch.manual_seed(2)
    b = PiSSA(**kw).build()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------- merge and export
VARIANTS = [
    (DoRA, {"r": 4, "target_modules": QV}),
    (RSLoRA, {"r": 4, "alpha": 8, "target_modules": QV}),
    (PiSSA, {"r": 4, "target_modules": QV}),
    (PiSSA, {"r": 4, "target_modules": QV, "init": "olora"}),
    (PiSSA, {"r": 4, "target_modules": QV, "use_rslora": True}),
    (LoRAPlus, {"r": 4, "target_modules": QV, "loraplus_lr_ratio": 4.0}),
    (AdaLoRA, {"init_r": 4, "target_r": 2, "target_modules": QV, "tinit": 0.25, "tfinal": 0.25}),
]
IDS = ["dora", "rslora", "pissa", "olora", "pissa-rslora", "lora_plus", "adalora"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama, generation_jsonl):
    """Each variant trained 4 steps on review verdicts, exported, and merged with its report."""
    out = {}
    for (method, kw), name in zip(VARIANTS, IDS):
        model, data = trained(method, tiny_llama, "causal_lm", generation_jsonl, steps=4, **kw)
        root = tmp_path_factory.mktemp(name)
        export_adapter(model, root / "adapter")
        report = merge_to_directory(model, root / "merged", probe_batch=probe_batch(model))
        out[name] = (model, root, report)
    return out


@pytest.mark.parametrize("name", IDS)
def test_merged_equals_unmerged_and_is_a_plain_model(exported, tiny_llama, name):
    from transformers import AutoModelForCausalLM

    model, root, report = exported[name]
    assert report["max_abs_logit_difference"] < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(root / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = llama_batch(tiny_llama)
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", IDS)
def test_export_loads_with_plain_peft_onto_the_original_backbone(exported, tiny_llama, name):
    """Plain ``PeftModel.from_pretrained`` on the original (un-decomposed) backbone gives the trained outputs: PiSSA
    and OLoRA are exported as plain LoRAs of rank 2r, AdaLoRA with only its allocated ranks."""
    from peft import PeftModel

    model, root, _ = exported[name]
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    plain = PeftModel.from_pretrained(plain_llama(tiny_llama), root / "adapter").eval()
    batch = llama_batch(tiny_llama)
    torch.testing.assert_close(logits(plain, batch), logits(model, batch), atol=1e-5, rtol=1e-5)
    if name in ("pissa", "olora", "pissa-rslora"):
        assert config["r"] == 8 and config["init_lora_weights"] is True  # converted: rank 2r, a plain start
    if name == "adalora":
        pattern = config["rank_pattern"]
        assert sum(sum(v) for v in pattern.values()) == 2 * 4  # the budget: target_r x 4 layers
        kept = {k: p.shape[0] for k, p in plain.named_parameters() if ".lora_E." in k}
        assert sorted(kept.values()) == sorted(sum(v) for v in pattern.values())  # tensors cut to the allocation


@pytest.mark.parametrize("name", IDS)
def test_load_run_reproduces_the_variant(exported, tiny_llama, name):
    from peftlab.api import load_run

    model, root, _ = exported[name]
    run = load_run(str(root / "adapter"))
    batch = llama_batch(tiny_llama)
    torch.testing.assert_close(logits(run.module, batch), logits(model, batch), atol=1e-5, rtol=1e-5)


def test_pissa_merged_model_is_the_original_backbone_plus_the_delta(exported, tiny_llama):
    """merged = W + s (B A - B0 A0) on every adapted layer; every other weight is the original backbone's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, root, _ = exported["pissa"]
    base = plain_llama(tiny_llama)
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"] = \
                config["lora_alpha"] / config["r"] * b @ a
    assert len(deltas) == 4
    for name, p in merged.named_parameters():
        expected = base.get_parameter(name) + deltas.get(name, 0)
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_rslora_scaling_is_recorded_in_the_export(exported, tiny_llama, tmp_path):
    """use_rslora is written in adapter_config.json; read as plain LoRA (alpha / r), the outputs are wrong."""
    import shutil

    from peft import PeftModel

    model, root, _ = exported["rslora"]
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lora_alpha"] == 8 and config["r"] == 4
    shutil.copytree(root / "adapter", tmp_path / "as_plain")
    (tmp_path / "as_plain" / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": False}))
    wrong = PeftModel.from_pretrained(plain_llama(tiny_llama), tmp_path / "as_plain").eval()
    batch = llama_batch(tiny_llama)
    assert not torch.allclose(logits(wrong, batch), logits(model, batch), atol=1e-4)


def test_lora_plus_trains_b_at_its_ratio(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = LoRAPlus(backbone=tiny_bert, num_labels=2, r=2, learning_rate=1e-3, loraplus_lr_ratio=16.0).build()
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, datamodule=data)
    by_lr: dict[float, set] = {}
    for g in trainer.optimizers[0].param_groups:
        by_lr.setdefault(g["initial_lr"], set()).update(id(p) for p in g["params"])
    b = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert len(b) == 4 and by_lr == {16e-3: b, 1e-3: {id(p) for p in model.parameters() if p.requires_grad} - b}


# ---------------------------------------------------------------- compose
def explicit_sum(tiny_llama, adapters, weights):
    """The backbone with W += sum_i w_i * s_i * B_i A_i, s_i = alpha_i / r_i or alpha_i / sqrt(r_i) (rsLoRA)."""
    import math

    from safetensors.torch import load_file

    model = plain_llama(tiny_llama)
    with torch.no_grad():
        for directory, w in zip(adapters, weights):
            config = json.loads((directory / "adapter_config.json").read_text())
            r = config["r"]
            scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
            tensors = load_file(str(directory / "adapter_model.safetensors"))
            for key, a in tensors.items():
                if ".lora_A." in key:
                    b = tensors[key.replace(".lora_A.", ".lora_B.")]
                    layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                    model.get_submodule(layer).weight += w * scale * (b @ a)
    return model


@pytest.fixture(scope="module")
def plain_lora_r2(tmp_path_factory, tiny_llama, generation_jsonl):
    model, _ = trained(LoRA, tiny_llama, "causal_lm", generation_jsonl, steps=2, r=2, alpha=4, target_modules=QV)
    path = tmp_path_factory.mktemp("lora_r2") / "adapter"
    export_adapter(model, path)
    return path


@pytest.mark.parametrize("first", ["rslora", "pissa"])
def test_compose_is_exact_for_rslora_and_converted_pissa_whatever_the_ranks(exported, plain_lora_r2, tiny_llama,
                                                                            tmp_path, capsys, first):
    """rsLoRA (rank 4, alpha / sqrt r) or converted PiSSA (rank 8) first, plain LoRA (rank 2, alpha / r) second: the
    exact weighted sum through the command, written as an adapter plain peft loads (peft alone gets the scale
    wrong when the first adapter is an rsLoRA)."""
    from peft import PeftModel

    from conftest import run_main

    adapters = [exported[first][1] / "adapter", plain_lora_r2]
    weights = (0.7, -0.4)
    code, out, err = run_main(["compose", *map(str, adapters), "--weights", *map(str, weights), "--output",
                               str(tmp_path / "c")], capsys)
    assert code == 0, err
    batch = llama_batch(tiny_llama)
    expected = logits(explicit_sum(tiny_llama, adapters, weights), batch)
    composed = PeftModel.from_pretrained(plain_llama(tiny_llama), tmp_path / "c").eval()
    torch.testing.assert_close(logits(composed, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, message", [("dora", "is a DoRA adapter"), ("adalora", "is an AdaLoRA adapter")])
def test_compose_refuses_dora_and_adalora_in_one_line(exported, plain_lora_r2, tmp_path, capsys, name, message):
    from conftest import run_main

    code, out, err = run_main(["compose", str(exported[name][1] / "adapter"), str(plain_lora_r2), "--weights", "0.5",
                               "0.5", "--output", str(tmp_path / "c")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_compose_refuses_a_residual_backbone(exported, plain_lora_r2):
    from peftlab.compose import compose

    model = exported["pissa"][0]
    with pytest.raises(PeftLabError, match="residual"):
        compose(model.model, [plain_lora_r2, plain_lora_r2], [0.5, 0.5])


# ---------------------------------------------------------------- AdaLoRA's schedule and checkpoints
def test_adalora_reallocates_ranks_over_the_trainers_total_steps(tiny_bert, sentiment_csv):
    data = make_data(sentiment_csv, "classification", tiny_bert)
    model = AdaLoRA(backbone=tiny_bert, num_labels=2, init_r=4, target_r=2, tinit=0.2, tfinal=0.2,
                    learning_rate=1e-2).build()
    steps = []
    update = model.model.base_model.update_and_allocate
    model.model.base_model.update_and_allocate = lambda step: (steps.append(step), update(step))[1]
    tiny_trainer(max_steps=10).fit(model, datamodule=data)
    config = model.adalora_config
    assert (config.total_step, config.tinit, config.tfinal) == (10, 2, 2)  # estimated_stepping_batches
    assert steps == list(range(10))  # once after every optimizer step
    kept = {k: sum(v) for k, v in config.rank_pattern.items()}
    assert sum(kept.values()) == 2 * 4  # the final budget: target_r x 4 layers
    for name, p in model.named_parameters():  # masked singular values are zero
        if ".lora_E." in name:
            key = name.removeprefix("model.base_model.model.")
            assert int((p != 0).sum()) == kept[key], name


@pytest.mark.parametrize("resume_at", [3, 9])
def test_adalora_resume_continues_exactly(tiny_bert, sentiment_csv, tmp_path, resume_at):
    """Resumed from a checkpoint, a run ends bit-identical to the uninterrupted one, with the same sensitivity
    statistics along the way: the checkpoint carries the rank allocator's statistics (step 3, while ranks are being
    reallocated) and the rank pattern (step 9, in the final phase, which masks with it); the loader restores the
    data order and the RNG."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = make_data(sentiment_csv, "classification", tiny_bert)
    kw = dict(backbone=tiny_bert, num_labels=2, init_r=6, target_r=2, tinit=0.0, tfinal=0.3, learning_rate=1e-2,
              total_step=10)

    class Statistics(L.Callback):  # the allocator's smoothed sensitivity after every step
        def __init__(self):
            self.seen = {}

        def on_train_batch_end(self, trainer, module, *args):
            allocator = module.model.base_model.rankallocator
            self.seen[trainer.global_step] = {n: t.clone() for n, t in allocator.exp_avg_ipt.items()}

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        module = AdaLoRA(**kw).build()
        stats = Statistics()
        trainer = tiny_trainer(max_steps=10, enable_checkpointing=len(callbacks) > 0,
                               callbacks=[stats, *callbacks], limit_val_batches=0)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, stats.seen

    straight, seen = run(callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1,
                                                    filename="{step}")])
    ckpt = tmp_path / f"step={resume_at}.ckpt"
    state = torch.load(ckpt, weights_only=True)["peftlab_adalora"]
    assert state["rank_pattern"] and (state["exp_avg_ipt"] or resume_at > 7)  # (reset at the final allocation, 7)
    resumed, seen_again = run(ckpt_path=str(ckpt))
    for step, stats in seen_again.items():
        assert stats.keys() == seen[step].keys() and all(torch.equal(stats[n], seen[step][n]) for n in stats), step
    assert resumed.adalora_config.rank_pattern == straight.adalora_config.rank_pattern
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(q, p), n


def test_adalora_orthogonality_penalty_reaches_the_gradient_once_per_step(tiny_llama, generation_jsonl):
    """The penalty's gradient is added once per optimizer step, for causal LM too (peft adds it only to a loss it
    computes itself)."""
    data = make_data(generation_jsonl, "causal_lm", tiny_llama)
    grads = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        module = AdaLoRA(backbone=tiny_llama, task="causal_lm", init_r=4, target_r=2, target_modules=QV,
                         orth_reg_weight=weight, learning_rate=1e-2, total_step=10).build()
        step = module.on_before_optimizer_step

        def capture(optimizer, module=module, step=step, weight=weight):
            step(optimizer)
            grads[weight] = {n: p.grad.clone() for n, p in module.named_parameters() if ".lora_A." in n}

        module.on_before_optimizer_step = capture
        tiny_trainer(max_steps=1).fit(module, datamodule=data)
    torch.manual_seed(0)
    fresh = AdaLoRA(backbone=tiny_llama, task="causal_lm", init_r=4, target_r=2, target_modules=QV,
                    total_step=10).build()
    penalty = fresh.orthogonality_penalty()
    params = [p for n, p in fresh.named_parameters() if ".lora_A." in n]
    expected = torch.autograd.grad(penalty, params)
    names = [n for n, _ in fresh.named_parameters() if ".lora_A." in n]
    for name, g in zip(names, expected):
        torch.testing.assert_close(grads[1.0][name] - grads[0.0][name], g, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- QLoRA + variants
def test_qlora_with_dora_merges(tmp_path, tiny_llama, generation_jsonl):
    model, _ = trained(QLoRA, tiny_llama, "causal_lm", generation_jsonl, r=2, target_modules=QV, use_dora=True,
                       optimizer="adamw")
    lora = QLoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=QV, optimizer="adamw").build()
    assert model.trainable_count == lora.trainable_count + 2 * (64 + 32)
    report = merge_to_directory(model, tmp_path / "m", "float32", probe_batch(model))
    assert 0 <= report["max_abs_logit_difference"] < 1e-3  # as plain QLoRA: dequant(W4) + update vs the 4-bit forward


# ---------------------------------------------------------------- params, estimate-memory, the registry, the CLI
NEW = ["dora", "rslora", "pissa", "lora_plus", "adalora", "stack"]


def test_every_variant_is_registered_with_its_capabilities():
    from peftlab.methods import METHODS

    assert set(NEW) <= set(METHODS)
    assert {n for n in NEW if METHODS[n].can_merge()} == set(NEW)
    assert {n for n in NEW if METHODS[n].composable} == {"rslora", "lora_plus"}
    for name in NEW:
        assert METHODS[name].preset_path().is_file() and METHODS[name].preset_args()


def test_estimate_memory_lists_every_variant_and_sees_dora_and_adalora(tiny_llama, capsys):
    from conftest import run_main

    code, out, err = run_main(["estimate-memory", "--backbone", tiny_llama, "--task", "causal_lm", "--seq_len", "16",
                               "--method", "all", "--json"], capsys)
    assert code == 0, err
    by_method = {e["method"]: e for e in json.loads(out)}
    for cls in ("DoRA", "RSLoRA", "PiSSA", "LoRAPlus", "AdaLoRA", "Stack"):
        assert cls in by_method, cls
    lora, dora = by_method["LoRA"], by_method["DoRA"]
    assert dora["activations"] > lora["activations"]  # the norm of W + s B A, recomputed in every forward
    assert dora["trainable"] == lora["trainable"] + 2 * (64 + 32)
    ada = by_method["AdaLoRA"]  # preset init_r 12 on q_proj and v_proj: 2 x (12 x (64 + 64 + 1) + 12 x (64 + 32 + 1))
    assert ada["trainable"] == 2 * (12 * 129 + 12 * 97)
    # AdamW's two moments plus the allocator's three statistics, all fp32
    assert ada["optimizer_states"] == 8 * ada["trainable"] + 12 * ada["trainable"]


def test_dora_activations_exclude_its_dropped_identity_graph(tiny_llama):
    """DoRA takes the norm of W + s B A from B(A(I)), a graph dropped in the forward: the estimate counts only what
    backward keeps (the trace equals a trace of what survives the forward)."""
    from peftlab.analysis import memory
    from peftlab.analysis.params import MethodSpec, build_meta

    spec = MethodSpec("peftlab.methods.DoRA", {"backbone": tiny_llama, "task": "causal_lm", "r": 4,
                                               "target_modules": QV})
    fake = build_meta(spec)
    memory._cast_for_training(fake, "fp32")
    batch = memory.meta_batch("causal_lm", 2, 16)
    kept = memory.trace_activations(fake, batch).saved(False)
    everything = {}
    params = {id(p) for p in fake.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            everything[id(base)] = base
        return t

    with memory._attention("fused"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fake(**batch)
    all_saved = sum(t.numel() * t.element_size() for t in everything.values())
    identity = 4 * (64 * 64 + 64 * 4) * 4  # per adapted layer: I (64 x 64) and A(I) (64 x 4), fp32; 4 layers
    assert all_saved - kept == identity


def test_params_reports_the_parts(tiny_bert, tmp_path, capsys):
    from conftest import run_main

    config = tmp_path / "dora.yaml"
    config.write_text(f"model:\n  class_path: peftlab.methods.DoRA\n  init_args:\n    backbone: {tiny_bert}\n"
                      "    r: 4\n")
    code, out, err = run_main(["params", "--config", str(config), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["trainable"] == 2 * 2 * 4 * 64 + 128 + HEAD
    assert report["parts"] == {"A, B": 2 * 2 * 4 * 64, "DoRA magnitudes": 128, "head": HEAD}


@pytest.mark.parametrize("preset", ["dora", "rslora", "pissa", "lora_plus", "adalora"])
def test_fit_with_each_preset_through_the_cli(preset, tmp_path, tiny_bert, sentiment_csv, capsys):
    """`peftlab fit` with the variant's preset config (on the tiny backbone) trains, exports a peft adapter and merges
    (LoRAMerge) with outputs equal to the unmerged model's."""
    from conftest import ROOT, run_main, write_config

    cfg = write_config(tmp_path, tiny_bert, sentiment_csv, method="peftlab.methods.LoRA", run_name="v")
    code, out, err = run_main(["fit", "--config", cfg, "--config", str(ROOT / f"configs/methods/{preset}.yaml"),
                               "--model.init_args.backbone", tiny_bert, "--trainer.max_steps", "4",
                               "--trainer.callbacks+=peftlab.callbacks.LoRAMerge"], capsys)
    assert code == 0, err
    run = tmp_path / "runs/v/version_0"
    assert json.loads((run / "adapter/last/adapter_config.json").read_text())["peft_type"] in ("LORA", "ADALORA")
    assert json.loads((run / "merged/merge_report.json").read_text())["max_abs_logit_difference"] < 1e-5
