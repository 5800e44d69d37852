"""Inference (item 4): forward latency of each method as a ratio to the bare backbone, same process.

Variants: ``base`` (the backbone, no adapter), ``lora_merged`` (peftlab.merge.merged_model: LoRA folded
into the weights, a plain transformers model), ``lora_unmerged`` (the peft model with the adapter on the
side path), ``prefix`` (20 K/V prefix tokens per layer) and ``prompt`` (20 soft-prompt tokens). LoRA's B is
set non-zero so nothing is skipped. Rounds are interleaved (base, merged, unmerged, prefix, prompt, base,
...) under ``torch.inference_mode``; the ratio of a variant is the median over rounds of its latency divided
by base's latency in the same round.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import SEED, log, ratio_summary, summary

BACKBONES = {
    "all-MiniLM-L6-v2 (batch 8 x 64 tokens)": ("packaged:all-MiniLM-L6-v2", "classification", ["query", "value"], 8, 64),
    "SmolLM2-135M (batch 1 x 128 tokens)": ("packaged:SmolLM2-135M-Instruct", "causal_lm", ["q_proj", "v_proj"], 1, 128),
}


def variants(backbone: str, task: str, targets: list[str]) -> dict:
    from peftlab.backbones import load_backbone
    from peftlab.merge import merged_model
    from peftlab.methods import LoRA, PrefixTuning, PromptTuning

    common = dict(backbone=backbone, task=task, num_labels=2 if task == "classification" else None)
    torch.manual_seed(SEED)
    lora = LoRA(r=8, alpha=16, target_modules=targets, **common).build()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    torch.manual_seed(SEED)  # the same random head for base and the merged model
    base = load_backbone(backbone, task, num_labels=common["num_labels"])
    if task == "classification":
        head = {k.split("modules_to_save.default.")[-1]: v for k, v in lora.model.state_dict().items()
                if "modules_to_save.default." in k}
        base.classifier.load_state_dict({k.split("classifier.")[-1]: v for k, v in head.items()})
    return {"base": base, "lora_merged": merged_model(lora), "lora_unmerged": lora.model,
            "prefix": PrefixTuning(num_virtual_tokens=20, **common).build().model,
            "prompt": PromptTuning(num_virtual_tokens=20, **common).build().model}


def bench_inference(smoke: bool) -> dict:
    out = {}
    rounds = 3 if smoke else 40
    for label, (backbone, task, targets, batch, length) in BACKBONES.items():
        if smoke and task != "classification":
            continue
        if smoke:
            batch, length = 2, 16
        log(f"inference {label}: building variants")
        models = variants(backbone, task, targets)
        g = torch.Generator().manual_seed(SEED)
        ids = torch.randint(5, models["base"].config.vocab_size - 1, (batch, length), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        times = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():
                model.eval()
                for _ in range(2):
                    model(**inputs)
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(**inputs)
                    times[name].append(time.perf_counter() - start)
        row = {"batch": batch, "length": length, "rounds": rounds, "latency_ms": {}, "ratio": {}}
        for name, ts in times.items():
            row["latency_ms"][name] = summary([1000 * t for t in ts])
            row["ratio"][name] = ratio_summary(ts, times["base"])
        out[label] = row
        log("  " + ", ".join(f"{n} {r['median']:.3f}x" for n, r in row["ratio"].items()))
        del models
    return out
