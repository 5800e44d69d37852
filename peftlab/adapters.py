"""The adapter format on disk: everything written to and read from an adapter directory, in one place.

An adapter directory (``<run>/adapter/best``, ``peftlab export-lora``'s output) holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: peft's own format for peft-backed methods
  (``peft.PeftModel.from_pretrained(base, dir)`` loads them), or peftlab's for the others
  (:func:`write_peftlab_adapter`: the trainable parameters and ``"format": "peftlab"``);
* ``peftlab_meta.json``: what :func:`peftlab.api.load_run` needs to rebuild the method (:func:`peftlab_meta`).

This module imports nothing from :mod:`peftlab.methods`: methods, exporters and loaders all call it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftlab.errors import PeftLabError
from peftlab.runinfo import run_record

#: path segments that FSDP, activation checkpointing and torch.compile insert into module paths
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
META_FILE = "peftlab_meta.json"
#: peftlab's task -> peft's ``task_type`` (recorded in a peft adapter's ``adapter_config.json``)
PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def unwrapped_name(name: str) -> str:
    """``name`` without the path segments that FSDP, activation checkpointing and torch.compile insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def method_path(module) -> str:
    """The class path of ``module``'s method, as ``peftlab_meta.json`` records it."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def trainable_state(module) -> dict[str, torch.Tensor]:
    """Trainable parameters of ``module.model`` by checkpoint name, as full contiguous CPU tensors.

    Under FSDP2 each DTensor is gathered from every rank (``full_tensor``): a collective, so every rank calls this;
    the frozen backbone is never gathered."""
    out = {}
    for name, param in module.model.named_parameters():
        if param.requires_grad:
            value = param.detach()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[unwrapped_name(name)] = value.cpu().contiguous()
    return out


# ---------------------------------------------------------------------------------------------- peftlab_meta.json
def prompt_format(module) -> dict | None:
    """The prompt format of the data ``module`` trains on (``PeftDataModule.prompt_format``), or ``None``."""
    try:
        datamodule = getattr(module.trainer, "datamodule", None)
    except RuntimeError:  # not attached to a Trainer
        return None
    describe = getattr(datamodule, "prompt_format", None)
    return describe() if callable(describe) else None


def peftlab_meta(module, label_names: list[str] | None = None, prompt: dict | None = None) -> dict:
    """What :func:`peftlab.api.load_run` needs to rebuild the module: method, its arguments, task, labels, and
    the prompt format inference applies (``prompt_format``: chat template or prompt/response templates)."""
    # LightningCLI adds private keys such as _class_path; task and num_labels are stored on their own
    hparams = {k: v for k, v in dict(module.hparams).items()
               if not k.startswith("_") and k not in ("task", "num_labels") and _jsonable(v)}
    return {"method": method_path(module), "init_args": hparams, "task": module.task,
            "num_labels": module.num_labels, "label_names": label_names, "backbone": module.hparams.backbone,
            "trainable": module.trainable_count, "total": module.total_count, "run": run_record(),
            "prompt_format": prompt}


def write_meta(directory, meta: dict) -> None:
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(directory, needed_for: str | None = None) -> dict:
    """``peftlab_meta.json`` of an adapter directory; one line (naming what ``needed_for`` it) when it has none."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise PeftLabError(f"{directory} has no {META_FILE}; it was not exported by peftlab"
                           + (f"; {needed_for} needs it" if needed_for else ""))
    return json.loads(path.read_text(encoding="utf-8"))


def rewrite_meta(directory, method: str | None = None, init_args: dict | None = None, **extra) -> None:
    """Update ``peftlab_meta.json`` in an export directory (``export_adapter`` writes it before calling the method's
    ``export``) so that :func:`peftlab.api.load_run` rebuilds what was exported: ``method`` (a class path) and
    ``init_args`` updates; the method trained is kept under ``converted_from``. No-op without the file."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return
    meta = json.loads(path.read_text(encoding="utf-8"))
    if method and method != meta["method"]:
        meta["converted_from"] = {"method": meta["method"], "init_args": dict(meta["init_args"])}
        meta["method"] = method
    meta["init_args"].update(init_args or {})
    meta.update(extra)
    path.write_text(json.dumps(meta, indent=2))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------- adapter files
def write_peftlab_adapter(module, directory) -> str:
    """peftlab's format: ``adapter_model.safetensors`` with the trainable parameters and an
    ``adapter_config.json`` with ``"format": "peftlab"``, which :func:`peftlab.api.load_run` reads."""
    from safetensors.torch import save_file

    save_file(trainable_state(module), str(Path(directory) / "adapter_model.safetensors"))
    (Path(directory) / "adapter_config.json").write_text(json.dumps(
        {"format": "peftlab", "method": method_path(module), "base_model_name_or_path": module.hparams.backbone,
         "task": module.task}, indent=2))
    return "peftlab"


def adapter_directory(path: Path) -> Path:
    """The exported adapter in ``path``: ``path`` itself, or a run directory's ``adapter/best``, else ``adapter/last``
    (a multi-task export, one adapter per task in subdirectories, counts as one: :func:`task_directories`)."""
    def exported(directory: Path) -> bool:
        return (directory / "adapter_config.json").is_file() or bool(task_directories(directory))

    if exported(path):
        return path
    for name in ("best", "last"):
        if exported(path / "adapter" / name):
            return path / "adapter" / name
    raise PeftLabError(f"{path} is neither an exported adapter nor a run directory with adapter/best or adapter/last")


def task_directories(directory) -> dict[str, Path] | None:
    """A multi-task export's ``{task: its adapter directory}`` (``peftlab_meta.json`` lists ``tasks``, each exported
    in a subdirectory of that name); None for an export of one adapter."""
    path = Path(directory) / META_FILE
    tasks = json.loads(path.read_text(encoding="utf-8")).get("tasks") if path.is_file() else None
    return {name: Path(directory) / name for name in tasks} if tasks else None


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


def state_mismatch(expected: dict, got: dict, *, shapes: bool = True) -> str:
    """What keeps the tensors ``got`` from loading into ``expected`` (both ``{name: tensor or shape}``): the
    missing, unexpected and wrong-shape names (three of each), or "" when they fit. ``shapes`` False: names only
    (a sharded rank holds flat shards)."""
    def shape(value):
        return tuple(getattr(value, "shape", value))

    absent = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if shape(got[k]) != shape(expected[k])) if shapes else []
    return "; ".join(f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                     (("missing", absent), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)


def load_weights(module, directory) -> None:
    """Load an exported adapter's weights into the built ``module`` (shapes and names checked)."""
    config = read_adapter_config(directory)
    weights = load_adapter_weights(directory)
    if config.get("format") == "peftlab":
        expected = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
        _refuse_mismatch(module, directory, state_mismatch(expected, weights))
        with torch.no_grad():
            for name, value in weights.items():
                expected[name].copy_(value)
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    unknown = sorted(set(config) - _peft_config_fields(config))
    if unknown:
        raise PeftLabError(f"adapter {directory}: adapter_config.json has fields peft does not know: {unknown[:5]}; "
                           "it was written by another peft version or edited by hand")
    expected = get_peft_model_state_dict(module.model)
    # peft reports keys it does not know after loading (below): only what is missing or misshapen here
    known = {k: v for k, v in weights.items() if k in expected}
    _refuse_mismatch(module, directory, state_mismatch(expected, known))
    if "prompt_embeddings" in weights:
        _inference_prompt(module, weights["prompt_embeddings"])
    result = set_peft_model_state_dict(module.model, weights)
    # prompt learning: peft loads `prompt_embeddings` into the prompt encoder itself, then reports the key as
    # unexpected when it loads the rest into the model
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or [] if k != "prompt_embeddings"]
    if unexpected:
        raise PeftLabError(f"adapter {directory} has weights this model does not: {unexpected[:3]}")


def _refuse_mismatch(module, directory, mismatch: str) -> None:
    if mismatch:
        raise PeftLabError(f"adapter {directory} does not fit this {type(module).__name__} model ({mismatch}); was "
                           "it trained on another backbone or with other settings?")


def _inference_prompt(module, value: torch.Tensor) -> None:
    """peft saves a prompt-learning adapter's *output* (P-tuning's encoder output, prefix tuning's projected K/V):
    load it as peft's ``from_pretrained`` does, in inference mode (peft then reads ``embedding.weight`` directly), so
    the method's untrained encoder is not applied on top of it (which gave random outputs for P-tuning and a shape
    error for projected prefixes). The encoder's reparameterization (MLP / LSTM), unused from then on, is dropped."""
    model = module.model
    name = model.active_adapter
    encoder = model.prompt_encoder[name]
    model.peft_config[name].inference_mode = True
    weight = encoder.embedding.weight
    before = sum(p.numel() for p in encoder.parameters())
    for child in [n for n, _ in encoder.named_children() if n != "embedding"]:
        delattr(encoder, child)
    encoder.embedding = torch.nn.Embedding(*value.shape, device=weight.device, dtype=weight.dtype)
    change = sum(p.numel() for p in encoder.parameters()) - before  # every parameter of the encoder trains
    module.trainable_count += change
    module.total_count += change


def _peft_config_fields(config: dict) -> set[str]:
    """Every field the adapter's peft config class (by ``peft_type``) accepts."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(config.get("peft_type")))
    if cls is None:
        raise PeftLabError(f"adapter_config.json has an unknown peft_type {config.get('peft_type')!r}")
    return {f.name for f in dataclasses.fields(cls)} | {"peft_type", "auto_mapping", "task_type"}
