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
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from peftlab.errors import PeftLabError
from peftlab.runinfo import run_record


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


def method_path(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def trainable_state(module) -> dict[str, torch.Tensor]:
    """Trainable parameters of ``module.model`` by name (contiguous CPU copies, ready for safetensors)."""
    from peftlab.methods.base import unwrapped_name

    return {unwrapped_name(n): p.detach().cpu().contiguous() for n, p in module.model.named_parameters()
            if p.requires_grad}


def peftlab_meta(module, label_names: list[str] | None = None) -> dict:
    """What :func:`peftlab.api.load_run` needs to rebuild the module: method, its arguments, task, labels."""
    # LightningCLI adds private keys such as _class_path; task and num_labels are stored on their own
    hparams = {k: v for k, v in dict(module.hparams).items()
               if not k.startswith("_") and k not in ("task", "num_labels") and _jsonable(v)}
    return {"method": method_path(module), "init_args": hparams, "task": module.task,
            "num_labels": module.num_labels, "label_names": label_names, "backbone": module.hparams.backbone,
            "trainable": module.trainable_count, "total": module.total_count, "run": run_record()}


def export_adapter(module, directory, *, config_yaml: str | None = None, metrics: dict | None = None,
                   label_names: list[str] | None = None) -> Path:
    """Write ``module``'s trained parameters to ``directory`` (atomically); return the directory."""
    with atomic_directory(directory) as tmp:
        (tmp / "peftlab_meta.json").write_text(json.dumps(peftlab_meta(module, label_names), indent=2))
        fmt = module.export(tmp)  # the method writes its own files (peft's format or peftlab's)
        if config_yaml:
            (tmp / "peftlab_config.yaml").write_text(config_yaml)
        (tmp / "README.md").write_text(model_card(module, fmt, metrics or {}))
    return Path(directory)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


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
    return "\n".join(lines)


def read_adapter_config(directory) -> dict:
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise PeftLabError(f"{directory} is not an adapter directory: it has no adapter_config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PeftLabError(f"{path} is not valid JSON ({err}); the adapter is corrupt, export it again") from err


def load_adapter_weights(directory) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (never a pickle), with a clear error when corrupt."""
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise PeftLabError(f"{directory} has no adapter_model.safetensors; export the adapter again")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises SafetensorError / OSError on bad files
        raise PeftLabError(f"{path} is corrupt or not a safetensors file ({err}); export the adapter again") from err
