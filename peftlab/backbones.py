"""Loading backbones and tokenizers for a task, with errors that say what to do."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import TYPE_CHECKING, Literal

from peftlab.assets import is_packaged, resolve_model
from peftlab.errors import PeftLabError

if TYPE_CHECKING:  # torch loads only when a backbone does
    from torch import nn

Task = Literal["classification", "causal_lm", "seq2seq"]
TASKS = ("classification", "causal_lm", "seq2seq")
#: the weight dtypes peftlab takes by name (``torch.<name>``), and the short names trainer precisions use
DTYPES = ("float32", "bfloat16", "float16")
SHORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The ``torch.dtype`` called ``name`` (a name of :data:`DTYPES` or :data:`SHORT_DTYPES`), or one line listing
    the choices."""
    key = SHORT_DTYPES.get(name, name)
    if key not in DTYPES:
        raise PeftLabError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    import torch

    return getattr(torch, key)


def _auto_class(task: str):
    import transformers

    return {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[task]


def _load_error(what: str, name: str, err: Exception) -> PeftLabError:
    hint = (
        "Give a local model directory, a packaged model (packaged:all-MiniLM-L6-v2, "
        "packaged:SmolLM2-135M-Instruct) or a Hugging Face hub name (needs internet)."
    )
    if not is_packaged(name) and name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        return PeftLabError(f"{what} {name!r}: no such directory. {hint}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PeftLabError(f"could not load {what} {name!r}: {first}. {hint}")


_META = {"active": False, "hide_bitsandbytes": False}


def hide_bitsandbytes_during_meta_builds() -> None:
    """Let the meta-device builds of this process (:func:`meta_backbones`) run without importing bitsandbytes.

    For a process that only counts on the meta device and then exits (``peftlab params``, ``estimate-memory``,
    ``recommend`` run from the console): peft imports bitsandbytes whenever it is installed (``peft.helpers`` at
    import, the LoRA dispatch at injection), and bitsandbytes probes its native backends at import, about 0.8 s of
    the ~5 s such a command takes (docs/benchmarks.md, section 6). Nothing built on the meta device is quantized (a
    QLoRA backbone counts its 4-bit weights analytically, :meth:`QLoRA.quantized_weights`), so the counts are the
    same (``tests/test_analysis.py`` compares both ways). Not for a process that goes on to train: peft and
    transformers cache "bitsandbytes is not installed" for the rest of the process, so ``main()`` enables this only
    for the console script's meta-only commands, never for in-process calls."""
    _META["hide_bitsandbytes"] = True


@contextlib.contextmanager
def meta_backbones():
    """Inside this context, :func:`load_backbone` builds models from their config alone on the meta device
    (no weights read, no memory used) and :func:`load_tokenizer` returns None. ``peftlab params`` uses it
    to count parameters of any backbone size through the same code path as training."""
    previous = _META["active"]
    _META["active"] = True
    # sys.modules[name] = None makes `import name` fail and importlib.util.find_spec(name) answer None, which is
    # how peft and transformers ask whether bitsandbytes is installed; an already imported bitsandbytes stays
    hide = _META["hide_bitsandbytes"] and "bitsandbytes" not in sys.modules
    if hide:
        sys.modules["bitsandbytes"] = None
    try:
        yield
    finally:
        _META["active"] = previous
        if hide and sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]


def building_on_meta() -> bool:
    return _META["active"]


def check_remote_code(name: str, path: str, trust_remote_code: bool) -> None:
    """Refuse a local model directory that needs its own Python code unless the user trusts it explicitly
    (for hub names transformers itself refuses without ``trust_remote_code``)."""
    config_file = os.path.join(path, "config.json")
    if trust_remote_code or not os.path.isfile(config_file):
        return
    import json

    from transformers import CONFIG_MAPPING

    try:
        config = json.loads(open(config_file, encoding="utf-8").read())
    except (OSError, ValueError) as err:
        raise PeftLabError(f"backbone {name!r}: {config_file} is not valid JSON ({err})") from err
    if config.get("model_type") not in CONFIG_MAPPING and (config.get("auto_map") or
                                                           any(f.endswith(".py") for f in os.listdir(path))):
        raise PeftLabError(
            f"backbone {name!r} (model_type {config.get('model_type')!r}) needs its own Python code, which peftlab "
            "does not run by default; set model.trust_remote_code: true only if you trust where the model came from"
        )


def load_tokenizer(name: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """Tokenizer of backbone ``name``, with a pad token (EOS when the model has none) and right padding."""
    from transformers import AutoTokenizer

    if _META["active"]:
        return None
    path = resolve_model(name)
    check_remote_code(name, path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/EnvironmentError variously
        raise _load_error("tokenizer of backbone", name, err) from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise PeftLabError(f"tokenizer of {name!r} has neither a pad nor an EOS token; add one to the tokenizer")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_backbone(
    name: str,
    task: str,
    *,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs,
):
    """The transformers model of ``name`` with the head of ``task`` (extra kwargs go to ``from_pretrained``)."""
    if task not in TASKS:
        raise PeftLabError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classification":
        if not num_labels or num_labels < 2:
            raise PeftLabError(
                f"classification needs num_labels >= 2 (got {num_labels}); the CLI takes it from the data, "
                "in Python pass num_labels=datamodule.num_labels"
            )
        kwargs["num_labels"] = num_labels
    import torch

    dtype = kwargs.pop("dtype", "float32")
    kwargs["dtype"] = dtype if dtype == "auto" else torch_dtype(dtype) if isinstance(dtype, str) else dtype
    path = resolve_model(name)
    check_remote_code(name, path, trust_remote_code)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001
        raise _load_error("backbone", name, err) from err
    auto = _auto_class(task)
    if type(config) not in auto._model_mapping and not trust_remote_code:
        heads = [t for t in TASKS if type(config) in _auto_class(t)._model_mapping]
        raise PeftLabError(
            f"backbone {name!r} (model_type {config.model_type!r}) has no {task} head; "
            f"it supports: {', '.join(heads) or 'none of ' + ', '.join(TASKS)}. "
            "Change data.task or pick a backbone made for this task."
        )
    if _META["active"]:
        kwargs.pop("quantization_config", None)  # 4-bit weights count as their unpacked parameters
        kwargs.pop("device_map", None)
        kwargs.pop("dtype", None)
        for key, value in kwargs.items():
            setattr(config, key, value)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
        return model
    try:
        model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise _load_error("backbone", name, err) from err
    if task == "classification" and model.config.pad_token_id is None:
        # decoder-only classifiers find the last token through pad_token_id
        tok = load_tokenizer(name, trust_remote_code=trust_remote_code, revision=revision)
        model.config.pad_token_id = tok.pad_token_id
    return model


def is_decoder_only(name: str, *, trust_remote_code: bool = False) -> bool:
    """True for GPT/Llama-style models (no encoder); False for BERT-style encoders and encoder-decoders."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise _load_error("backbone", name, err) from err
    return not getattr(config, "is_encoder_decoder", False) and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


HEAD_NAMES = ("classifier", "score", "classification_head")


def classification_head(model: nn.Module) -> nn.Module:
    """The classification head of a ``*ForSequenceClassification`` model (``classifier``, ``score``, ...)."""
    from torch import nn

    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise PeftLabError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(HEAD_NAMES)}); "
        "set train_head = False on the method and make the head trainable in attach()"
    )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in the transformers model inside ``model`` (peft-wrapped or not)."""
    inner = getattr(model, "peft_model", model)  # the input-tokens wrapper (P-tuning v2, stacks with input tokens)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise PeftLabError(f"model.gradient_checkpointing: {type(inner).__name__} does not support it; turn it off")
    # non-reentrant checkpointing needs no input that requires grad, so it works with a frozen embedding
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name (the old one warns)
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked number."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:  # bitsandbytes Params4bit packs 2 per byte
            n = math.prod(p.quant_state.shape)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
