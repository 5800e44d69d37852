"""Training-memory estimates checked against measured CPU peaks, and the notes' 1B/7B/70B table regenerated.

    /work/venv/bin/python experiments/memory/run.py            # both tables, written into docs/decision.md
    /work/venv/bin/python experiments/memory/run.py --skip-measure

Measurement: each case runs in a fresh process (so earlier allocations do not hide its peak). The process
imports everything, builds the method with real weights (fp32 on CPU), resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), runs 3 training steps (forward, backward, AdamW step, zero_grad) on a
random batch of the given shape without padding, and reads the peak (``VmHWM``). "weights" is the RSS
growth from building the model; "training" is peak minus the RSS after building. The estimate is
``peftlab estimate-memory`` for the same method, shape and precision (``--attention eager`` where the CPU
runs SDPA's math path: BERT trains with attention dropout, which the fused CPU kernel does not support).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "decision.md"
MINILM, SMOL = "packaged:all-MiniLM-L6-v2", "packaged:SmolLM2-135M-Instruct"
# (label, method, backbone, task, batch, seq, attention, gradient checkpointing)
CASES = [
    ("LoRA r=8 q+v, MiniLM", "lora", MINILM, "classification", 32, 128, "eager", False),
    ("LoRA r=8 q+v, MiniLM", "lora", MINILM, "classification", 64, 256, "eager", False),
    ("LoRA r=8 q+v, MiniLM, checkpointing", "lora", MINILM, "classification", 64, 256, "eager", True),
    ("full FT, MiniLM", "full", MINILM, "classification", 32, 128, "eager", False),
    ("prompt tuning 20, MiniLM", "prompt", MINILM, "classification", 32, 128, "eager", False),
    ("LoRA r=8 q+v, SmolLM2-135M", "lora", SMOL, "causal_lm", 4, 256, "fused", False),
]
MiB = 2**20
# A fixed mmap threshold makes glibc return every large tensor to the OS when it is freed; by default the
# threshold grows after frees and freed activations stay in the heap, so RSS overstates live memory (2x here).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_one(case: dict) -> dict:
    """Child process: build the method with real weights and measure RSS around 3 training steps."""
    import torch

    from peftlab.analysis.memory import preset_spec
    from peftlab.analysis.params import build_meta  # noqa: F401 - import everything before the baseline
    from peftlab.methods.base import optimizer_class

    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = preset_spec(case["method"], case["backbone"], case["task"])
    import importlib
    import warnings

    warnings.simplefilter("ignore")
    module_name, _, cls_name = spec.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    kwargs = dict(spec.init_args)
    if case["task"] == "classification":
        kwargs["num_labels"] = 2
    base = _rss_kib("VmRSS")
    model = cls(**kwargs).build()
    if case["checkpointing"]:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = optimizer_class("adamw")([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.model.get_input_embeddings().num_embeddings if hasattr(model.model, "get_input_embeddings") else 1000
    b, s = case["batch"], case["seq"]
    ids = torch.randint(5, vocab - 1, (b, s))
    labels = torch.randint(0, 2, (b,)) if case["task"] == "classification" else ids
    built = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    started = time.time()
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _rss_kib("VmHWM")
    return {"weights": (built - base) * 1024, "training": (peak - built) * 1024, "total": (peak - base) * 1024,
            "seconds": time.time() - started}


def estimate_one(case: dict) -> dict:
    from peftlab.analysis.memory import estimate, preset_spec

    e = estimate(preset_spec(case["method"], case["backbone"], case["task"]), batch_size=case["batch"],
                 seq_len=case["seq"], precision="fp32", optimizer="adamw", attention=case["attention"],
                 gradient_checkpointing=case["checkpointing"], num_labels=2)
    return {"weights": e.weights, "training": e.gradients + e.optimizer_states + e.activations, "total": e.total,
            "activations": e.activations}


def check_table() -> str:
    rows = ["| case | batch x seq | measured: peak RSS growth | estimated total | error | estimate: weights / "
            "gradients + optimizer / activations (saved + workspace) |", "|---|---|---|---|---|---|"]
    for label, method, backbone, task, b, s, attention, ckpt in CASES:
        case = dict(method=method, backbone=backbone, task=task, batch=b, seq=s, attention=attention,
                    checkpointing=ckpt)
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True,
                             cwd=ROOT, check=True, env={**os.environ, **MALLOC_ENV})
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        est = estimate_one(case)
        err = (est["total"] - measured["total"]) / measured["total"]
        print(f"{label} {b}x{s}: measured {measured}, estimated {est}", file=sys.stderr, flush=True)
        rows.append(f"| {label} ({attention} attention) | {b} x {s} | {measured['total'] / MiB:,.0f} MiB | "
                    f"{est['total'] / MiB:,.0f} MiB | {100 * err:+.0f}% | {est['weights'] / MiB:,.0f} / "
                    f"{(est['training'] - est['activations']) / MiB:,.1f} / {est['activations'] / MiB:,.0f} MiB |")
    return "\n".join(rows)


# the notes' figures in bytes (GB read as 10^9 bytes) and as printed
NOTES_TABLE = {"1b": (4e9, 1e9, 4.0, "~4GB", "~1GB", "4x"), "7b": (28e9, 8e9, 3.5, "~28GB", "~8GB", "3.5x"),
               "70b": (280e9, 40e9, 7.0, "~280GB", "~40GB", "7x")}
SETTINGS = dict(batch_size=1, seq_len=512, precision="bf16", optimizer="adamw", gradient_checkpointing=True,
                attention="fused")


def off(notes: float, exact: float) -> str:
    """How far the notes' figure is from ours; WRONG beyond 25%."""
    err = (notes - exact) / exact
    return f"{100 * err:+.0f}%" + (" **WRONG**" if abs(err) > 0.25 else "")


def notes_table() -> str:
    """The notes' scaling table, recomputed for Llama shapes: full FT vs LoRA vs QLoRA (SETTINGS)."""
    from peftlab.analysis.memory import SIZES, estimate, preset_spec, size_backbone

    rows = ["| model | full FT: ours / notes (notes off by) | LoRA r=8 q+v: ours / notes (notes off by) "
            "| QLoRA r=8 q+v (NF4) | savings full/LoRA: ours / notes | savings full/QLoRA |",
            "|---|---|---|---|---|---|"]
    for size, (n_full, n_lora, n_save, t_full, t_lora, t_save) in NOTES_TABLE.items():
        with size_backbone(size) as backbone:
            got = {m: estimate(preset_spec(m, backbone, "causal_lm"), **SETTINGS) for m in ("full", "lora", "qlora")}
        full, lora, qlora = (got[m].total for m in ("full", "lora", "qlora"))
        rows.append(f"| {size.upper()} ({SIZES[size]}, {got['full'].total_params / 1e9:.2f}B params) "
                    f"| {full / 1e9:.1f} GB / {t_full} ({off(n_full, full)}) | {lora / 1e9:.1f} GB / {t_lora} "
                    f"({off(n_lora, lora)}) | {qlora / 1e9:.1f} GB | {full / lora:.1f}x / {t_save} "
                    f"({off(n_save, full / lora)}) | {full / qlora:.1f}x |")
    return "\n".join(rows)


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text:
        raise SystemExit(f"{DOC} has no {start} marker")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--skip-measure", action="store_true", help="only regenerate the 1B/7B/70B table")
    p.add_argument("--no-write", action="store_true", help="print the tables instead of updating docs/decision.md")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return
    blocks = {"memory-notes-table": notes_table()}
    if not args.skip_measure:
        blocks["memory-cpu-check"] = check_table()
    if args.no_write:
        print("\n\n".join(blocks.values()))
        return
    text = DOC.read_text()
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    DOC.write_text(text)
    print("\n\n".join(blocks.values()))


if __name__ == "__main__":
    main()
