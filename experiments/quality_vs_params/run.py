"""Quality vs trainable parameters for every method, on real data, through `peftlab fit`.

    python experiments/quality_vs_params/run.py              # CPU default (~40 min on 2 cores, part a)
    python experiments/quality_vs_params/run.py --part gen   # part b: SmolLM2-135M (~30 min on 2 cores)
    python experiments/quality_vs_params/run.py --smoke      # a few steps per method (CI)
    python experiments/quality_vs_params/run.py --full       # the complete version (GPU): all data, 3 epochs
    python experiments/quality_vs_params/run.py --report     # rewrite the report from saved results

(a) classification: Rotten Tomatoes fresh vs rotten on all-MiniLM-L6-v2, test accuracy;
(b) generation: the same reviews phrased as "... Answer: fresh/rotten" on SmolLM2-135M, test loss on the
    answer tokens and accuracy of the greedy answer.
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
    fail_on_failed_runs, logger, machine, mean_std, publish, run_fit, save_figure, save_json,
)

M = "configs/methods"
# name -> (method config, overrides)
CLS_METHODS = {
    "full": ("configs/full_finetune.yaml", ["--model.init_args.learning_rate", "5e-5"]),
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
GEN_METHODS = {
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
}

PARTS = {
    "cls": {"title": "(a) sentiment classification, all-MiniLM-L6-v2", "metric": "test/acc"},
    "gen": {"title": "(b) generative sentiment (answer tokens), SmolLM2-135M-Instruct", "metric": "test/loss"},
}


def settings(part: str, mode: str) -> tuple[list[int], list[str]]:
    """Seeds and overrides of the budget: smoke (CI), default (2-core CPU, < 1 h), full (GPU)."""
    if part == "cls":
        base = ["--config", "configs/quickstart.yaml"]
        budget = {"smoke": ["--trainer.max_steps", "2", "--data.max_train_samples", "64", "--data.max_eval_samples", "32"],
                  "default": ["--trainer.max_epochs", "1", "--data.max_train_samples", "2000",
                              "--data.max_eval_samples", "640"],
                  "full": ["--trainer.max_epochs", "3"]}[mode]
    else:
        base = ["--config", "configs/causal_lm_lora.yaml"]
        budget = {"smoke": ["--trainer.max_steps", "2", "--data.max_train_samples", "16", "--data.max_eval_samples", "8"],
                  "default": ["--data.max_train_samples", "400", "--data.max_eval_samples", "160",
                              "--trainer.val_check_interval", "1.0"],
                  "full": ["--data.max_train_samples", "null", "--trainer.max_epochs", "2"]}[mode]
    # 2 seeds on a 2-core CPU keep part (a) near 30 minutes; the full budget has 3
    seeds = {"smoke": [0], "default": [0, 1] if part == "cls" else [0], "full": [0, 1, 2]}[mode]
    return seeds, base + budget


def run(part: str, mode: str, only: list[str] | None, path: Path) -> list[dict]:
    log = logger(f"quality_vs_params/{part}")
    seeds, common = settings(part, mode)
    methods = CLS_METHODS if part == "cls" else GEN_METHODS
    if mode == "smoke" and not only:  # CI: a representative subset, each kind of method once
        only = ["lora r=8", "prompt", "p-tuning v2", "adapters b=64"] if part == "cls" else ["lora r=8", "prefix"]
    results = []
    # seed-major order and a save after every run: an interrupted study still covers every method
    todo = [(n, s) for s in seeds for n in methods if not only or n in only]
    for i, (name, seed) in enumerate(todo, 1):
        if part == "cls":
            config, extra = methods[name]
            args = [*common, "--config", config, *extra]
        else:
            args = [*common, *methods[name]]
        args += ["--seed_everything", str(seed)]
        log(f"[{i}/{len(todo)}] {name} seed {seed}")
        slug = f"{part}-{name.replace(' ', '_').replace('=', '').replace('+', 'p')}-s{seed}"
        r = run_fit("quality_vs_params" + ("_smoke" if mode == "smoke" else ""), slug, args, log)
        r.update(label=name, seed=seed, part=part, mode=mode)
        if "failed" not in r:
            log(f"    {PARTS[part]['metric']} = {r.get(PARTS[part]['metric'], float('nan')):.4f}, "
                f"trainable {r.get('trainable', 0):,}, {r['seconds']:.0f} s")
        results.append(r)
        save_json(path, results)
    return results


def report(all_results: dict[str, list[dict]], mode: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Quality vs trainable parameters", "",
             f"Machine: {machine()}. Budget: `{mode}` (see `experiments/quality_vs_params/run.py`, `settings()`).",
             "Each row is real `peftlab fit` runs; the command of every run is in "
             f"`experiments/quality_vs_params/results_<part>.json`.", ""]
    fig, axes = plt.subplots(1, len(all_results), figsize=(6.5 * len(all_results), 4.5), squeeze=False)
    for ax, (part, results) in zip(axes[0], all_results.items()):
        metric = PARTS[part]["metric"]
        lines += [f"## {PARTS[part]['title']}", "",
                  f"| method | trainable | % | {metric} (mean ± std) | seeds | train s/epoch |",
                  "|---|---:|---:|---:|---:|---:|"]
        by_label: dict[str, list[dict]] = {}
        for r in results:
            by_label.setdefault(r["label"], []).append(r)
        points = []
        for label, rs in by_label.items():
            ok = [r for r in rs if "failed" not in r and metric in r]
            if not ok:
                lines.append(f"| {label} | | | failed | {len(rs)} | |")
                continue
            m, s = mean_std([r[metric] for r in ok])
            t, _ = mean_std([r.get("time/train_epoch_s", float("nan")) for r in ok])
            pct = 100.0 * ok[0]["trainable"] / ok[0]["total"]
            lines.append(f"| {label} | {ok[0]['trainable']:,} | {pct:.3f} | {m:.4f} ± {s:.4f} | {len(ok)} | {t:.0f} |")
            points.append((ok[0]["trainable"], m, s, label))
        if part == "gen":
            acc = [r for r in results if "test/gen_acc" in r]
            if acc:
                lines.append("")
        lines.append("")
        for x, y, e, label in points:
            ax.errorbar([x], [y], yerr=[e], fmt="o", capsize=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(metric)
        ax.set_title(PARTS[part]["title"], fontsize=9)
    lines += [save_figure(fig, "quality_vs_params", "quality vs parameters"), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cls", "gen", "both"], default="cls")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true")
    group.add_argument("--full", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from saved results")
    parser.add_argument("--only", nargs="*", help="run only these methods (names as in the table)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full" if args.full else "default"
    parts = ["cls", "gen"] if args.part == "both" else [args.part]
    suffix = "_smoke" if args.smoke else ""
    if not args.report:
        for part in parts:
            run(part, mode, args.only, HERE / f"results_{part}{suffix}.json")
    saved = {p: json.loads((HERE / f"results_{p}{suffix}.json").read_text())
             for p in ("cls", "gen") if (HERE / f"results_{p}{suffix}.json").is_file()}
    if args.smoke:
        fail_on_failed_runs([r for rs in saved.values() for r in rs])
        return
    text = report(saved, mode)
    publish("quality_vs_params", text)


if __name__ == "__main__":
    main()
