"""Decision support: `peftlab params`, `peftlab estimate-memory`, `peftlab recommend`.

Counts are checked against formulas written out here from the architectures (not from the code under
test); the shipped backbone shapes also against their published parameter counts.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_analysis_runs.py.
"""

from __future__ import annotations

import json
import math
import time

import peft  # noqa: F401 - imports bitsandbytes, whose import-time notice must not land in a captured test
import psutil
import pytest
import torch
import yaml

from conftest import ROOT, lora_params, run_main
from peftlab.analysis import memory, recommend
from peftlab.analysis.params import MethodSpec, build_meta

PE = ROOT / "experiments" / "param_efficiency"


QS = str(ROOT / "configs" / "quickstart.yaml")


def meta(class_name: str, backbone: str, task: str, **kw):
    return build_meta(MethodSpec(f"peftlab.methods.{class_name}", {"backbone": backbone, "task": task, **kw}))


def adapter(d: int, b: int) -> int:
    """Bottleneck adapter: down d->b and up b->d, with biases."""
    return 2 * d * b + b + d


def llama_total(V: int, h: int, L: int, heads: int, kv_heads: int, f: int, tied: bool = False) -> int:
    """Llama: embeddings (+ untied LM head) + per layer q,k,v,o + gate,up,down + 2 RMSNorms, + final norm."""
    kv = h // heads * kv_heads
    layer = h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h
    return V * h * (1 if tied else 2) + L * layer + h


def bert_total(V: int, h: int, L: int, f: int, pos: int, types: int, pooler: bool) -> int:
    """BERT/RoBERTa encoder: embeddings (word, position, type, LayerNorm) + layers (+ pooler)."""
    emb = V * h + pos * h + types * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    return emb + L * layer + (h * h + h if pooler else 0)


def t5_total(V: int, d: int, inner: int, ff: int, L: int, heads: int, buckets: int = 32) -> int:
    """T5 (tied LM head): shared embedding, encoder (self-attn + FFN), decoder (+ cross-attn), norms, rel. bias."""
    enc = L * (4 * d * inner + 2 * d * ff + 2 * d) + buckets * heads + d
    dec = L * (8 * d * inner + 2 * d * ff + 3 * d) + buckets * heads + d
    return V * d + enc + dec


def gpt2_total(V: int, h: int, L: int, positions: int) -> int:
    """GPT-2 (tied LM head): token + position embeddings, per block 2 LayerNorms, c_attn, c_proj, MLP; final LN."""
    layer = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
    return V * h + positions * h + L * layer + 2 * h


# ------------------------------------------------------------------------------------------ params: tiny models
LLAMA = dict(V=600, h=64, L=2, heads=4, kv_heads=2, f=128)  # conftest.tiny_llama


CASES = [
    # (fixture, task, method, kwargs, expected trainable)
    ("tiny_llama", "causal_lm", "LoRA", {"r": 4, "target_modules": ["q_proj", "v_proj"]},
     lora_params([(64, 64), (64, 32)] * 2, 4)),
    ("tiny_llama", "causal_lm", "PromptTuning", {"num_virtual_tokens": 5}, 5 * 64),
    ("tiny_llama", "causal_lm", "PrefixTuning", {"num_virtual_tokens": 5}, 2 * 2 * 5 * 32),  # L x (K,V) x N x kv dim
    ("tiny_llama", "causal_lm", "BottleneckAdapter", {"bottleneck": 4}, 2 * 2 * adapter(64, 4)),  # 2 per layer
    ("tiny_llama", "causal_lm", "FullFineTuning", {}, llama_total(**LLAMA)),
    ("tiny_bert", "classification", "LoRA", {"r": 4, "target_modules": ["query", "value"]},
     lora_params([(32, 32)] * 4, 4) + 32 * 2 + 2),  # + the 2-way head
    ("tiny_bert", "classification", "PrefixTuning", {"num_virtual_tokens": 5}, 2 * 2 * 5 * 32 + 66),
    ("tiny_bert", "classification", "FullFineTuning", {},
     bert_total(V=600, h=32, L=2, f=64, pos=128, types=2, pooler=True) + 66),
    # T5: q/v in 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions
    ("tiny_t5", "seq2seq", "LoRA", {"r": 4, "target_modules": ["q", "v"]}, lora_params([(64, 64)] * 12, 4)),
    ("tiny_t5", "seq2seq", "PromptTuning", {"num_virtual_tokens": 5}, 2 * 5 * 64),  # encoder + decoder prompt
    ("tiny_t5", "seq2seq", "BottleneckAdapter", {"bottleneck": 4}, (2 * 2 + 2 * 3) * adapter(64, 4)),
    ("tiny_t5", "seq2seq", "FullFineTuning", {}, t5_total(V=600, d=64, inner=64, ff=128, L=2, heads=2)),
]


@pytest.mark.parametrize("fixture, task, method, kw, expected", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_meta_counts_match_formulas(request, fixture, task, method, kw, expected):
    m = meta(method, request.getfixturevalue(fixture), task, **kw)
    assert m.trainable_count == expected
    assert all(p.device.type == "meta" for p in m.parameters())


def test_meta_counts_equal_the_real_build(tiny_llama):
    from peftlab.methods import LoRA

    real = LoRA(backbone=tiny_llama, task="causal_lm", r=4, target_modules=["q_proj", "v_proj"]).build()
    fake = meta("LoRA", tiny_llama, "causal_lm", r=4, target_modules=["q_proj", "v_proj"])
    assert (fake.trainable_count, fake.total_count) == (real.trainable_count, real.total_count)
    assert real.total_count == llama_total(**LLAMA) + lora_params([(64, 64), (64, 32)] * 2, 4)


# ------------------------------------------------------------------------------------------ shipped shapes
SHIPPED_TOTALS = [
    # (shape, task, formula, published count)
    ("llama-2-7b", "causal_lm", llama_total(32000, 4096, 32, 32, 32, 11008), 6_738_415_616),
    ("llama-2-70b", "causal_lm", llama_total(32000, 8192, 80, 64, 8, 28672), 68_976_648_192),
    ("llama-1b", "causal_lm", llama_total(32000, 2048, 22, 32, 4, 5632), 1_100_048_384),  # TinyLlama-1.1B
    ("t5-small", "seq2seq", t5_total(32128, 512, 512, 2048, 6, 8), 60_506_624),
    ("t5-base", "seq2seq", t5_total(32128, 768, 768, 3072, 12, 12), 222_903_552),
    ("gpt2-medium", "causal_lm", gpt2_total(50257, 1024, 24, 1024), 354_823_168),
]


@pytest.mark.parametrize("shape, task, formula, published", SHIPPED_TOTALS, ids=[s[0] for s in SHIPPED_TOTALS])
def test_shipped_shapes_have_their_published_size(shape, task, formula, published):
    assert formula == published
    assert meta("FullFineTuning", shape, task).total_count == published


@pytest.mark.parametrize("shape, large", [("roberta-base", False), ("roberta-large", True)])
def test_roberta_shapes(shape, large):
    h, L, f = (1024, 24, 4096) if large else (768, 12, 3072)
    base = bert_total(V=50265, h=h, L=L, f=f, pos=514, types=1, pooler=True)
    assert base == (355_359_744 if large else 124_645_632)  # published RobertaModel sizes
    head = (h * h + h) + (h * 2 + 2)  # RobertaClassificationHead: dense + out_proj; no pooler
    m = meta("LoRA", shape, "classification", r=8, target_modules=["query", "value"])
    assert m.trainable_count == lora_params([(h, h)] * 2 * L, 8) + head  # LoRA paper: 0.3M (base) / 0.8M (large) + head
    # peft keeps the original head and trains a copy (modules_to_save): both count in the total
    assert m.total_count == base - (h * h + h) + 2 * head + lora_params([(h, h)] * 2 * L, 8)


def test_lora_on_shipped_shapes():
    assert meta("LoRA", "gpt2-medium", "causal_lm", r=8, target_modules=["c_attn"]).trainable_count == \
        lora_params([(1024, 3 * 1024)] * 24, 8)
    assert meta("LoRA", "t5-small", "seq2seq", r=8, target_modules=["q", "v"]).trainable_count == \
        lora_params([(512, 512)] * (6 * 2 + 6 * 4), 8)


def test_70b_builds_in_seconds_without_memory():
    import gc

    meta("LoRA", "llama-1b", "causal_lm", target_modules=["q_proj"])  # warm up imports and caches
    gc.collect()
    rss = psutil.Process().memory_info().rss
    started = time.time()
    m = meta("LoRA", "llama-2-70b", "causal_lm", r=8, target_modules=["q_proj", "v_proj"])
    assert time.time() - started < 20
    assert psutil.Process().memory_info().rss - rss < 300 * 2**20  # 70B parameters would be 138 GB in bf16
    assert m.trainable_count == lora_params([(8192, 8192), (8192, 1024)] * 80, 8) == 16_384_000
    assert m.total_count == 68_976_648_192 + 16_384_000
    assert {p.device.type for p in m.parameters()} == {"meta"}
    assert {b.device.type for b in m.model.buffers()} <= {"meta"}


# ------------------------------------------------------------------------------------------ params: the 7B table
NOTES_7B = [
    ("prompt_tuning_20.yaml", 20 * 4096),
    ("prefix_tuning_10.yaml", 32 * 2 * 10 * 4096),
    ("lora_r8_qv.yaml", lora_params([(4096, 4096)] * 64, 8)),
    ("adapters_64.yaml", 64 * adapter(4096, 64)),
    ("full_finetuning.yaml", 6_738_415_616),
]


@pytest.mark.parametrize("config, expected", NOTES_7B, ids=[c for c, _ in NOTES_7B])
def test_param_efficiency_configs(config, expected, capsys):
    code, out, err = run_main(["params", "--config", str(PE / config), "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["trainable"] == expected
    assert (got["bytes_fp32"], got["bytes_bf16"]) == (4 * expected, 2 * expected)
    assert got["percent"] == pytest.approx(100 * expected / got["total"])


def test_param_efficiency_doc_is_current():
    doc = (ROOT / "docs" / "results" / "param_efficiency.md").read_text()
    for _, expected in NOTES_7B:
        assert f"| {expected:,} |" in doc
    flagged = [line for line in doc.splitlines() if line.startswith("| ") and "**WRONG**" in line]
    assert len(flagged) == 1 and flagged[0].count("**WRONG**") == 2  # the adapters' ~50M and ~200MB


def test_params_cli_text_and_layered_configs(capsys):
    code, out, err = run_main(["params", "--config", QS, "--backbone", "llama-2-7b",
                               "--data.task", "causal_lm", "--model.target_modules", "[q_proj, v_proj]",
                               "--model.r", "16"], capsys)
    assert code == 0, err
    assert "trainable    8,388,608" in out and "file bf16    16,777,216 bytes (16 MiB)" in out
    # classification: head from --num_labels (data is not read)
    code, out, _ = run_main(["params", "--config", QS, "--num_labels", "5", "--json"], capsys)
    assert json.loads(out)["trainable"] == lora_params([(384, 384)] * 12, 8) + 384 * 5 + 5


def test_params_cli_backbone_forms(tmp_path, tiny_llama, capsys):
    shape = ROOT / "configs" / "backbones" / "llama-1b" / "config.json"
    copy = tmp_path / "mine.json"
    copy.write_text(shape.read_text())
    results = set()
    for backbone in ("llama-1b", "configs/backbones/llama-1b", str(shape.parent), str(shape), str(copy)):
        code, out, err = run_main(["params", "--config", str(ROOT / "configs/methods/lora.yaml"),
                                   "--backbone", backbone, "--model.target_modules", "[q_proj, v_proj]", "--json"],
                                  capsys)
        assert code == 0, err
        results.add(json.loads(out)["trainable"])
    assert results == {lora_params([(2048, 2048), (2048, 256)] * 22, 8) + 2048 * 2}


def test_params_cli_ptuning_v2_parts(capsys):
    code, out, err = run_main(["params", "--config", str(ROOT / "configs/methods/p_tuning_v2.yaml"),
                               "--backbone", "llama-2-7b", "--data.task", "causal_lm"], capsys)
    assert code == 0, err
    mlp = (4096 * 512 + 512) + 512 * (32 * 2 * 4096) + 32 * 2 * 4096
    assert f"parts        embedding E: {20 * 4096:,}; prefix MLP: {mlp:,}; head: 0" in out


BAD = [
    (["params"], "needs --config FILE"),
    (["params", "--config", "nope.yaml"], "File does not exist"),
    (["params", "--config", QS, "--model.rank", "3"], "Option 'rank' is not accepted"),
    (["params", "--config", QS, "--backbone", "./nowhere"], "no such file or directory"),
    (["params", "--config", QS, "--bogus"], "unknown option --bogus"),
    (["params", "--config", QS, "--num_labels", "1"], "--num_labels must be >= 2"),
    (["estimate-memory"], "give a backbone"),
    (["estimate-memory", "--size", "3b"], "--size '3b' is unknown"),
    (["estimate-memory", "--size", "7b", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["estimate-memory", "--size", "7b", "--optimizer", "sgd"], "--optimizer 'sgd' is unknown"),
    (["estimate-memory", "--size", "7b", "--batch_size", "0"], "must be >= 1"),
    (["estimate-memory", "--size", "7b", "--backbone", "llama-1b"], "either --size or --backbone"),
    (["recommend", "--task_type", "poetry"], "invalid choice: 'poetry'"),
    (["recommend", "--num_tasks", "0"], "--num_tasks must be >= 1"),
    (["recommend", "--frobnicate"], "unknown argument '--frobnicate'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    code, out, err = run_main(args, capsys)
    assert code == 2
    assert message in err and err.startswith("peftlab: error: ")
    assert err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------ memory
def test_parameter_memory_formulas(tiny_llama):
    N = llama_total(**LLAMA)
    t = lora_params([(64, 64), (64, 32)] * 2, 4)
    m = meta("LoRA", tiny_llama, "causal_lm", r=4, target_modules=["q_proj", "v_proj"])
    assert memory.parameter_memory(m, "fp32", "adamw")[:3] == (4 * (N + t), 4 * t, 8 * t)
    assert memory.parameter_memory(m, "bf16", "adamw")[:3] == (2 * N + 4 * t, 4 * t, 8 * t)
    full = meta("FullFineTuning", tiny_llama, "causal_lm")
    # mixed precision: bf16 weights and grads, fp32 master copy + 2 fp32 moments: 16 bytes per parameter
    assert memory.parameter_memory(full, "bf16", "adamw")[:3] == (2 * N, 2 * N, 12 * N)
    # 8-bit: tensors >= 4096 elements get 1 byte per moment + an fp32 scale per 256 per moment; smaller stay fp32
    sizes = [p.numel() for p in full.parameters()]
    expected = sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes)
    assert memory.parameter_memory(full, "fp32", "adamw_8bit")[2] == expected


def test_qlora_weight_bytes_match_bitsandbytes(tiny_llama):
    """The 4-bit bytes estimated on the meta device equal what bitsandbytes stores (values + constants)."""
    from peftlab.methods import QLoRA

    real = QLoRA(backbone=tiny_llama, task="causal_lm", r=2, target_modules=["q_proj"], compute_dtype="float32").build()
    stored = 0
    for w in {id(p): p for p in real.parameters() if getattr(p, "quant_state", None) is not None}.values():
        qs = w.quant_state
        stored += w.numel() * w.element_size() + qs.absmax.numel() * qs.absmax.element_size() + 4 * qs.code.numel()
        if qs.nested:
            stored += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + 4
    fake = meta("QLoRA", tiny_llama, "causal_lm", r=2, target_modules=["q_proj"])
    quantized = fake.quantized_weights()  # the method's own answer, on the meta device
    assert sum(quantized.values()) == stored
    assert len(quantized) == 2 * 7  # every linear layer of both blocks; not the LM head
    assert sum(real.quantized_weights().values()) == stored  # and on the real, quantized model


def _real_saved_bytes(module, batch) -> int:
    seen, params = {}, {id(p) for p in module.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            seen[id(base)] = base
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(**batch)
    return sum(t.numel() * t.element_size() for t in seen.values())


@pytest.mark.parametrize("fixture, task, method, kw, attention", [
    ("tiny_llama", "causal_lm", "LoRA", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "fused"),
    ("tiny_bert", "classification", "FullFineTuning", {}, "eager"),  # BERT trains with attention dropout
    ("tiny_llama", "causal_lm", "PromptTuning", {"num_virtual_tokens": 3}, "fused"),
])
def test_meta_activation_trace_equals_real_cpu(request, fixture, task, method, kw, attention):
    """What the meta trace counts is exactly what autograd saves in a real CPU forward."""
    import importlib

    backbone = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    cls = getattr(importlib.import_module("peftlab.methods"), method)
    real = cls(backbone=backbone, task=task, num_labels=2 if task == "classification" else None, **kw).build()
    ids = torch.randint(5, 500, (3, 24))
    labels = torch.zeros(3, dtype=torch.long) if task == "classification" else ids
    fake = meta(method, backbone, task, **kw)
    memory._cast_for_training(fake, "fp32")
    trace = memory.trace_activations(fake, memory.meta_batch(task, 3, 24), attention)
    real_bytes = _real_saved_bytes(real, {"input_ids": ids, "labels": labels})
    # peft's virtual-token index is saved as a (N,) tensor on CPU but expanded to (batch, N) on meta
    slack = 8 * 3 * kw["num_virtual_tokens"] if method == "PromptTuning" else 0
    assert 0 <= trace.saved(False) - real_bytes <= slack


def test_gradient_checkpointing_keeps_block_inputs_and_one_block():
    spec = memory.preset_spec("lora", "llama-1b", "causal_lm")
    off = memory.estimate(spec, batch_size=2, seq_len=256, precision="bf16")
    on = memory.estimate(spec, batch_size=2, seq_len=256, precision="bf16", gradient_checkpointing=True)
    assert (on.weights, on.gradients, on.optimizer_states) == (off.weights, off.gradients, off.optimizer_states)
    fake = build_meta(spec)
    memory._cast_for_training(fake, "bf16")
    trace = memory.trace_activations(fake, memory.meta_batch("causal_lm", 2, 256))
    hidden_bf16 = 2 * 256 * 2048 * 2  # each block keeps its input hidden states
    assert trace.layer_inputs >= 22 * hidden_bf16
    assert on.activations == trace.outside + trace.layer_inputs + max(trace.per_layer) + trace.workspace
    assert on.activations < off.activations / 3


def test_estimate_memory_cli_7b(capsys):
    code, out, err = run_main(["estimate-memory", "--size", "7b", "--method", "lora", "--json"], capsys)
    assert code == 0, err
    (est,) = json.loads(out)
    assert est["weights"] == 2 * 6_738_415_616 + 4 * 4_194_304  # bf16 frozen + fp32 adapter
    assert (est["gradients"], est["optimizer_states"]) == (4 * 4_194_304, 8 * 4_194_304)
    assert est["total"] == est["weights"] + est["gradients"] + est["optimizer_states"] + est["activations"]
    code, out, err = run_main(["estimate-memory", "--size", "7b", "--seq_len", "256"], capsys)
    assert code == 0, err
    shipped = ("FullFineTuning", "LoRA", "QLoRA", "PromptTuning", "PTuning", "PrefixTuning", "PTuningV2",
               "BottleneckAdapter", "LoRAPromptTuning")
    for method in shipped:  # every registered method, with its preset (configs/methods/)
        assert f"{method} on 7b" in out
    assert out.index("FullFineTuning on 7b") < out.index("LoRA on 7b") < out.index("LoRAPromptTuning on 7b")
    for line in ("weights", "gradients", "optimizer states", "activations", "total"):  # and any other registered
        assert out.count(f"\n  {line} ") == len(memory.method_names())


def test_estimate_memory_from_a_config(capsys):
    code, out, err = run_main(["estimate-memory", "--config", QS, "--json"], capsys)
    assert code == 0, err
    (est,) = json.loads(out)
    # the config's settings: LoRA, batch 32, max_length 64, 32-true precision, adamw
    assert (est["method"], est["batch_size"], est["seq_len"], est["precision"]) == ("LoRA", 32, 64, "fp32")
    assert est["weights"] == 4 * 22_788_484 and est["gradients"] == 4 * 74_498


def test_full_finetuning_needs_16_bytes_per_parameter():
    """The notes' "~28GB for 7B" is the fp32 weights alone; AdamW training needs 16 bytes per parameter."""
    e = memory.estimate(memory.preset_spec("full", "llama-2-7b", "causal_lm"), batch_size=1, seq_len=64)
    assert e.weights + e.gradients + e.optimizer_states == 16 * 6_738_415_616


# ------------------------------------------------------------------------------------------ recommend
A = recommend.Answers


TABLE = [
    # (answers, rule, method, rank, target scope) -- every branch of both notes' tables
    # notes 000: scenario table
    (A(api_only=True), "api_only", "prompt engineering", None, None),
    (A(frozen_weights=True), "frozen_weights", "PTuningV2", None, None),
    (A(few_shot=True), "few_shot", "PTuningV2", None, None),
    (A(max_quality_min_cost=True), "max_quality_min_cost", "QLoRA", 16, "attention_ffn"),
    (A(num_tasks=30), "hot_swap", "LoRA", 8, "qv"),
    (A(multi_task="hot_swap", task_type="domain"), "hot_swap", "LoRA", 16, "qv"),
    (A(per_layer_control=True), "per_layer", "LoRA", 8, "attention_ffn"),
    # notes 003: decision tree
    (A(latency_critical=True), "latency_critical", "LoRA", 8, "qv"),
    (A(compute_limited=True), "compute_limited", "PromptTuning", None, None),
    (A(task_type="classification"), "simple_task", "LoRA", 4, "qv"),
    (A(multi_task="combine"), "combine_tasks", "BottleneckAdapter", None, None),
    (A(), "default", "LoRA", 8, "qv"),
    # notes 003: task-specific recommendations
    (A(task_type="instruction"), "task_instruction", "LoRA", 8, "qv"),
    (A(task_type="domain"), "task_domain", "LoRA", 16, "qv"),
    (A(task_type="style"), "task_style", "LoRA", 8, "qv"),
    (A(task_type="code"), "task_code", "LoRA", 16, "attention_ffn"),
    # order: hard constraints first
    (A(api_only=True, latency_critical=True), "api_only", "prompt engineering", None, None),
    (A(frozen_weights=True, latency_critical=True), "frozen_weights", "PTuningV2", None, None),
    (A(latency_critical=True, task_type="code"), "latency_critical", "LoRA", 16, "attention_ffn"),
    (A(task_type="classification", multi_task="combine"), "simple_task", "LoRA", 4, "qv"),
]


@pytest.mark.parametrize("answers, rule, method, rank, scope", TABLE, ids=[f"{t[1]}-{i}" for i, t in enumerate(TABLE)])
def test_recommendation_table(answers, rule, method, rank, scope):
    rec = recommend.recommend(answers)
    assert (rec.rule, rec.method) == (rule, method)
    if rank is not None:
        assert (rec.init_args["r"], rec.init_args["alpha"], rec.targets) == (rank, 2 * rank, scope)
    assert rec.reason and any(t in rec.reason for t in ("scenario table", "decision tree", "task table"))
    if rec.class_path:  # the method's own advice, and its preset's settings (configs/methods/)
        from peftlab.analysis.memory import method_class
        from peftlab.methods.base import METHODS

        cls = next(c for c in METHODS.values() if c.__name__ == rec.method)
        assert cls.advice[0] and cls.advice[1]
        preset = method_class(cls.name).preset_args()
        for key in ("learning_rate", "warmup_ratio", "num_virtual_tokens", "bottleneck"):
            if key in preset:
                assert rec.init_args[key] == preset[key], key


@pytest.mark.parametrize("flags, fixture, expect", [
    (["--task_type", "code"], "tiny_llama",
     {"class_path": "peftlab.methods.LoRA", "r": 16,
      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}),
    (["--multi_task", "combine"], "tiny_bert", {"class_path": "peftlab.methods.BottleneckAdapter",
                                                "target_modules": None, "dropout": 0.0}),
    (["--few_shot"], "tiny_bert", {"class_path": "peftlab.methods.PTuningV2", "num_virtual_tokens": 20}),
    (["--task_type", "classification"], "tiny_llama", {"class_path": "peftlab.methods.LoRA", "r": 4,
                                                       "target_modules": ["q_proj", "v_proj"]}),
    (["--max_quality_min_cost"], "tiny_llama", {"class_path": "peftlab.methods.QLoRA", "r": 16, "quant_type": "nf4",
                                                "gradient_checkpointing": True, "optimizer": "paged_adamw_32bit"}),
])
def test_recommend_writes_a_config_fit_accepts(request, tmp_path, capsys, flags, fixture, expect):
    backbone = request.getfixturevalue(fixture)
    out_file = tmp_path / "rec.yaml"
    code, out, err = run_main(["recommend", *flags, "--backbone", backbone, "--output", str(out_file)], capsys)
    assert code == 0, err
    for key in ("recommended", "why", "trainable", "underfitting", "overfitting", "config"):
        assert f"\n{key}" in "\n" + out
    code, printed, err = run_main(["fit", "--config", QS, "--config", str(out_file),
                                   "--print_config"], capsys)
    assert code == 0, err
    model = yaml.safe_load(printed)["model"]
    assert model["class_path"] == expect.pop("class_path")
    assert model["init_args"]["backbone"] == backbone
    for key, value in expect.items():  # nothing inherited from the base config's LoRA section
        assert model["init_args"][key] == value, key
    if "task_type" in flags and "code" in flags:
        assert yaml.safe_load(printed)["data"]["task"] == "causal_lm"


def test_recommend_api_only_writes_nothing_and_protects_files(tmp_path, tiny_bert, capsys):
    target = tmp_path / "rec.yaml"
    code, out, _ = run_main(["recommend", "--api_only", "--output", str(target)], capsys)
    assert code == 0 and "prompt engineering" in out and not target.exists()
    target.write_text("my own notes\n")
    code, _, err = run_main(["recommend", "--backbone", tiny_bert, "--output", str(target)], capsys)
    assert code == 2 and "was not written by peftlab recommend" in err
    assert target.read_text() == "my own notes\n"
    code, _, err = run_main(["recommend", "--backbone", tiny_bert, "--output", str(target), "--force"], capsys)
    assert code == 0, err
    code, _, err = run_main(["recommend", "--backbone", tiny_bert, "--output", str(target)], capsys)
    assert code == 0, err  # its own file may be replaced


def test_recommend_generative_task_needs_a_generative_backbone(tiny_bert, tmp_path, capsys):
    code, _, err = run_main(["recommend", "--task_type", "instruction", "--backbone", tiny_bert,
                             "--output", str(tmp_path / "r.yaml")], capsys)
    assert code == 2 and "needs a generative backbone" in err and err.count("\n") == 1


def test_recommend_asks_missing_answers_on_a_terminal(monkeypatch, tmp_path, tiny_bert, capsys):
    class Terminal:
        @staticmethod
        def isatty() -> bool:
            return True

    # asked in order: api_only, frozen_weights, latency_critical, few_shot, max_quality_min_cost,
    # per_layer_control (compute_limited is given as a flag), then task type and number of tasks
    replies = iter(["n", "", "y", "n", "n", "no", "classification", "1"])
    asked = []
    monkeypatch.setattr(recommend.sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or next(replies))
    code, out, err = run_main(["recommend", "--no-compute_limited", "--backbone", tiny_bert,
                               "--output", str(tmp_path / "r.yaml")], capsys)
    assert code == 0, err
    assert len(asked) == 8 and not any("compute" in q for q in asked)
    assert "recommended  LoRA r=4, alpha=8" in out and "latency" in out


def test_recommended_ptuning_v2_rates_are_the_shipped_configs():
    # recommend reads the rates measured on MiniLM (docs/methods.md "Learning rates") from the preset itself
    rec = recommend.recommend(A(few_shot=True))
    shipped = yaml.safe_load((ROOT / "configs/methods/p_tuning_v2.yaml").read_text())["model"]["init_args"]
    for key in ("learning_rate", "head_learning_rate", "num_virtual_tokens", "prefix_hidden_size"):
        assert rec.init_args[key] == shipped[key], key


def test_estimate_memory_bottleneck_sets_the_adapter_width(capsys):
    """--bottleneck scales the adapter presets (the knob BottleneckAdapter declares in scaled_knobs): Houlsby
    adapters on a 1b shape, 22 layers x 2 adapters x (2 x 2048 x b + b + 2048) parameters."""
    def trainable(*extra):
        code, out, err = run_main(["estimate-memory", "--size", "1b", "--method", "adapters", "--json", *extra], capsys)
        assert code == 0, err
        rows = json.loads(out)
        return (rows[0] if isinstance(rows, list) else rows)["trainable"]

    assert trainable("--bottleneck", "16") == 22 * 2 * (2 * 2048 * 16 + 16 + 2048)
    assert trainable() != trainable("--bottleneck", "16")
