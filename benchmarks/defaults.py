"""Do peftlab's defaults do the efficient thing? Three ratios, each measured side by side in one process.

    python benchmarks/defaults.py                 # everything (about 30 min on 2 idle CPU cores)
    python benchmarks/defaults.py --only packing  # one part
    python benchmarks/defaults.py --only packing --packing_max_length 256  # packing at another length (packing_256)
    python benchmarks/defaults.py --smoke         # a few steps each (CI: tests/integration/test_benchmarks.py)

1. ``defaults``: the quickstart (MiniLM, LoRA, batch 32) with peftlab's defaults (length-grouped batches) against
   what a user writes first, a hand-written loop over random batches of the same size, and against the HF
   Trainer with its defaults (random batches): samples/s, goal >= 1.5x each. And against the HF Trainer fed the
   same length-grouped batches (what ``TrainingArguments(group_by_length=True)`` does: the fair comparison of the
   loops alone): goal >= 0.97x. Equal test accuracy comes from ``benchmarks/group_by_length_quality.py`` (the
   quickstart on 3 seeds, grouped and not), reported beside it.
2. ``packing``: SmolLM2-135M as a causal LM on ``packaged:rotten_tomatoes_plots`` (every token a target), packed
   rows (``data.packing``) against padded random batches of the same batch size: target tokens/s, goal >= 1.8x, and
   the validation loss per token after the same number of target tokens trained, which must be equal (within the
   noise of the run).
3. ``compile``: ``torch.compile`` of the quickstart's model against eager, on the same batches: the loss after the
   same steps (must be equal) and the steady-state step time. peftlab ships a ``model.compile`` option only if it
   is correct and faster here; the result says which.

Repeats are interleaved (A B A B ...) and the median of the per-repeat ratios is reported with its spread.
Writes ``benchmarks/defaults.json`` (``_smoke.json`` with ``--smoke``) with the command, machine and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import SEED, log, machine, ratio_summary, summary  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    CLS,
    datamodule,
    lora_config,
    peftlab_module,
    reference_model,
    run_hand,
    run_hf_trainer,
    run_peftlab,
)

PLOTS = dict(backbone="packaged:SmolLM2-135M-Instruct", task="causal_lm", lr=3e-4,
             data=dict(source="packaged:rotten_tomatoes_plots", task="causal_lm", prompt_template="{text}",
                       response_template="", loss_on="all", max_length=128, batch_size=8, split_seed=42),
             lora=dict(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]))


# ---------------------------------------------------------------------------------------------- 1. defaults
def bench_defaults(smoke: bool) -> dict:
    b = {"warmup": 1, "steps": 2, "repeats": 1} if smoke else {"warmup": 2, "steps": 15, "repeats": 5}
    overrides = {"max_length": 32, "batch_size": 8} if smoke else {}
    log("defaults: building models and data")
    grouped = datamodule(CLS, group_by_length=True, **overrides)  # peftlab's default
    plain = datamodule(CLS, group_by_length=False, **overrides)  # random batches: a hand-written loader, HF's default
    module = peftlab_module(CLS)
    hand = reference_model(CLS, lora_config(CLS))
    hf = reference_model(CLS, lora_config(CLS))
    hf_grouped = reference_model(CLS, lora_config(CLS))
    variants = {
        "peftlab": lambda w, n: run_peftlab(module, grouped, w, n),
        "hand_random": lambda w, n: run_hand(hand, plain, CLS["lr"], w, n),
        "hf_trainer_default": lambda w, n: run_hf_trainer(hf, plain, CLS["lr"], w, n),
        "hf_trainer_grouped": lambda w, n: run_hf_trainer(hf_grouped, grouped, CLS["lr"], w, n),
    }
    runs = {name: [] for name in variants}
    if not smoke:  # a discarded round: the first training run in a process is slower, whichever it is
        for fn in variants.values():
            fn(1, 2)
    for i in range(b["repeats"]):
        for name, fn in variants.items():
            result = fn(b["warmup"], b["steps"])
            runs[name].append(result)
            log(f"  repeat {i + 1}/{b['repeats']} {name}: {result['samples_per_s']:.1f} samples/s, "
                f"{result['padded_tokens_per_s']:.0f} padded tokens/s")
    out = {"budget": b, "variants": {n: {k: summary([r[k] for r in rs]) for k in ("samples_per_s", "step_ms")}
                                     for n, rs in runs.items()}, "ratios": {}}
    for ref in ("hand_random", "hf_trainer_default", "hf_trainer_grouped"):
        out["ratios"][f"peftlab/{ref}"] = ratio_summary([r["samples_per_s"] for r in runs["peftlab"]],
                                                        [r["samples_per_s"] for r in runs[ref]])
    padding = {}
    for name, _dm in (("grouped", grouped), ("random", plain)):  # padded share of the batches in the windows
        rs = runs["peftlab" if name == "grouped" else "hand_random"]
        padding[name] = 1 - sum(r["tokens"] for r in rs) / sum(r["padded_tokens_per_s"] * r["seconds"] for r in rs)
    out["padding"] = padding
    quality = ROOT / "benchmarks/group_by_length_quality.json"
    if quality.is_file():
        out["quality"] = json.loads(quality.read_text())["settings"]
    return out


# ---------------------------------------------------------------------------------------------- 2. packing
def _target_tokens(batch) -> int:
    labels = batch["labels"][:, 1:]
    return int((labels != -100).sum())


def _train_lm(module, batches: list[dict], warmup: int) -> dict:
    """A plain loop over ``batches`` with peftlab's token-exact loss (what training_step computes); steady-state
    target tokens/s after ``warmup`` steps."""
    from peftlab.methods.base import token_nll

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=PLOTS["lr"], weight_decay=0.0)
    module.model.train()
    start, tokens = None, 0
    for i, batch in enumerate(batches):
        if i == warmup:
            start, tokens = time.perf_counter(), 0
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        nll, count = token_nll(module.model(**inputs, use_cache=False).logits, batch["labels"], "causal_lm")
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += _target_tokens(batch)
    seconds = time.perf_counter() - start
    return {"target_tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens}


def _validation_loss(module, dm) -> float:
    from peftlab.methods.base import token_nll

    module.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            nll, n = token_nll(module.model(**inputs, use_cache=False).logits, batch["labels"], "causal_lm")
            total, count = total + float(nll), count + int(n)
    return total / count


def bench_packing(smoke: bool, max_length: int = 128) -> dict:
    from benchmarks.throughput import peftlab_module as build

    b = {"warmup": 1, "steps": 2, "repeats": 1} if smoke else {"warmup": 2, "steps": 24, "repeats": 3}
    # smoke keeps max_length 128: at 32 tokens every plot summary fills a row and nothing packs
    overrides = dict(batch_size=4, max_train_samples=64, max_eval_samples=16) if smoke else \
        dict(max_eval_samples=64, max_length=max_length)
    log("packing: building data (padded random batches vs packed rows)")
    padded = datamodule(PLOTS, group_by_length=False, **overrides)
    packed = datamodule(PLOTS, group_by_length=False, packing=True, **overrides)
    rows = {"padded_examples_per_row": 1.0,
            "packed_examples_per_row": len(padded.datasets["train"]) / len(packed.datasets["train"])}
    results = {"padded": [], "packed": []}
    for i in range(b["repeats"]):
        for name, dm in (("padded", padded), ("packed", packed)):
            torch.manual_seed(SEED + i)
            loader = dm.train_dataloader()
            batches = [batch for _, batch in zip(range(b["warmup"] + b["steps"]), loader)]
            module = build(PLOTS)
            run = _train_lm(module, batches, b["warmup"])
            run["val_loss_per_token"] = _validation_loss(module, padded)  # the same unpacked validation split
            results[name].append(run)
            log(f"  repeat {i + 1}/{b['repeats']} {name}: {run['target_tokens_per_s']:.0f} target tokens/s, "
                f"validation loss {run['val_loss_per_token']:.4f} after {run['tokens']} target tokens")
            del module
    return {"budget": b, "max_length": overrides.get("max_length", PLOTS["data"]["max_length"]), **rows,
            "ratio_target_tokens_per_s": ratio_summary([r["target_tokens_per_s"] for r in results["packed"]],
                                                       [r["target_tokens_per_s"] for r in results["padded"]]),
            "runs": results,
            "note": "the same number of optimizer steps: packed steps carry more target tokens, so its validation "
                    "loss after them is lower or equal; equal quality per token is what the token-exact loss and "
                    "tests/unit/test_token_loss.py guarantee (packed loss and gradients = unpacked, 1e-5)"}


# ---------------------------------------------------------------------------------------------- 3. compile
def bench_compile(smoke: bool) -> dict:
    from peftlab.methods.base import PeftModule

    steps, warmup = (3, 1) if smoke else (20, 5)
    overrides = {"max_length": 32, "batch_size": 8} if smoke else {}
    dm = datamodule(CLS, group_by_length=False, shuffle=False, **overrides)
    batches = [batch for _, batch in zip(range(steps), dm.train_dataloader())]
    out = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(SEED)
        module = peftlab_module(CLS, dropout=0.0)
        module.model.eval()  # dropout off: compiled and eager kernels draw random numbers differently
        model = torch.compile(module.model) if name == "compiled" else module.model
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=CLS["lr"])
        times, losses = [], []
        compile_start = time.perf_counter()
        for _, batch in enumerate(batches):
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
        out[name] = {"step_ms": 1000 * statistics.median(times[warmup:]), "first_step_s": times[0],
                     "losses": losses, "total_s": time.perf_counter() - compile_start}
        log(f"  {name}: {out[name]['step_ms']:.0f} ms/step (first step {times[0]:.1f} s), last loss {losses[-1]:.5f}")
        assert isinstance(module, PeftModule)
    out["max_loss_difference"] = max(abs(a - b) for a, b in zip(out["eager"]["losses"], out["compiled"]["losses"]))
    out["speedup"] = out["eager"]["step_ms"] / out["compiled"]["step_ms"]
    out["ship"] = out["max_loss_difference"] < 1e-4 and out["speedup"] > 1.05
    return out


PARTS = {"defaults": bench_defaults, "packing": bench_packing, "compile": bench_compile}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: robust to other load)")
    parser.add_argument("--packing_max_length", type=int, default=128,
                        help="max_length of the packing part (other than 128: recorded as packing_<N>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = ROOT / ("benchmarks/defaults_smoke.json" if args.smoke else "benchmarks/defaults.json")
    record = json.loads(path.read_text()) if path.is_file() and not args.smoke else {}
    record.update(command="python benchmarks/defaults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  machine=machine(), measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for part in args.only:
        log(f"== {part}")
        key = part
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            if part == "packing" and args.packing_max_length != 128:
                key = f"packing_{args.packing_max_length}"
                record[key] = bench_packing(args.smoke, args.packing_max_length)
            else:
                record[part] = PARTS[part](args.smoke)
        record.setdefault("commands", {})[key] = f"{record['command']} ({record['measured']})"
        path.write_text(json.dumps(record, indent=2, default=str))
    return record


if __name__ == "__main__":
    main()
