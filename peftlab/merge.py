"""Merging trained LoRA into the backbone: a plain transformers model with zero inference overhead.

``W' = W + (alpha / r) * B A`` is folded into every adapted layer and the result saved with
``save_pretrained`` (safetensors); it loads with ``AutoModel*.from_pretrained`` and no peft.

How a method merges is its own business (:meth:`peftlab.methods.PeftModule.merged_model`): LoRA uses peft's
``merge_and_unload``; QLoRA dequantizes the 4-bit weights and adds the update in the chosen dtype, so the saved
model is not bit-equal to the 4-bit one that was trained and :func:`merge_to_directory` reports the largest
output difference on a probe batch. Methods that do not merge refuse: prompt and prefix tuning add inputs
(tokens, K/V) and adapters add layers, so there is no weight update to fold in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from peftlab.errors import PeftLabError
from peftlab.export import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_mergeable(module) -> None:
    """Refuse, in one line, a method whose update does not fold into the weights (its class says so)."""
    if not type(module).can_merge():
        module.merged_model()  # raises the method's own explanation
        raise PeftLabError(f"{type(module).__name__} cannot be merged into the backbone")


def merged_model(module, dtype: str = "float32"):
    """A plain transformers model with ``module``'s trained update folded in (``module`` itself is not changed):
    the method's own :meth:`~peftlab.methods.PeftModule.merged_model`."""
    check_mergeable(module)
    if dtype not in DTYPES:
        raise PeftLabError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return module.merged_model(dtype)


def max_output_difference(module, merged, batch: dict) -> float:
    """Largest absolute difference of the logits of ``module`` (unmerged) and ``merged`` on ``batch``."""
    batch = {k: v for k, v in batch.items() if k != "labels" or module.task != "classification"}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        a = module(**batch).logits.float()
        b = merged(**{k: v.to(merged.device) for k, v in batch.items()}).logits.float()
    module.train(was_training)
    return float((a - b.to(a.device)).abs().max())


def merge_to_directory(module, directory, dtype: str = "float32", probe_batch: dict | None = None) -> dict:
    """Merge, save (atomically) model + tokenizer to ``directory``; return a report with the max difference."""
    model = merged_model(module, dtype)
    report = {"directory": str(directory), "dtype": dtype, "method": type(module).__name__}
    if probe_batch is not None:
        report["max_abs_logit_difference"] = max_output_difference(module, model, probe_batch)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if module.tokenizer is not None:
            module.tokenizer.save_pretrained(tmp)
    return report


def probe_batch(module, texts: list[str] | None = None) -> dict:
    """A small tokenized batch for :func:`max_output_difference`."""
    texts = texts or ["A moving, beautifully shot film.", "Dull, predictable and far too long.",
                      "The cast is wonderful but the script lets them down."]
    batch = module.tokenizer(texts, padding=True, return_tensors="pt")
    if module.task == "seq2seq":
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    return dict(batch)


def main(argv: list[str]) -> None:
    """``peftlab merge RUN_OR_ADAPTER_DIR --output DIR [--dtype float32|bfloat16|float16] [--backbone B]``."""
    import argparse
    import json

    from peftlab.api import load_run

    parser = argparse.ArgumentParser(prog="peftlab merge", description=(
        "Fold a trained LoRA/QLoRA adapter into its backbone and save a plain transformers model "
        "(safetensors) that loads without peft."))
    parser.add_argument("run", help="run directory (runs/NAME/version_N) or an exported adapter directory")
    parser.add_argument("--output", required=True, help="directory to write the merged model to")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--backbone", default=None, help="use this backbone instead of the recorded one")
    args = parser.parse_args(argv)
    if Path(args.output).exists() and any(Path(args.output).iterdir()):
        print(f"[peftlab] replacing {args.output} (atomically: the old one stays until the new one is complete)")
    run = load_run(args.run, backbone=args.backbone)
    check_mergeable(run.module)
    report = merge_to_directory(run.module, args.output, args.dtype, probe_batch(run.module))
    print(json.dumps(report, indent=2))
