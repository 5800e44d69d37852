"""The learning-rate rule of issue #35: LoRA's tuned rate over full fine-tuning's, per independent tuning (a part of
experiments/instruction/lr_rule.yaml), and their geometric mean with a 95% t-interval over the tunings (on the log
ratio: rates are searched log-uniformly).

    python experiments/instruction/rate_ratio.py            # reads experiments/instruction/lr_rule.results.json

Its output is the table in experiments/instruction/lr_rule_notes.md (tests/unit/test_compare.py checks they agree).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from peftlab.compare.stats import student_t_quantile

RESULTS = Path(__file__).with_name("lr_rule.results.json")
FULL, LORA = "full", "lora r=16 all-linear"


def ratios(results: dict) -> list[tuple[str, float, float, float]]:
    """``(part, full's rate, LoRA's rate, LoRA / full)`` for every part where both methods finished tuning."""
    out = []
    for part in results["parts"]:
        best = {m["name"]: (m.get("best") or {}).get("params", {}).get("learning_rate") for m in part["methods"]}
        if best.get(FULL) and best.get(LORA):
            out.append((part["name"], best[FULL], best[LORA], best[LORA] / best[FULL]))
    return out


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Geometric mean and its t-interval over ``values`` (the log values' mean +- t x standard error)."""
    logs = [math.log(v) for v in values]
    mean = sum(logs) / len(logs)
    if len(logs) < 2:
        return math.exp(mean), float("nan"), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
    half = student_t_quantile(0.5 + level / 2, len(logs) - 1) * sd / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def table(results: dict) -> str:
    rows = ratios(results)
    lines = ["| tuning | full fine-tuning's rate | LoRA r=16 all-linear's rate | LoRA / full |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {full:.3g} | {lora:.3g} | {ratio:.2f} |" for name, full, lora, ratio in rows]
    mean, low, high = interval([r for *_, r in rows])
    lines.append(f"| geometric mean [95% t-interval over {len(rows)} tunings] | | | **{mean:.2f} [{low:.2f}, {high:.2f}]** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else RESULTS).read_text())))
