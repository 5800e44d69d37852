"""Loading backbones and tokenizers for a task, with errors that say what to do."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import warnings
from typing import TYPE_CHECKING, Literal

from peftlab.assets import is_packaged, resolve_model
from peftlab.errors import PeftLabError

if TYPE_CHECKING:  # torch loads only when a backbone does
    from torch import nn

Task = Literal["classification", "causal_lm", "seq2seq"]
TASKS = ("classification", "causal_lm", "seq2seq")
DataTask = Literal["classification", "causal_lm", "seq2seq", "chat"]
DATA_TASKS = (*TASKS, "chat")


def model_task(data_task: str) -> str:
    """The model task a data task trains: chat data trains a causal LM (its turns rendered by a chat template)."""
    return "causal_lm" if data_task == "chat" else data_task


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


_META = {"active": False, "hide_bitsandbytes": False, "sharded": False}


def hide_bitsandbytes_during_meta_builds() -> None:
    """Let the meta-device builds of this process (:func:`meta_backbones`) run without importing bitsandbytes.

    For a process that only counts on the meta device and then exits (``peftlab params``, ``estimate-memory``,
    ``recommend`` run from the console): peft imports bitsandbytes whenever it is installed (``peft.helpers`` at
    import, the LoRA dispatch at injection), and bitsandbytes probes its native backends at import, about 0.8 s of
    the ~5 s such a command takes (docs/benchmarks.md, section 6). Nothing built on the meta device is quantized (a
    QLoRA backbone counts its 4-bit weights analytically, :meth:`QLoRA.quantized_weights`), so the counts are the
    same (``tests/integration/test_analysis_runs.py`` compares both ways). Not for a process that goes on to train: peft and
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
    if _META["sharded"] and "quantization_config" not in kwargs and revision is None:
        model = _deferred_backbone(name, auto, config, path, dict(kwargs), trust_remote_code)
        if model is not None:
            return _with_pad_token(model, name, task, trust_remote_code, revision)
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
        warnings.warn(f"backbone {name!r}: {len(missing)} of its weights are not in the checkpoint and were newly "
                      f"initialised ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})", stacklevel=2)
    return _with_pad_token(model, name, task, trust_remote_code, revision)


def _with_pad_token(model, name, task, trust_remote_code, revision):
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


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``: through the input-tokens wrapper (P-tuning v2, stacks with input
    tokens: ``.peft_model``) and a peft model (``get_base_model()``); ``model`` itself when it is neither."""
    inner = getattr(model, "peft_model", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in the transformers model inside ``model`` (peft-wrapped or not)."""
    inner = transformers_model(model)
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


# ---------------------------------------------------------------------------------------------- sharded start
@contextlib.contextmanager
def sharded_start(enabled: bool = True):
    """Inside this context, :func:`load_backbone` builds the model from its config without reading its weights
    (for ``FSDP2Strategy(sharded_start=true)``): each frozen parameter is an uninitialized placeholder on the CPU
    that is never written, so it takes no memory (on the meta device instead, peft would move the method's new
    trainable parameters there too and lose their initial values), buffers are computed as usual, and where the
    weights are is recorded. After ``fully_shard``,
    :func:`load_shards` reads each rank's rows of each tensor from the safetensors files: no rank ever holds
    more than its shards. Backbones it cannot do this for (no safetensors file, quantized) load in full."""
    previous = _META["sharded"]
    _META["sharded"] = enabled
    try:
        yield
    finally:
        _META["sharded"] = previous


def sharding_at_start() -> bool:
    return _META["sharded"]


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside go to the meta device as soon as they are registered; buffers stay real (the
    rotary embeddings' ``inv_freq`` is computed in ``__init__`` and is not in the checkpoint)."""
    from torch import nn

    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _safetensors_files(path: str) -> dict[str, str] | None:
    """Checkpoint key -> safetensors file of the model directory ``path``; None when it has none."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = json.loads(open(index, encoding="utf-8").read())["weight_map"]
        return {key: os.path.join(path, file) for key, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        return None
    return {key: single for key in _safetensors_header(single)[0] if key != "__metadata__"}


def _safetensors_header(file: str) -> tuple[dict, int]:
    """(the header of a safetensors file, the byte offset its data starts at)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


class DeferredWeights:
    """Where the frozen parameters of a backbone built by :func:`sharded_start` are: (module, attribute name,
    checkpoint key) for each, and the key's safetensors file."""

    def __init__(self, name: str, files: dict[str, str], targets: list):
        self.name, self.files, self.targets = name, files, targets


def _deferred_backbone(name, auto, config, path, kwargs, trust_remote_code):
    """The model of ``config`` with placeholders for its checkpoint's weights (see :func:`sharded_start`)."""
    import torch
    from torch import nn

    files = _safetensors_files(path)
    if files is None:
        return None
    dtype = kwargs.pop("dtype")
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if "num_labels" in kwargs:
        config.num_labels = kwargs.pop("num_labels")
    with _parameters_on_meta():
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    model.config.name_or_path = path  # what from_pretrained records (peft writes it into adapter_config.json)
    with contextlib.suppress(Exception):  # (a model without generation_config.json keeps the default one)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    prefix = getattr(model, "base_model_prefix", "")
    owners = {}  # id(parameter) -> [(module, attribute)], tied parameters have several
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    targets, missing = [], []
    for param_name, p in list(model.named_parameters()):  # (tied parameters once, under their first name)
        key = next((k for k in (param_name, param_name.removeprefix(f"{prefix}."), f"{prefix}.{param_name}")
                    if k in files), None)
        # uninitialized: the kernel gives a large allocation pages only when they are written, and nothing
        # writes these (fully_shard copies each rank's chunk out of it, read as zero pages, then frees it)
        placeholder = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for module, attr in owners[id(p)]:
            module._parameters[attr] = placeholder
        if key is None:
            missing.append(param_name)
        else:
            targets.append((*owners[id(p)][0], key))
    if missing:  # new weights (a classification head): initialized on every rank alike, as from_pretrained does
        own = [k for k in missing if k.startswith(f"{prefix}.")]  # the backbone's own: said, as load_backbone does
        if own:
            warnings.warn(f"backbone {name!r}: {len(own)} of its weights are not in the checkpoint and were newly "
                          f"initialised ({', '.join(own[:3])}{', ...' if len(own) > 3 else ''})", stacklevel=3)
        modules = dict(model.named_modules())
        for param_name in missing:
            module_name, _, attr = param_name.rpartition(".")
            module = modules[module_name]
            if any(f"{module_name}.{a}".lstrip(".") not in missing for a, q in module._parameters.items()
                   if q is not None):
                raise PeftLabError(
                    f"backbone {name!r}: {param_name} is not in its checkpoint while other weights of "
                    f"{module_name} are; start without model sharding (strategy init_args.sharded_start: false)")
            module._parameters[attr] = nn.Parameter(torch.empty(module._parameters[attr].shape, dtype=dtype))
        for module_name in {n.rpartition(".")[0] for n in missing}:
            model._init_weights(modules[module_name])
    model.peftlab_deferred_weights = DeferredWeights(name, files, targets)
    return model


#: safetensors dtype names -> torch dtype names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def has_deferred_weights(model) -> bool:
    return any("peftlab_deferred_weights" in m.__dict__ for m in model.modules())


def load_shards(model) -> int:
    """Fill the sharded placeholders of a backbone built by :func:`sharded_start`, after ``fully_shard``: each
    rank reads only its rows (FSDP2 shards dim 0 in ``torch.chunk``'s pieces) of each tensor from the
    safetensors files, converted to the parameter's dtype. Returns the number of tensors filled."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    filled = 0
    for owner in [m for m in model.modules() if "peftlab_deferred_weights" in m.__dict__]:
        record = owner.__dict__.pop("peftlab_deferred_weights")
        headers = {file: _safetensors_header(file) for file in set(record.files.values())}
        handles = {file: open(file, "rb") for file in headers}  # noqa: SIM115 - closed below
        try:
            for module, attr, key in record.targets:
                param = module._parameters[attr]
                if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
                    raise PeftLabError(
                        f"backbone {record.name!r}: {key} was not sharded (placements "
                        f"{getattr(param, 'placements', None)}); only FSDP2Strategy's per-block sharding can fill "
                        "it: set the strategy's sharded_start: false")
                file = record.files[key]
                header, data_start = headers[file]
                info = header[key]
                if list(info["shape"]) != list(param.shape):
                    raise PeftLabError(f"backbone {record.name!r}: {key} has shape {info['shape']} in {file}, the "
                                       f"model's config gives {list(param.shape)}")
                local = param.to_local()
                mesh = param.device_mesh
                rows, world = param.shape[0], mesh.size()
                start = min(mesh.get_local_rank() * math.ceil(rows / world), rows)
                file_dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
                row_bytes = math.prod(param.shape[1:]) * torch.empty((), dtype=file_dtype).element_size()
                f = handles[file]
                f.seek(data_start + info["data_offsets"][0] + start * row_bytes)
                # straight into the shard when the dtypes agree, else through a buffer of at most 16 MB
                direct = file_dtype == local.dtype and local.is_contiguous()
                step = max(local.shape[0], 1) if direct else max(1, (16 << 20) // max(row_bytes, 1))
                for first in range(0, local.shape[0], step):
                    rows_here = local[first:first + step]
                    target = rows_here if direct else torch.empty(rows_here.shape, dtype=file_dtype)
                    size = rows_here.shape[0] * row_bytes
                    if f.readinto(memoryview(target.detach().view(torch.uint8).numpy()).cast("B")) != size:
                        raise PeftLabError(f"backbone {record.name!r}: {file} ends inside {key}; it is truncated")
                    if target is not rows_here:
                        with torch.no_grad():
                            rows_here.copy_(target)
                filled += 1
        finally:
            for handle in handles.values():
                handle.close()
    return filled
