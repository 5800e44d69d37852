"""Inference overhead of each method, as latency ratios to the bare backbone measured in the same process.

    python experiments/inference_overhead/run.py           # CPU default (~5 min)
    python experiments/inference_overhead/run.py --smoke   # 2 repetitions, short inputs only (CI)

Variants: base, prompt tuning (20 tokens), prefix tuning (20), P-tuning v2 (20), bottleneck adapters
(b=64), LoRA r=8 unmerged, LoRA merged, QLoRA (NF4). Forward passes of all-MiniLM-L6-v2 (batch 8) and
SmolLM2-135M (batch 1) on short (16 tokens) and long (256 tokens) inputs. Measurements are interleaved
(round-robin over variants) so machine drift hits every variant alike; median and interquartile range of
the repetitions are reported. Writes docs/results/inference_overhead.md and inference_overhead.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import logger, machine, publish, save_figure, save_json  # noqa: E402

BACKBONES = {
    "all-MiniLM-L6-v2": ("packaged:all-MiniLM-L6-v2", "classification", 8, ["query", "value"]),
    "SmolLM2-135M": ("packaged:SmolLM2-135M-Instruct", "causal_lm", 1, ["q_proj", "v_proj"]),
}


def variants(backbone: str, task: str, targets: list[str]):
    """(name, zero-argument callable running one forward) for every method, built lazily."""
    from peftlab.merge import merged_model
    from peftlab.methods import BottleneckAdapter, FullFineTuning, LoRA, PrefixTuning, PromptTuning, PTuningV2, QLoRA

    common = dict(backbone=backbone, task=task, num_labels=2 if task == "classification" else None)
    lora = LoRA(r=8, target_modules=targets, **common).build()
    with torch.no_grad():  # a trained-looking LoRA: B != 0, so nothing is skipped
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return {
        "base": FullFineTuning(**common).build().model,
        "prompt": PromptTuning(num_virtual_tokens=20, **common).build(),
        "prefix": PrefixTuning(num_virtual_tokens=20, **common).build(),
        "p-tuning v2": PTuningV2(num_virtual_tokens=20, prefix_hidden_size=256, **common).build(),
        "adapters": BottleneckAdapter(bottleneck=64, **common).build(),
        "lora (unmerged)": lora,
        "lora (merged)": merged_model(lora),
        "qlora": QLoRA(r=8, target_modules=targets, compute_dtype="float32", optimizer="adamw", **common).build(),
    }


def batch(vocab: int, batch_size: int, length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (batch_size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def measure(models: dict, inputs: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(**inputs)
        for _ in range(reps):  # round-robin: drift affects every variant alike
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    return times


def run(smoke: bool) -> list[dict]:
    log = logger("inference_overhead")
    torch.manual_seed(0)
    rows = []
    lengths = [16] if smoke else [16, 256]
    reps = 2 if smoke else 15
    for label, (backbone, task, batch_size, targets) in BACKBONES.items():
        if smoke and label != "all-MiniLM-L6-v2":
            continue
        log(f"building variants on {label}")
        models = variants(backbone, task, targets)
        vocab = models["base"].config.vocab_size
        for length in lengths:
            log(f"  {label}: batch {batch_size} x {length} tokens, {reps} interleaved repetitions")
            times = measure(models, batch(vocab, batch_size, length), reps)
            base = statistics.median(times["base"])
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), 0, max(ts)]
                rows.append({"backbone": label, "length": length, "batch": batch_size, "variant": name,
                             "median_ms": 1000 * statistics.median(ts), "iqr_ms": 1000 * (q[2] - q[0]),
                             "ratio": statistics.median(ts) / base})
    return rows


def report(rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Inference overhead", "",
             f"Machine: {machine()}. Command: `python experiments/inference_overhead/run.py`.",
             "Forward latency (median over interleaved repetitions, interquartile range in brackets) and the ratio "
             "to the bare backbone measured in the same process. Throughput is the inverse of the latency at the "
             "stated batch size.", ""]
    groups = sorted({(r["backbone"], r["length"], r["batch"]) for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lines += ["| variant | " + " | ".join(f"{b}, {n} tokens x{bs}" for b, n, bs in groups) + " |",
              "|---|" + "---:|" * len(groups)]
    for name in names:
        cells = []
        for g in groups:
            r = next(x for x in rows if (x["backbone"], x["length"], x["batch"]) == g and x["variant"] == name)
            cells.append(f"{r['ratio']:.2f}x ({r['median_ms']:.1f} ms [{r['iqr_ms']:.1f}])")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        ratios = [next(x["ratio"] for x in rows if (x["backbone"], x["length"], x["batch"]) == g and x["variant"] == n)
                  for n in names]
        ax.bar([j + i * width for j in range(len(names))], ratios, width, label=f"{g[0]}, {g[1]} tok")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(names))], names, rotation=25, fontsize=8)
    ax.set_ylabel("latency / base latency")
    ax.legend(fontsize=7)
    lines += ["", save_figure(fig, "inference_overhead", "inference overhead"), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    path = HERE / f"results{'_smoke' if args.smoke else ''}.json"
    if not args.report:
        save_json(path, run(args.smoke))
    if args.smoke:
        return
    import json

    text = report(json.loads(path.read_text()))
    publish("inference_overhead", text)


if __name__ == "__main__":
    main()
