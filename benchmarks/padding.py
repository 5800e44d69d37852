"""Padding efficiency (item 3): the fraction of padded tokens in one training epoch of the real data.

* ``default``: peftlab's training loader (random shuffle, each batch padded to its longest example);
  the batches are the loader's own ``batch_sampler`` with the shuffle seed pinned.
* ``length_grouped``: transformers' ``LengthGroupedSampler`` (what ``TrainingArguments(group_by_length=True)``
  uses: random mega-batches of 50 batches, sorted by length inside), same batch size.
* ``sorted``: every example sorted by length, then batched (the lower bound; no randomness left).

The fraction follows from the tokenized lengths, so it is exact, not sampled. For the MiniLM data the effect
on training speed is also measured: the hand-written LoRA loop of benchmarks/throughput.py on the same
number of batches drawn (seeded) from each batching, interleaved, samples/s compared.
"""

from __future__ import annotations

import torch

from benchmarks.common import SEED, log
from benchmarks.throughput import CLM, CLS, datamodule

PLOTS = dict(backbone="packaged:SmolLM2-135M-Instruct",
             data=dict(source="packaged:rotten_tomatoes_plots", task="causal_lm", prompt_template="{text}",
                       response_template="", loss_on="all", max_length=256, batch_size=8, split_seed=42))
DATASETS = {
    "rotten_tomatoes / all-MiniLM-L6-v2 (classification, max_length 64, batch 32)": CLS,
    "rotten_tomatoes / SmolLM2 (causal LM prompt, max_length 96, batch 8)": CLM,
    "rotten_tomatoes_plots / SmolLM2 (causal LM, max_length 256, batch 8)": PLOTS,
}


def padded_fraction(lengths: list[int], batches: list[list[int]]) -> dict:
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return {"pad_fraction": 1 - real / computed, "computed_tokens": computed, "real_tokens": real,
            "batches": len(batches)}


def measured_speedup(setting: dict, dm, orders: dict, steps: int, repeats: int) -> dict:
    """Training samples/s of the hand-written LoRA loop on ``steps`` batches drawn (seeded) from each batching,
    interleaved; the ratio to default is what padding costs in time, not just in token positions."""
    import random
    import time

    import torch

    from benchmarks.common import ratio_summary, summary
    from benchmarks.throughput import lora_config, reference_model

    rng = random.Random(SEED)
    ds = dm.datasets["train"]
    chosen = {name: rng.sample(batches, steps + 1) for name, batches in orders.items()}
    collated = {name: [dm.collate([ds[i] for i in b]) for b in bs] for name, bs in chosen.items()}
    torch.manual_seed(SEED)
    model = reference_model(setting, lora_config(setting)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setting["lr"])
    rates = {name: [] for name in orders}
    for _ in range(repeats):
        for name, batches in collated.items():
            ends = []
            for batch in batches:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
                ends.append(time.perf_counter())
            rates[name].append(sum(len(b["input_ids"]) for b in batches[1:]) / (ends[-1] - ends[0]))
    return {"steps": steps, "repeats": repeats, "samples_per_s": {n: summary(r) for n, r in rates.items()},
            "speedup": {n: ratio_summary(r, rates["default"]) for n, r in rates.items()}}


def bench_padding(smoke: bool) -> dict:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    out = {}
    for name, setting in DATASETS.items():
        if smoke and setting is not CLS:
            continue
        log(f"padding: {name}")
        dm = datamodule(setting)
        lengths = [len(x) for x in dm.datasets["train"]["input_ids"]]
        bs = dm.batch_size
        loader = dm.train_dataloader()
        loader.sampler.replay(SEED)
        default = [list(b) for b in loader.batch_sampler]
        grouped_order = list(LengthGroupedSampler(bs, lengths=lengths, generator=torch.Generator().manual_seed(SEED)))
        grouped = [grouped_order[i:i + bs] for i in range(0, len(grouped_order), bs)]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        by_length = [order[i:i + bs] for i in range(0, len(order), bs)]
        rows = {"default": padded_fraction(lengths, default), "length_grouped": padded_fraction(lengths, grouped),
                "sorted": padded_fraction(lengths, by_length)}
        for row in rows.values():
            row["compute_vs_default"] = row["computed_tokens"] / rows["default"]["computed_tokens"]
        out[name] = {"examples": len(lengths), "batch_size": bs, "max_length": dm.max_length,
                     "mean_length": sum(lengths) / len(lengths), "max_seen": max(lengths), **rows}
        if setting is CLS:
            log("  measuring the training speed-up of length-grouped batches (hand-written LoRA loop)")
            out[name]["measured"] = measured_speedup(setting, dm, {"default": default, "length_grouped": grouped},
                                                     steps=2 if smoke else 16, repeats=1 if smoke else 3)
            log(f"  length-grouped / default samples/s: "
                f"{out[name]['measured']['speedup']['length_grouped']['median']:.2f}x")
        log(f"  pad fraction default {rows['default']['pad_fraction']:.3f}, length-grouped "
            f"{rows['length_grouped']['pad_fraction']:.3f}, sorted {rows['sorted']['pad_fraction']:.3f}")
    return out
