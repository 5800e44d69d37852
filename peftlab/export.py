"""Writing adapters and merged models to disk, atomically.

Every directory is written to a temporary sibling and renamed into place, so a crash mid-write leaves
the previous good directory (or nothing), never a half-written one.

Export format (each method writes its own, :meth:`peftlab.methods.PeftModule.export`):

* peft-backed methods (LoRA, QLoRA, prompt tuning, P-tuning, prefix tuning): peft's own
  ``adapter_config.json`` + ``adapter_model.safetensors``; ``peft.PeftModel.from_pretrained(base, dir)``
  loads them without peftlab.
* other methods (full fine-tuning, bottleneck adapters, P-tuning v2 with input tokens, LoRA + prompt, your
  own): ``adapter_model.safetensors`` with the trainable parameters and an ``adapter_config.json`` with
  ``"format": "peftlab"``, the method's class path and arguments; :func:`peftlab.api.load_run` reads them.

Each directory also holds ``peftlab_config.yaml`` (the run's resolved config, when known) and a short
model card ``README.md``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from peftlab.adapters import (  # noqa: F401 - the adapter format's names, also importable from here
    load_adapter_weights,
    method_path,
    peftlab_meta,
    prompt_format,
    read_adapter_config,
    trainable_state,
    write_meta,
)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory that replaces ``target`` only when the block finishes without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def unsharded_copy(module, state: dict[str, torch.Tensor]):
    """A copy of ``module`` built on the meta device (no weights read), its trainable parameters set to ``state``:
    what a sharded module's exporter writes from, so nothing but the trainable parameters is ever gathered."""
    import warnings

    from peftlab.backbones import meta_backbones

    args = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    with warnings.catch_warnings(), meta_backbones():
        warnings.simplefilter("ignore")
        copy = type(module)(**args).build()
    params = dict(copy.model.named_parameters())
    for name, value in state.items():  # meta parameters are replaced (their data cannot be set to real tensors)
        owner, _, leaf = name.rpartition(".")
        parent = copy.model.get_submodule(owner) if owner else copy.model
        setattr(parent, leaf, torch.nn.Parameter(value.to(params[name].dtype), requires_grad=True))
    _copy_small_tensors(module.model, copy.model)
    peft_config = getattr(module.model, "peft_config", None) or getattr(getattr(module.model, "peft_model", None),
                                                                        "peft_config", None)
    copy_config = getattr(copy.model, "peft_config", None) or getattr(getattr(copy.model, "peft_model", None),
                                                                      "peft_config", None)
    if peft_config and copy_config:  # the real backbone's name, as peft recorded it
        for name, config in copy_config.items():
            config.base_model_name_or_path = peft_config[name].base_model_name_or_path
    copy.trainable_count, copy.total_count = module.trainable_count, module.total_count
    return copy


def _copy_small_tensors(real: torch.nn.Module, copy: torch.nn.Module) -> None:
    """Give the meta-built ``copy`` the real module's buffers and plain tensor attributes (e.g. peft's
    ``prompt_tokens``), which an exporter may read: they are small and never sharded."""
    from torch.distributed.tensor import DTensor

    def real_tensor(value):
        return isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.device.type != "meta"

    real_modules = dict(real.named_modules())
    for name, module in copy.named_modules():
        source = real_modules.get(name)
        if source is None:
            continue
        for key, buffer in list(module.named_buffers(recurse=False)):
            value = getattr(source, key, None)
            if buffer is not None and buffer.device.type == "meta" and real_tensor(value):
                module._buffers[key] = value.detach().cpu().clone()
        for key, value in list(vars(module).items()):
            if key.startswith("_"):
                continue
            theirs = vars(source).get(key)
            if isinstance(value, torch.Tensor) and value.device.type == "meta" and real_tensor(theirs):
                setattr(module, key, theirs.detach().cpu().clone())
            elif isinstance(value, dict) and isinstance(theirs, dict):
                for k, v in value.items():
                    if isinstance(v, torch.Tensor) and v.device.type == "meta" and real_tensor(theirs.get(k)):
                        value[k] = theirs[k].detach().cpu().clone()


def export_adapter(module, directory, *, config_yaml: str | None = None, metrics: dict | None = None,
                   label_names: list[str] | None = None, state: dict[str, torch.Tensor] | None = None,
                   prompt: dict | None = None) -> Path:
    """Write ``module``'s trained parameters to ``directory`` (atomically); return the directory.

    ``state``: the full trainable parameters of a sharded module (:func:`trainable_state`, gathered on every
    rank); the files are then written from an unsharded copy of the method (:func:`unsharded_copy`). ``prompt``:
    the prompt format inference applies, when not the trainer's data's (one task of a multi-task run)."""
    prompt = prompt or prompt_format(module)  # from the trainer's data, before a sharded module is replaced by its copy
    if state is not None:
        module = unsharded_copy(module, state)
    with atomic_directory(directory) as tmp:
        write_meta(tmp, peftlab_meta(module, label_names, prompt))
        fmt = module.export(tmp)  # the method writes its own files (peft's format or peftlab's)
        if config_yaml:
            (tmp / "peftlab_config.yaml").write_text(config_yaml)
        (tmp / "README.md").write_text(model_card(module, fmt, metrics or {}))
    return Path(directory)


def model_card(module, fmt: str, metrics: dict) -> str:
    pct = 100.0 * module.trainable_count / module.total_count
    lines = [
        f"# {type(module).__name__} adapter for {module.hparams.backbone}",
        "",
        f"- method: `{method_path(module)}`",
        f"- task: {module.task}",
        f"- trainable parameters: {module.trainable_count:,} of {module.total_count:,} ({pct:.4f}%)",
    ]
    lines += [f"- {k}: {float(v):.4f}" for k, v in sorted(metrics.items())]
    lines += ["", "## Load", ""]
    if fmt == "peft":
        lines += ["With plain peft:", "", "```python", "from peft import PeftModel",
                  "model = PeftModel.from_pretrained(base_model, \"<this directory>\")", "```", ""]
    lines += ["With peftlab (rebuilds the backbone from `peftlab_config.yaml` or the adapter config):", "",
              "```python", "from peftlab.api import load_run", "run = load_run(\"<this directory>\")",
              "run.predict([\"a text\"])", "```", ""]
    lines += ["## Serve", "", "With peftlab, beside other adapters of the same backbone (OpenAI-compatible):", "",
              "```bash", "peftlab serve NAME=<this directory>", "```", ""]
    refusal = module.serving_engine_refusal()
    if refusal:
        lines += [f"Not loadable by vLLM: {refusal}.", ""]
    else:
        lines += ["vLLM's multi-LoRA server loads it (add `--max-lora-rank R` for a rank above 16):", "", "```bash",
                  f"vllm serve {module.hparams.backbone} --enable-lora --lora-modules NAME=<this directory>", "```", ""]
    return "\n".join(lines)
