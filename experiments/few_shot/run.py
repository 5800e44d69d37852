"""Few-shot: k examples per class for prompt tuning, prefix tuning, P-tuning v2 and LoRA.

    python experiments/few_shot/run.py            # CPU default: one draw (11 min on 2 cores)
    python experiments/few_shot/run.py --smoke    # a few steps (CI)
    python experiments/few_shot/run.py --full     # GPU: all training data for k=all, 3 draws
    python experiments/few_shot/run.py --report   # rewrite the report from saved results

Checks the notes' claim (000, 001) that prefix tuning / P-tuning v2 suit few-shot data better than LoRA.
Every k gets the same number of optimizer steps (small sets are repeated), the learning rate per method of
quality_vs_params (experiments/common.py CLS_LR; the classification head at HEAD_LR = 1e-2 where the method's
rate is below it, as in quality_vs_params part (a')), and is tested on the same held-out reviews. The drawn
example ids of each run are in its run directory (run.json, key data.few_shot_ids). Writes docs/results/few_shot.md and
few_shot.png.
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

METHODS = {
    "prompt": "configs/methods/prompt_tuning.yaml",
    "prefix": "configs/methods/prefix_tuning.yaml",
    "p-tuning v2": "configs/methods/p_tuning_v2.yaml",
    "lora r=8": "configs/methods/lora.yaml",
}
KS = [8, 16, 32, 64, "all"]


def settings(mode: str):
    """(seeds, budget overrides, training cap for k=all, methods, ks) per budget."""
    if mode == "smoke":  # CI: two methods, two ks, a couple of steps
        return [0], ["--trainer.max_steps", "2", "--data.max_eval_samples", "16"], 64, ["prompt", "lora r=8"], [8, "all"]
    if mode == "full":
        return [0, 1, 2], ["--trainer.max_steps", "1000"], None, list(METHODS), KS
    # one few-shot draw of 120 steps per run on a 2-core CPU; the full budget: 3 draws, 1,000 steps, all the data
    return [0], ["--trainer.max_steps", "120", "--data.max_eval_samples", "640"], 2000, list(METHODS), KS


def run(mode: str, path: Path) -> list[dict]:
    log = logger("few_shot")
    seeds, budget, all_cap, methods, ks = settings(mode)
    # no validation: few-shot runs keep their final weights; every run is tested on the same reviews
    common = ["--config", "configs/quickstart.yaml", "--data.batch_size", "8", "--trainer.limit_val_batches", "0",
              "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", "-1", *budget]
    todo = [(m, k, s) for s in seeds for k in ks for m in methods]  # seed-major: partial results stay useful
    results = []
    for i, (method, k, seed) in enumerate(todo, 1):
        data = ["--data.few_shot_k", str(k), "--data.few_shot_seed", str(seed)] if k != "all" else (
            ["--data.max_train_samples", str(all_cap)] if all_cap else [])
        args = [*common, "--config", METHODS[method], *cls_learning_rate(method), *head_learning_rate(method), *data,
                "--seed_everything", str(seed)]
        log(f"[{i}/{len(todo)}] {method} k={k} seed {seed}")
        slug = f"{method.replace(' ', '_').replace('=', '')}-k{k}-s{seed}"
        r = run_fit("few_shot" + ("_smoke" if mode == "smoke" else ""), slug, args, log)
        r.update(label=method, k=str(k), seed=seed, mode=mode)
        if "failed" not in r:
            log(f"    test/acc = {r.get('test/acc', float('nan')):.4f}")
        results.append(r)
        save_json(path, results)
    return results


def report(results: list[dict], mode: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = len({r["seed"] for r in results})
    budget = settings(mode)[1]
    steps = budget[budget.index("--trainer.max_steps") + 1]
    headed = " and ".join(m for m in METHODS if head_learning_rate(m))
    lines = ["# Few-shot: test accuracy vs examples per class", "",
             f"Machine: {machine()}. Budget: `{mode}`: every run takes {steps} optimizer steps "
             "(batch 8) with the learning rates of `experiments/common.py` `CLS_LR` (the classification head at "
             f"`HEAD_LR` = {HEAD_LR:g} for {headed}, whose own rates are lower), tested on the same "
             "held-out reviews; " + (f"mean ± std over {draws} few-shot draws (seeds). " if draws > 1 else
                            "one few-shot draw (seed 0), so each cell is a single run and differences of a few "
                            "points are noise. ")
             + "`all` = every training example (capped on CPU, see `settings()` in experiments/few_shot/run.py). "
             "Commands: `experiments/few_shot/results.json`.",
             "Majority-class accuracy (always 'fresh') is 0.578.", "",
             "| method | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|" + "---:|" * len(KS)]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in METHODS:
        cells, ys, es = [], [], []
        for k in KS:
            vals = [r["test/acc"] for r in results if r["label"] == method and r["k"] == str(k) and "test/acc" in r]
            m, s = mean_std(vals)
            cells.append("n/a" if not vals else f"{m:.3f} ± {s:.3f}" if draws > 1 else f"{m:.3f}")
            ys.append(m)
            es.append(s)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        ax.errorbar(range(len(KS)), ys, yerr=es, marker="o", capsize=3, label=method)
    ax.axhline(0.578, color="grey", linestyle=":", label="majority class")
    ax.set_xticks(range(len(KS)), [str(k) for k in KS])
    ax.set_xlabel("training examples per class (k)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    lines += ["", save_figure(fig, "few_shot", "few-shot"), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true")
    group.add_argument("--full", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "full" if args.full else "default"
    path = HERE / f"results{'_smoke' if args.smoke else ''}.json"
    if not args.report:
        run(mode, path)
    results = json.loads(path.read_text())
    if args.smoke:
        fail_on_failed_runs(results)
        return
    text = report(results, mode)
    publish("few_shot", text)


if __name__ == "__main__":
    main()
