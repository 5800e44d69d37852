"""Weighted composition of several trained LoRA adapters on one backbone.

``exact`` (default) gives every adapted layer the update ``sum_i w_i * (alpha_i / r_i) * B_i A_i``,
whatever the ranks: peft's ``cat`` combination stacks the factors, ``A = [A_1; A_2; ...]`` and
``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, so ``B A`` is the weighted sum with no cross terms (rank
``sum r_i``). peft's other modes are offered as they are, and are approximations of that sum:

* ``linear`` (equal ranks only) mixes the factors, ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``,
  so ``B A`` contains cross terms ``B_i A_j``;
* ``svd`` computes the exact sum and truncates it to a rank (lossy when the sum has a higher rank);
* ``ties``, ``dare_linear``, ``dare_ties`` prune and rescale entries (``density``) before mixing.

Only LoRA adapters trained on the same backbone with the same target modules are composed; generative
tasks only (one classification head per adapter cannot be summed meaningfully).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from peftlab.errors import PeftLabError
from peftlab.export import atomic_directory, read_adapter_config

Mode = Literal["exact", "linear", "svd", "ties", "dare_linear", "dare_ties"]
PEFT_MODE = {"exact": "cat", "linear": "linear", "svd": "svd", "ties": "ties", "dare_linear": "dare_linear",
             "dare_ties": "dare_ties"}
COMPOSED = "composed"


def check_compatible(directories: list[str], weights: list[float]) -> list[dict]:
    """Read and cross-check the adapters' configs; return them."""
    if len(directories) < 2:
        raise PeftLabError("give at least two adapters to compose")
    if len(weights) != len(directories):
        raise PeftLabError(f"{len(directories)} adapters but {len(weights)} weights; give one weight per adapter")
    configs = [read_adapter_config(d) for d in directories]
    for d, c in zip(directories, configs):
        if c.get("peft_type") != "LORA":
            raise PeftLabError(f"{d} is not a LoRA adapter ({c.get('peft_type') or c.get('method')}); only LoRA composes")
        if c.get("task_type") == "SEQ_CLS":
            raise PeftLabError(f"{d} is a classification adapter: its trained heads cannot be summed; "
                               "compose adapters of generative tasks")
    first = configs[0]
    for d, c in zip(directories[1:], configs[1:]):
        if c.get("base_model_name_or_path") != first.get("base_model_name_or_path"):
            raise PeftLabError(
                f"adapters were trained on different backbones: {directories[0]} on "
                f"{first.get('base_model_name_or_path')!r}, {d} on {c.get('base_model_name_or_path')!r}"
            )
        if set(c.get("target_modules") or []) != set(first.get("target_modules") or []):
            raise PeftLabError(
                f"adapters adapt different layers: {directories[0]} {sorted(first.get('target_modules') or [])}, "
                f"{d} {sorted(c.get('target_modules') or [])}; train them with the same target_modules"
            )
    return configs


def compose(peft_model, directories: list[str], weights: list[float], mode: Mode = "exact",
            density: float = 0.5, svd_rank: int | None = None) -> str:
    """Load the adapters into ``peft_model`` and activate their weighted combination; return its name."""
    if mode not in PEFT_MODE:
        raise PeftLabError(f"unknown composition mode {mode!r}; choose one of {', '.join(PEFT_MODE)}")
    configs = check_compatible(directories, weights)
    if mode == "linear" and len({c["r"] for c in configs}) > 1:
        raise PeftLabError("mode 'linear' needs adapters of equal rank; use mode 'exact'")
    names = []
    for i, directory in enumerate(directories):
        name = f"adapter{i}"
        if name in peft_model.peft_config:
            peft_model.delete_adapter(name)
        peft_model.load_adapter(str(directory), adapter_name=name)
        names.append(name)
    if COMPOSED in peft_model.peft_config:
        peft_model.delete_adapter(COMPOSED)
    extra = {}
    if mode in ("ties", "dare_linear", "dare_ties"):
        extra["density"] = density
    if mode == "svd":
        extra["svd_rank"] = svd_rank or max(c["r"] for c in configs)
    peft_model.add_weighted_adapter(names, [float(w) for w in weights], COMPOSED,
                                    combination_type=PEFT_MODE[mode], **extra)
    peft_model.set_adapter(COMPOSED)
    return COMPOSED


def main(argv: list[str]) -> None:
    """``peftlab compose A B [C ...] --weights wA wB ... --output DIR [--mode exact] [--merge]``."""
    import argparse
    import json

    from peftlab.api import build_module
    from peftlab.merge import merge_to_directory, probe_batch

    parser = argparse.ArgumentParser(prog="peftlab compose", description=(
        "Combine trained LoRA adapters (exported by peftlab or peft) with weights w_i into one adapter, "
        "or into a merged model with --merge."))
    parser.add_argument("adapters", nargs="+", help="adapter directories (e.g. runs/NAME/version_N/adapter/best)")
    parser.add_argument("--weights", nargs="+", type=float, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--mode", default="exact", choices=sorted(PEFT_MODE))
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare modes: fraction of entries kept")
    parser.add_argument("--merge", action="store_true", help="save a merged plain transformers model instead")
    args = parser.parse_args(argv)
    check_compatible(args.adapters, args.weights)
    meta_path = Path(args.adapters[0]) / "peftlab_meta.json"
    if not meta_path.is_file():
        raise PeftLabError(f"{args.adapters[0]} has no peftlab_meta.json (not exported by peftlab); "
                           "compose needs it to rebuild the backbone")
    module = build_module(json.loads(meta_path.read_text(encoding="utf-8")))
    compose(module.model, args.adapters, args.weights, args.mode, args.density)
    if args.merge:
        report = merge_to_directory(module, args.output, probe_batch=probe_batch(module))
    else:
        with atomic_directory(args.output) as tmp:
            module.model.save_pretrained(tmp, selected_adapters=[COMPOSED])
            nested = tmp / COMPOSED  # peft writes non-default adapters into a sub-folder
            if nested.is_dir():
                for f in nested.iterdir():
                    f.rename(tmp / f.name)
                nested.rmdir()
        report = {"directory": args.output}
    report.update({"adapters": args.adapters, "weights": args.weights, "mode": args.mode})
    print(json.dumps(report, indent=2))
