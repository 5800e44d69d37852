"""Python API: load a finished run for inference in one call.

    from peftlab.api import load_run
    run = load_run("runs/quickstart/version_0")          # or .../adapter/best, or any exported adapter
    run.predict(["A moving, beautifully shot film.", "Dull and far too long."])
    # [{'label': 'fresh', 'probs': {'rotten': 0.08, 'fresh': 0.92}}, ...]
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from peftlab.backbones import is_decoder_only
from peftlab.errors import PeftLabError
from peftlab.export import load_adapter_weights, read_adapter_config


def _adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").is_file():
        return path
    for name in ("best", "last"):
        if (path / "adapter" / name / "adapter_config.json").is_file():
            return path / "adapter" / name
    raise PeftLabError(f"{path} is neither an exported adapter nor a run directory with adapter/best or adapter/last")


def _method_class(path: str):
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise PeftLabError(f"cannot import the adapter's method {path!r}: {err}") from err
    from peftlab.methods import PeftModule

    if not (isinstance(cls, type) and issubclass(cls, PeftModule)):
        raise PeftLabError(f"the adapter's method {path!r} is not a PeftModule subclass; refusing to build it")
    return cls


def configured_module(meta: dict, backbone: str | None = None):
    """The method module described by an adapter's ``peftlab_meta.json``, constructed but not built."""
    init_args = dict(meta["init_args"])
    init_args["task"] = meta["task"]
    init_args["num_labels"] = meta.get("num_labels")
    if backbone:
        init_args["backbone"] = backbone
    cls = _method_class(meta["method"])
    try:
        return cls(**init_args)
    except TypeError as err:  # a field the method does not take: a hand-edited or foreign peftlab_meta.json
        raise PeftLabError(f"peftlab_meta.json does not fit {cls.__name__}: {err}; export the adapter again") from err


def build_module(meta: dict, backbone: str | None = None, shared=None):
    """Rebuild the (untrained) method module described by an adapter's ``peftlab_meta.json``; ``shared``: attach it to
    this already loaded backbone (an adapter set's) instead of loading one."""
    module = configured_module(meta, backbone)
    try:
        return module.build(shared)
    except PeftLabError as err:
        if backbone and backbone != meta.get("backbone"):
            raise PeftLabError(f"the adapter was trained on {meta.get('backbone')!r} and does not fit backbone "
                               f"{backbone!r}: {err}") from err
        raise


def load_weights(module, directory) -> None:
    """Load an exported adapter's weights into ``module`` (shapes and names checked)."""
    config = read_adapter_config(directory)
    weights = load_adapter_weights(directory)
    if config.get("format") == "peftlab":
        expected = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        wrong = [k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise PeftLabError(
                f"adapter {directory} does not fit this {type(module).__name__} model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); "
                "was it trained on another backbone or with other settings?"
            )
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
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    missing = sorted(set(expected) - set(weights))
    if wrong or missing:
        raise PeftLabError(
            f"adapter {directory} does not fit this {type(module).__name__} model (wrong shape {wrong[:3]}, "
            f"missing {missing[:3]}); was it trained on another backbone or with other settings?"
        )
    if "prompt_embeddings" in weights:
        _inference_prompt(module, weights["prompt_embeddings"])
    result = set_peft_model_state_dict(module.model, weights)
    # prompt learning: peft loads `prompt_embeddings` into the prompt encoder itself, then reports the key as
    # unexpected when it loads the rest into the model
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or [] if k != "prompt_embeddings"]
    if unexpected:
        raise PeftLabError(f"adapter {directory} has weights this model does not: {unexpected[:3]}")


def _inference_prompt(module, value: torch.Tensor) -> None:
    """peft saves a prompt-learning adapter's *output* (P-tuning's encoder output, prefix tuning's projected K/V):
    load it as peft's ``from_pretrained`` does, in inference mode (peft then reads ``embedding.weight`` directly), so
    the method's untrained encoder is not applied on top of it (which gave random outputs for P-tuning and a shape
    error for projected prefixes). The encoder's reparameterization (MLP / LSTM), unused from then on, is dropped."""
    from peftlab.methods.base import count_parameters

    model = module.model
    name = model.active_adapter
    encoder = model.prompt_encoder[name]
    model.peft_config[name].inference_mode = True
    weight = encoder.embedding.weight
    for child in [n for n in encoder._modules if n != "embedding"]:
        delattr(encoder, child)
    encoder.embedding = torch.nn.Embedding(*value.shape, device=weight.device, dtype=weight.dtype)
    module.trainable_count, module.total_count = count_parameters(module)


def _peft_config_fields(config: dict) -> set[str]:
    """Every field the adapter's peft config class (by ``peft_type``) accepts."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(config.get("peft_type")))
    if cls is None:
        raise PeftLabError(f"adapter_config.json has an unknown peft_type {config.get('peft_type')!r}")
    return {f.name for f in dataclasses.fields(cls)} | {"peft_type", "auto_mapping", "task_type"}


class Run:
    """A trained method ready for inference: ``module`` (a PeftModule in eval mode) and its label names."""

    def __init__(self, module, label_names: list[str] | None, directory: Path, max_length: int = 512):
        self.module = module.eval()
        self.label_names = label_names
        self.directory = directory
        self.max_length = max_length

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 32, max_new_tokens: int | None = None) -> list[dict]:
        """Class and probabilities (classification) or generated text (causal LM / seq2seq) for each text."""
        module, tok = self.module, self.module.tokenizer
        out: list[dict] = []
        # decoder-only models read the last position (classification) or continue it (generation)
        pad_left = module.task == "causal_lm" or (module.task == "classification"
                                                  and is_decoder_only(module.hparams.backbone))
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tok.padding_side = "left" if pad_left else "right"
            batch = tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            tok.padding_side = "right"
            batch = {k: v.to(module.device) for k, v in batch.items()}
            if module.task == "classification":
                probs = module(**batch).logits.float().softmax(-1).cpu()
                names = self.label_names or [str(i) for i in range(probs.shape[1])]
                out += [{"label": names[int(p.argmax())], "probs": {n: float(q) for n, q in zip(names, p)}}
                        for p in probs]
            else:
                result = module.predict_step(batch, 0) if max_new_tokens is None else \
                    _generate(module, batch, max_new_tokens)
                out += [{"generated": t} for t in result["text"]]
        return out


def _generate(module, batch, max_new_tokens):
    saved = module.hparams.max_new_tokens
    module.hparams.max_new_tokens = max_new_tokens
    try:
        return module.predict_step(batch, 0)
    finally:
        module.hparams.max_new_tokens = saved


def read_meta(directory: Path) -> dict:
    """The ``peftlab_meta.json`` of an adapter directory."""
    meta_path = directory / "peftlab_meta.json"
    if not meta_path.is_file():
        raise PeftLabError(f"{directory} has no peftlab_meta.json; it was not exported by peftlab")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def load_adapters(adapters: dict, backbone: str | None = None, device: str | None = None):
    """Load several trained runs or exported adapters onto **one** shared backbone: an
    :class:`~peftlab.adapter_set.AdapterSet` (``predict(texts, adapter="name")``, ``switch``, ``add``, ``remove``).

    Args:
        adapters: ``{name: run directory, adapter directory or a loaded Run}``.
        backbone: use this backbone instead of the recorded one (as in :func:`load_run`).
        device: where the backbone and adapters live (default: where loading put them, usually the CPU).
    """
    from peftlab.adapter_set import AdapterSet

    return AdapterSet(adapters, backbone=backbone, device=device)


def load_run(path: str, backbone: str | None = None) -> Run:
    """Load a run directory or an exported adapter directory for inference.

    Args:
        path: ``runs/<name>/version_N`` (uses ``adapter/best``, else ``adapter/last``) or an adapter directory.
        backbone: use this backbone instead of the recorded one (e.g. a local copy of a hub model).
    """
    directory = _adapter_dir(Path(path))
    meta = read_meta(directory)
    module = build_module(meta, backbone)
    load_weights(module, directory)
    return Run(module, meta.get("label_names"), directory)
