"""Two LoRAs on two real tasks, combined with a sweep of weights (exact composition).

    python experiments/multi_lora/run.py           # CPU default (~15 min on 2 cores)
    python experiments/multi_lora/run.py --smoke   # a few steps (CI)

Task A: Rotten Tomatoes verdicts as generation ("... Answer: fresh/rotten", loss on the answer).
Task B: language modelling of the movie plot summaries (loss on every token).
Both LoRAs: r=8 on q_proj+v_proj of SmolLM2-135M-Instruct, trained with `peftlab fit`. Then for
w in 0, 0.25, ..., 1 the model with update w * dW_A + (1 - w) * dW_B (peftlab.compose, exact mode) is
tested on both tasks. Writes docs/results/multi_lora.md and multi_lora.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import ROOT, logger, machine, publish, run_fit, save_figure, save_json  # noqa: E402

TASK_A = ["--config", "configs/causal_lm_lora.yaml"]
TASK_B = ["--config", "configs/causal_lm_lora.yaml", "--data.source", "packaged:rotten_tomatoes_plots",
          "--data.prompt_template", "{text}", "--data.response_template", "", "--data.loss_on", "all",
          "--data.max_length", "128"]
WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]


def budget(smoke: bool) -> list[str]:
    if smoke:
        return ["--trainer.max_steps", "2", "--data.max_train_samples", "16", "--data.max_eval_samples", "8"]
    return ["--data.max_train_samples", "400", "--data.max_eval_samples", "120", "--trainer.val_check_interval", "1.0"]


def data_module(task_args: list[str], smoke: bool):
    """The test DataModule of a task, parsed from the same arguments `peftlab fit` got."""
    import yaml

    from peftlab.data import PeftDataModule

    config = yaml.safe_load((ROOT / "configs/causal_lm_lora.yaml").read_text())["data"]
    args = task_args[2:] + budget(smoke)
    for key, value in zip(args[::2], args[1::2]):
        if key.startswith("--data."):
            name = key[len("--data."):]
            # templates stay strings ("{text}" would parse as a YAML mapping); numbers are parsed
            config[name] = value if name.endswith("template") or name == "source" else yaml.safe_load(value)
    config.pop("max_train_samples", None)
    return PeftDataModule(tokenizer="packaged:SmolLM2-135M-Instruct", task="causal_lm",
                          **{k: v for k, v in config.items() if k != "task"})


def run(smoke: bool) -> dict:
    import lightning as L

    from peftlab.compose import compose
    from peftlab.methods import LoRA

    log = logger("multi_lora")
    study = "multi_lora_smoke" if smoke else "multi_lora"
    adapters = {}
    for name, args in (("A", TASK_A), ("B", TASK_B)):
        log(f"training LoRA {name}")
        r = run_fit(study, f"lora_{name}", [*args, *budget(smoke)], log)
        if "failed" in r:
            raise SystemExit(f"training LoRA {name} failed:\n{r['failed']}")
        adapters[name] = str(ROOT / "runs/experiments" / study / f"lora_{name}" / "version_0/adapter/best")
        log(f"    test/loss on its own task: {r.get('test/loss', float('nan')):.4f}")
    data = {"A": data_module(TASK_A, smoke), "B": data_module(TASK_B, smoke)}
    module = LoRA(backbone="packaged:SmolLM2-135M-Instruct", task="causal_lm", target_modules=["q_proj", "v_proj"]).build()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_test_batches=2 if smoke else None)
    rows = []
    for w in WEIGHTS:
        compose(module.model, [adapters["A"], adapters["B"]], [w, 1.0 - w])
        row = {"w_A": w, "w_B": 1.0 - w}
        for task, dm in data.items():
            row[f"loss_{task}"] = trainer.test(module, datamodule=dm, verbose=False)[0]["test/loss"]
        log(f"  w_A={w:.2f}: loss A {row['loss_A']:.4f}, loss B {row['loss_B']:.4f}")
        rows.append(row)
    module.model.set_adapter("default")  # untrained LoRA (B = 0): the base model
    base = {f"loss_{t}": trainer.test(module, datamodule=dm, verbose=False)[0]["test/loss"] for t, dm in data.items()}
    return {"rows": rows, "base": base, "adapters": adapters,
            "commands": ["peftlab fit " + " ".join([*TASK_A, *budget(smoke)]),
                         "peftlab fit " + " ".join([*TASK_B, *budget(smoke)])]}


def report(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["base"]
    lines = ["# Weighted multi-LoRA composition", "",
             f"Machine: {machine()}. Command: `python experiments/multi_lora/run.py`; the two LoRAs were trained with:", ""]
    lines += [f"    {c}" for c in result["commands"]]
    lines += ["", "Test loss on each task for the composed update `w_A dW_A + w_B dW_B` (exact composition). "
              f"Base model (no LoRA): task A {base['loss_A']:.4f}, task B {base['loss_B']:.4f}.", "",
              "| w_A | w_B | task A loss (verdicts) | task B loss (plots) |", "|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['w_A']:.2f} | {r['w_B']:.2f} | {r['loss_A']:.4f} | {r['loss_B']:.4f} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    ws = [r["w_A"] for r in result["rows"]]
    ax.plot(ws, [r["loss_A"] for r in result["rows"]], marker="o", label="task A (verdicts)")
    ax.plot(ws, [r["loss_B"] for r in result["rows"]], marker="o", label="task B (plots)")
    ax.set_xlabel("w_A (w_B = 1 - w_A)")
    ax.set_ylabel("test loss")
    ax.legend()
    lines += ["", save_figure(fig, "multi_lora", "multi-LoRA sweep"), ""]
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
    text = report(json.loads(path.read_text()))
    publish("multi_lora", text)


if __name__ == "__main__":
    main()
