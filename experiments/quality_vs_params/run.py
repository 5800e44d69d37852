"""Quality vs trainable parameters for every method, on real data, through `peftlab fit`.

    python experiments/quality_vs_params/run.py              # part (a), CPU default: 3 seeds, < 1 h on 2 cores
    python experiments/quality_vs_params/run.py --part head  # part (a'): (a) with the head at 1e-2, < 1 h
    python experiments/quality_vs_params/run.py --part gen   # part (b): SmolLM2-135M, 1 seed, < 1 h on 2 cores
    python experiments/quality_vs_params/run.py --part gen --seeds 1   # + seed 1, as in the committed results
    python experiments/quality_vs_params/run.py --smoke      # a few steps per method (CI)
    python experiments/quality_vs_params/run.py --full       # the complete version (GPU): all data, 3 epochs
    python experiments/quality_vs_params/run.py --report     # rewrite the report from saved results

(a) classification: Rotten Tomatoes fresh vs rotten on all-MiniLM-L6-v2, test accuracy;
(a') the methods of (a) whose own rate is below 1e-2, with the new classification head trained at 1e-2
    (model.head_learning_rate): at their own rate the head barely moves in 250 steps;
(b) generation: the same reviews phrased as "... Answer: fresh/rotten" on SmolLM2-135M, test loss on the
    answer tokens and exact_match (greedy decoding returns the right answer and stops);
(c) the LoRA variants and two stacks moved to a study file of `peftlab compare`, each method with its own tuned
    rates: experiments/quality_vs_params/study_variants.yaml (docs/results/quality_vs_params_variants.md).
Writes docs/results/quality_vs_params.md and quality_vs_params.png; raw results in results_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402
    HEAD_LR,
    cls_learning_rate,
    fail_on_failed_runs,
    head_learning_rate,
    logger,
    machine,
    mean_std,
    publish,
    run_fit,
    save_figure,
    save_json,
)

M = "configs/methods"
# name -> (method config, overrides)
CLS_METHODS = {
    "full": ("configs/full_finetune.yaml", []),
    "prompt": (f"{M}/prompt_tuning.yaml", []),
    "p-tuning": (f"{M}/p_tuning.yaml", []),
    "prefix": (f"{M}/prefix_tuning.yaml", []),
    "prefix+mlp": (f"{M}/prefix_tuning_projection.yaml", []),
    "p-tuning v2": (f"{M}/p_tuning_v2.yaml", []),
    "lora r=4": (f"{M}/lora.yaml", ["--model.init_args.r", "4", "--model.init_args.alpha", "8"]),
    "lora r=8": (f"{M}/lora.yaml", []),
    "lora r=16": (f"{M}/lora.yaml", ["--model.init_args.r", "16", "--model.init_args.alpha", "32"]),
    "qlora r=8": (f"{M}/qlora.yaml", []),
    "adapters b=64": (f"{M}/adapters.yaml", []),
    "lora+prompt": (f"{M}/lora_prompt.yaml", []),
}
# part (a'): the classification head at its own rate, common.HEAD_LR. MiniLM's pooled features are ~0.05 in size,
# so a new head trained at the method's rate (3e-4 for prefix + MLP and P-tuning v2) gives logits that hardly depend
# on the input after 250 steps; the methods with rates >= 1e-2 (prompt, P-tuning, prefix) already train it that fast.
# their own rates stay those of part (a) (common.CLS_LR): with the head at HEAD_LR, 1e-3 still leaves prefix + MLP
# and P-tuning v2 at the majority class (`lr_pilot.sh head`, head_lr_pilot.txt); LoRA r=4/16 and QLoRA left out
# for time (LoRA r=8 stands for them)
HEAD_METHODS = {name: CLS_METHODS[name] for name in
                ["full", "prefix+mlp", "p-tuning v2", "lora r=8", "adapters b=64", "lora+prompt"]}
GEN_METHODS = {  # learning rates not tuned (part (a) was): the configs' values
    "full": ["--model", "peftlab.methods.FullFineTuning", "--model.init_args.learning_rate", "2e-5"],
    "prompt": ["--model", "peftlab.methods.PromptTuning", "--model.init_args.learning_rate", "3e-3"],
    "p-tuning": ["--model", "peftlab.methods.PTuning", "--model.init_args.learning_rate", "3e-3"],
    "prefix": ["--model", "peftlab.methods.PrefixTuning", "--model.init_args.learning_rate", "5e-3"],
    "prefix+mlp": ["--model", "peftlab.methods.PrefixTuning", "--model.init_args.prefix_projection", "true",
                   "--model.init_args.learning_rate", "1e-3"],
    "p-tuning v2": ["--model", "peftlab.methods.PTuningV2", "--model.init_args.prefix_hidden_size", "256",
                    "--model.init_args.learning_rate", "1e-3"],
    "lora r=4": ["--model.init_args.r", "4", "--model.init_args.alpha", "8"],
    "lora r=8": [],
    "lora r=16": ["--model.init_args.r", "16", "--model.init_args.alpha", "32"],
    "qlora r=8": ["--model", "peftlab.methods.QLoRA", "--model.init_args.target_modules", "[q_proj,v_proj]"],
    "adapters b=64": ["--model", "peftlab.methods.BottleneckAdapter", "--model.init_args.learning_rate", "1e-3"],
    "lora+prompt": ["--model", "peftlab.methods.LoRAPromptTuning", "--model.init_args.prompt_learning_rate", "3e-3"],
}

# metrics[0] is plotted; gen: exact_match = greedy decoding returns the right verdict (" fresh"/" rotten" + EOS)
PARTS = {
    "cls": {"title": "(a) sentiment classification, all-MiniLM-L6-v2", "metrics": ["test/acc"]},
    "head": {"title": f"(a') the same, classification head at {HEAD_LR:g}", "metrics": ["test/acc"]},
    "gen": {"title": "(b) generative sentiment, SmolLM2-135M-Instruct",
            "metrics": ["test/exact_match", "test/loss"]},
}


def settings(part: str, mode: str) -> tuple[list[int], list[str]]:
    """Seeds and overrides of the budget: smoke (CI), default (2-core CPU, < 1 h), full (GPU)."""
    if part in ("cls", "head"):
        # batch 16 and the learning rates of common.CLS_LR; the CPU budget is 250 steps on 4,000 reviews, in
        # length-grouped batches (1.76x faster, docs/benchmarks.md), tested on all 1,281 test reviews
        base = ["--config", "configs/quickstart.yaml", "--data.batch_size", "16"]
        budget = {"smoke": ["--trainer.max_steps", "2", "--data.max_train_samples", "64", "--data.max_eval_samples", "32"],
                  "default": ["--trainer.max_epochs", "1", "--data.max_train_samples", "4000",
                              "--data.group_by_length", "true"],
                  "full": ["--trainer.max_epochs", "3"]}[mode]
    else:
        base = ["--config", "configs/causal_lm_lora.yaml"]
        budget = {"smoke": ["--trainer.max_steps", "2", "--data.max_train_samples", "16", "--data.max_eval_samples", "8"],
                  "default": ["--data.max_train_samples", "400", "--data.max_eval_samples", "160",
                              "--trainer.val_check_interval", "1.0"],
                  "full": ["--data.max_train_samples", "null", "--trainer.max_epochs", "2"]}[mode]
    # 3 seeds of part (a) fit in the hour on a 2-core CPU; part (b) has one
    seeds = {"smoke": [0], "default": [0] if part == "gen" else [0, 1, 2], "full": [0, 1, 2]}[mode]
    return seeds, base + budget


def run(part: str, mode: str, only: list[str] | None, path: Path, seeds: list[int] | None = None) -> list[dict]:
    log = logger(f"quality_vs_params/{part}")
    default_seeds, common = settings(part, mode)
    seeds = seeds or default_seeds
    methods = {"cls": CLS_METHODS, "head": HEAD_METHODS, "gen": GEN_METHODS}[part]
    if mode == "smoke" and not only:  # CI: a representative subset, each kind of method once
        only = {"cls": ["lora r=8", "prompt", "p-tuning v2", "adapters b=64"], "head": ["p-tuning v2"],
                "gen": ["lora r=8", "prefix"]}[part]
    # seed-major order and a save after every run: an interrupted study still covers every method
    todo = [(n, s) for s in seeds for n in methods if not only or n in only]
    # --only / --seeds re-run those methods / seeds and keep the saved results of the others
    kept = json.loads(path.read_text()) if (only or seeds != default_seeds) and path.is_file() else []
    redo = set(todo)
    results = [r for r in kept if (r["label"], r["seed"]) not in redo]
    order = {name: i for i, name in enumerate(methods)}
    for i, (name, seed) in enumerate(todo, 1):
        if part in ("cls", "head"):
            config, extra = methods[name]
            # (a) trains the head at the method's own rate, also where a method config sets a head rate
            head = head_learning_rate(name) if part == "head" else ["--model.init_args.head_learning_rate", "null"]
            args = [*common, "--config", config, *extra, *cls_learning_rate(name), *head]
        else:
            args = [*common, *methods[name]]
        args += ["--seed_everything", str(seed)]
        log(f"[{i}/{len(todo)}] {name} seed {seed}")
        slug = f"{part}-{name.replace(' ', '_').replace('=', '').replace('+', 'p')}-s{seed}"
        r = run_fit("quality_vs_params" + ("_smoke" if mode == "smoke" else ""), slug, args, log)
        r.update(label=name, seed=seed, part=part, mode=mode, machine=machine())
        if "failed" not in r:
            log(f"    {PARTS[part]['metrics'][0]} = {r.get(PARTS[part]['metrics'][0], float('nan')):.4f}, "
                f"trainable {r.get('trainable', 0):,}, {r['seconds']:.0f} s")
        results.append(r)
        results.sort(key=lambda x: (order.get(x["label"], len(order)), x["seed"]))
        save_json(path, results)
    return results


def report(all_results: dict[str, list[dict]], mode: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Quality vs trainable parameters", "",
             f"Machine: {machine()}. Budget: `{mode}` (see `experiments/quality_vs_params/run.py`, `settings()`).",
             "Each row is real `peftlab fit` runs; the command of every run is in "
             "`experiments/quality_vs_params/results_<part>.json`.", ""]
    fig, axes = plt.subplots(1, len(all_results), figsize=(6.5 * len(all_results), 4.5), squeeze=False)
    for ax, (part, results) in zip(axes[0], all_results.items()):
        metrics = PARTS[part]["metrics"]
        seeds = ", ".join(str(x) for x in sorted({r["seed"] for r in results}))
        machines = sorted({r["machine"] for r in results if "machine" in r})  # recorded with each run since (c)
        ran_on = f" Measured on: {'; '.join(machines)}." if machines else ""
        lines += [f"## {PARTS[part]['title']}", "", f"Seeds: {seeds}.{ran_on}", "",
                  "| method | trainable | % | " + " | ".join(f"{m} (mean ± std)" for m in metrics)
                  + " | seeds | train s/epoch |", "|---|---:|---:|" + "---:|" * len(metrics) + "---:|---:|"]
        by_label: dict[str, list[dict]] = {}
        for r in results:
            by_label.setdefault(r["label"], []).append(r)
        points = []
        for label, rs in by_label.items():
            ok = [r for r in rs if "failed" not in r and metrics[0] in r]
            if not ok:
                lines.append(f"| {label} | | |" + " |" * len(metrics) + f" {len(rs)} failed | |")
                continue
            cells = []
            for metric in metrics:
                m, s = mean_std([r[metric] for r in ok])
                cells.append(f"{m:.4f} ± {s:.4f}")
                if metric == metrics[0]:
                    points.append((ok[0]["trainable"], m, s, label))
            t, _ = mean_std([r.get("time/train_epoch_s", float("nan")) for r in ok])
            pct = 100.0 * ok[0]["trainable"] / ok[0]["total"]
            lines.append(f"| {label} | {ok[0]['trainable']:,} | {pct:.3f} | " + " | ".join(cells)
                         + f" | {len(ok)} | {t:.0f} |")
        # always answering the majority class (fresh): 0.578 of the 1,281 test reviews (stratified split);
        # 0.575 of the 160 that part (b)'s default budget tests on (other budgets: not counted)
        majority = {"cls": 0.578, "head": 0.578, "gen": 0.575 if mode == "default" else None}[part]
        if majority is not None:
            lines += ["", f"Always answering the majority class (fresh) scores {majority} on this test set."]
            ax.axhline(majority, color="grey", linestyle=":", label="majority class")
        lines.append("")
        for x, y, e, label in points:
            ax.errorbar([x], [y], yerr=[e], fmt="o", capsize=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(metrics[0])
        ax.set_title(PARTS[part]["title"], fontsize=9)
    lines += ["## (c) LoRA variants and stacks", "",
              "Measured by `peftlab compare --config experiments/quality_vs_params/study_variants.yaml`, every method "
              "at its own tuned learning rates, with 95% intervals: "
              "[quality_vs_params_variants.md](quality_vs_params_variants.md).", ""]
    lines += [save_figure(fig, "quality_vs_params", "quality vs parameters"), ""]
    pilot = HERE / "lr_pilot.txt"
    if "cls" in all_results and pilot.is_file():
        lines += ["## Learning rates of part (a)", "",
                  "Picked per method on seed 0's validation accuracy (first column) at the same budget, from the "
                  "rates below (`experiments/common.py` `CLS_LR`; QLoRA takes LoRA's; LoRA + prompt takes LoRA's and "
                  "prompt tuning's, 1e-1, after prompt rates 3e-3 and 3e-2 stayed at the majority class). Made "
                  "by `bash experiments/quality_vs_params/lr_pilot.sh`, one command at a time (validation and test "
                  "capped at 640 reviews; seconds are wall time, some runs shared the two cores with other work):", "",
                  "```", pilot.read_text().rstrip(), "```", ""]
    head_pilot = HERE / "head_lr_pilot.txt"
    if "head" in all_results and head_pilot.is_file():
        lines += ["## Learning rates of part (a')", "",
                  f"The head at {HEAD_LR:g} (`model.head_learning_rate`, `experiments/common.py` `HEAD_LR`); the "
                  "methods keep the rates of part (a): for the two with an MLP, 1e-3 still stays at the majority "
                  "class (same budget and seed 0 as the pilot of part (a)). Made by "
                  "`bash experiments/quality_vs_params/lr_pilot.sh head`:", "",
                  "```", head_pilot.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cls", "head", "gen", "all"], default="cls")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true")
    group.add_argument("--full", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from saved results")
    parser.add_argument("--only", nargs="*", help="run only these methods (names as in the table)")
    parser.add_argument("--seeds", nargs="*", type=int, help="run only these seeds (default: the budget's)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full" if args.full else "default"
    parts = ["cls", "head", "gen"] if args.part == "all" else [args.part]
    suffix = "_smoke" if args.smoke else ""
    if not args.report:
        for part in parts:
            run(part, mode, args.only, HERE / f"results_{part}{suffix}.json", args.seeds)
    saved = {p: json.loads((HERE / f"results_{p}{suffix}.json").read_text())
             for p in ("cls", "head", "gen") if (HERE / f"results_{p}{suffix}.json").is_file()}
    if args.smoke:
        fail_on_failed_runs([r for rs in saved.values() for r in rs])
        return
    text = report(saved, mode)
    publish("quality_vs_params", text)


if __name__ == "__main__":
    main()
