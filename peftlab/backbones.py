"""Loading backbones and tokenizers for a task, with errors that say what to do."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Literal

from peftlab.assets import is_packaged, resolve_model
from peftlab.errors import PeftLabError

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


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report and weight-loading bar off for one load (restored after it)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


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
        with _quiet_transformers():
            model, info = auto.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision,
                                               output_loading_info=True, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise _load_error("backbone", name, err) from err
    # transformers reports the task head as MISSING on every load (it is new, or comes from the adapter next);
    # a missing weight of the backbone itself is a real problem, said in one line
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(f"{model.base_model_prefix}.")]
    if missing:
        import warnings

        warnings.warn(f"backbone {name!r}: {len(missing)} of its weights are not in the checkpoint and were newly "
                      f"initialised ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})", stacklevel=2)
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
