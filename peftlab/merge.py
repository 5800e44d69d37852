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

from pathlib import Path
from typing import Literal

import torch

from peftlab.backbones import DTYPES, torch_dtype  # noqa: F401 - DTYPES: the names --dtype takes
from peftlab.errors import PeftLabError
from peftlab.export import atomic_directory


def check_mergeable(module) -> None:
    """Refuse, in one line, a method whose update does not fold into the weights (its class says so, or, for a
    method whose settings decide it, e.g. a stack with bottleneck adapters, its ``merge_refusal()``)."""
    if not type(module).can_merge():
        module.merged_model()  # raises the method's own explanation
        raise PeftLabError(f"{type(module).__name__} cannot be merged into the backbone")
    reason = module.merge_refusal()
    if reason:
        raise PeftLabError(reason)


def merged_model(module, dtype: str = "float32"):
    """A plain transformers model with ``module``'s trained update folded in (``module`` itself is not changed):
    the method's own :meth:`~peftlab.methods.PeftModule.merged_model`."""
    check_mergeable(module)
    torch_dtype(dtype)  # an unknown dtype is refused before anything is merged
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


def merge_command(run: str, /, *, output: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                  backbone: str | None = None) -> dict:
    """Merge a trained mergeable adapter (LoRA family, IA3, VeRA) into its backbone: a plain transformers model, no peft needed.

    Folds the trained update into the backbone's weights and saves model + tokenizer (safetensors, atomically)
    to a directory that ``AutoModel*.from_pretrained`` loads without peft; prints a report with the largest
    logit difference between the adapter and the merged model on a probe batch. Methods whose update does not
    fold into the weights (prompt and prefix tuning, adapters) are refused.

    Args:
        run: run directory (runs/NAME/version_N) or an exported adapter directory
        output: directory to write the merged model to (replaced atomically if it exists)
        dtype: dtype of the merged weights
        backbone: use this backbone instead of the one recorded with the adapter

    Examples:
        peftlab merge runs/quickstart/version_0 --output merged/
        peftlab merge runs/qlora/version_0/adapter/best --output merged-bf16/ --dtype bfloat16
    """
    import json

    from peftlab.api import load_run

    if Path(output).exists() and any(Path(output).iterdir()):
        print(f"[peftlab] replacing {output} (atomically: the old one stays until the new one is complete)")
    loaded = load_run(run, backbone=backbone)
    check_mergeable(loaded.module)
    report = merge_to_directory(loaded.module, output, dtype, probe_batch(loaded.module))
    print(json.dumps(report, indent=2))
    return report
