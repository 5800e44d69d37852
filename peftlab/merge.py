"""Merging trained LoRA into the backbone: a plain transformers model with zero inference overhead.

``W' = W + (alpha / r) * B A`` is folded into every adapted layer and the result saved with
``save_pretrained`` (safetensors); it loads with ``AutoModel*.from_pretrained`` and no peft.

QLoRA: merging into 4-bit weights would requantize ``W + dW`` and lose the update's precision, so the
4-bit weights are dequantized, the update is added in the chosen dtype, and the model is saved in that
dtype. The saved model is not bit-equal to the 4-bit one that was trained; :func:`merge_to_directory`
reports the largest output difference on a probe batch.

Only LoRA-family methods merge. Prompt and prefix tuning add inputs (tokens, K/V), adapters add layers:
there is no weight update to fold in (the notes' inference table: "Can merge? No").
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from peftlab.errors import PeftLabError
from peftlab.export import atomic_directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_mergeable(module) -> None:
    from peftlab.methods.lora import LoRA

    if not isinstance(module, LoRA):
        raise PeftLabError(
            f"{type(module).__name__} cannot be merged into the backbone: only LoRA and QLoRA learn a weight "
            "update. Prompt/prefix tuning add inputs and adapters add layers; deploy them with the exported "
            "adapter instead."
        )


def merged_model(module, dtype: str = "float32"):
    """A plain transformers model with ``module``'s LoRA folded in (``module`` itself is not changed)."""
    from peftlab.methods.qlora import QLoRA

    check_mergeable(module)
    if dtype not in DTYPES:
        raise PeftLabError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if isinstance(module, QLoRA):
        model = _dequantized_merge(module)
    else:
        model = copy.deepcopy(module.model).merge_and_unload()
    return model.to(DTYPES[dtype]).eval()


def _dequantized_merge(module):
    """Rebuild the backbone in full precision and set every 4-bit layer to dequant(W) (+ its LoRA update)."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    from peftlab.backbones import load_backbone

    h = module.hparams
    plain = load_backbone(h.backbone, module.task, num_labels=module.num_labels, dtype="float32",
                          trust_remote_code=h.trust_remote_code, revision=h.revision)
    peft_model = module.model
    prefix = "base_model.model."
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if not isinstance(layer, bnb.nn.Linear4bit):
                continue
            target = name.removeprefix(prefix).removesuffix(".base_layer")
            weight = dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state).float()
            if name.endswith(".base_layer"):
                lora = peft_model.get_submodule(name.removesuffix(".base_layer"))
                for adapter in lora.active_adapters:
                    weight = weight + lora.get_delta_weight(adapter).float()
            dest = plain.get_submodule(target)
            dest.weight.copy_(weight.to(dest.weight.dtype))
            if layer.bias is not None:
                dest.bias.copy_(layer.bias.to(dest.bias.dtype))
        # trained full copies (peft's modules_to_save, e.g. the classification head)
        for name, param in peft_model.named_parameters():
            if param.requires_grad and ".modules_to_save.default." in name:
                target = name.removeprefix(prefix).replace(".modules_to_save.default.", ".")
                plain.get_parameter(target).copy_(param)
    return plain


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
