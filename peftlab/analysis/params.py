"""``peftlab params``: exact trainable/total parameter counts of a config, without loading any weights.

The config is read by the same parser as ``peftlab fit`` (so layered configs and ``--model.*`` overrides
mean exactly what they mean for training) and the method is built by the same code inside
:func:`peftlab.backbones.meta_backbones`: the backbone comes from its ``config.json`` alone, on the meta
device, so a 70B model costs seconds and no memory::

    peftlab params --config configs/quickstart.yaml --config configs/methods/lora.yaml
    peftlab params --config experiments/param_efficiency/lora_r8_qv.yaml --json
    peftlab params --config configs/quickstart.yaml --backbone llama-2-70b --data.task causal_lm \\
        --model.target_modules '[q_proj, v_proj]'

The backbone (``--backbone`` or ``model.backbone``) may be a model directory with a ``config.json``, a
``config.json`` file, a name shipped in ``configs/backbones/`` (``llama-2-7b``, ``roberta-base``, ...),
a packaged model (``packaged:all-MiniLM-L6-v2``) or a Hugging Face hub name (fetches the config only).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftLabError, did_you_mean

#: configs/backbones/<name>/config.json shipped with the repository (architecture numbers only)
SHIPPED_BACKBONES = Path(__file__).resolve().parents[2] / "configs" / "backbones"
#: bytes per stored parameter of an adapter file (safetensors adds a small JSON header on top)
FILE_DTYPES = {"fp32": 4, "bf16": 2}


def shipped_backbones() -> list[str]:
    """Names of the backbone shapes in ``configs/backbones/``."""
    if not SHIPPED_BACKBONES.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_BACKBONES.iterdir() if (p / "config.json").is_file())


def resolve_backbone(name: str) -> str:
    """The path or name that :func:`peftlab.backbones.load_backbone` should get for ``name``.

    Existing directories and ``.json`` files are used as they are; a shipped shape name maps to
    ``configs/backbones/<name>``; ``packaged:...`` and hub names pass through unchanged.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise PeftLabError(f"backbone {name!r} is a directory without config.json; point at a model directory or "
                               f"a config.json file, or use a shipped shape ({', '.join(shipped_backbones())})")
        return path
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise PeftLabError(f"backbone {name!r} is a file but not a config.json; give the model's config.json "
                               "or its directory")
        return path
    for shipped in (SHIPPED_BACKBONES / name, SHIPPED_BACKBONES.parents[1] / name):  # "llama-2-7b", "configs/..."
        if not os.path.isabs(name) and (shipped / "config.json").is_file():
            return str(shipped)
    if name.startswith((".", "/", "~")) or name.endswith(".json"):
        raise PeftLabError(f"backbone {name!r}: no such file or directory. Shipped shapes: "
                           f"{', '.join(shipped_backbones())}.{did_you_mean(Path(name).name, shipped_backbones())}")
    return name


@dataclass
class MethodSpec:
    """What ``fit`` would build: the method class and its arguments, plus the data/trainer settings."""

    class_path: str
    init_args: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.class_path.rsplit(".", 1)[-1]

    @property
    def task(self) -> str:
        return self.init_args["task"]


def parse_fit_config(args: list[str], prog: str = "peftlab params") -> MethodSpec:
    """Parse ``args`` (``--config FILE``, ``--model.*`` / ``--data.*`` overrides) with ``peftlab fit``'s parser.

    Nothing is instantiated: no data is read, no model is loaded.
    """
    from jsonargparse import Namespace

    from peftlab.cli import make_cli_class
    from peftlab.data import PeftDataModule
    from peftlab.methods import PeftModule

    class ParseOnly(make_cli_class()):
        def instantiate_classes(self) -> None:  # parse and link only
            pass

        def _set_seed(self) -> None:
            pass

    saved, sys.argv = sys.argv, [prog]  # LightningCLI warns when sys.argv and args both carry arguments
    try:
        cli = ParseOnly(PeftModule, PeftDataModule, subclass_mode_model=True, run=False, args=args,
                        auto_configure_optimizers=False,
                        parser_kwargs={"default_env": False, "prog": prog, "exit_on_error": False})
    except argparse.ArgumentError as err:
        from peftlab.cli_errors import one_line

        raise PeftLabError(f"{one_line(str(err))} (in the config files or overrides given to {prog}; "
                           "`peftlab fit --model.help LoRA` lists a method's arguments)") from err
    finally:
        sys.argv = saved
    cfg = cli.config

    def plain(value: Any) -> Any:
        return value.as_dict() if isinstance(value, Namespace) else (value if value is not None else {})

    model = cfg.get("model")
    if model is None or not model.get("class_path"):
        raise PeftLabError(f"no method configured; give {prog} --config FILE with a model section "
                           "(class_path + init_args), e.g. --config configs/quickstart.yaml")
    return MethodSpec(model.class_path, plain(model.get("init_args")), plain(cfg.get("data")),
                      plain(cfg.get("trainer")))


def build_meta(spec: MethodSpec, num_labels: int | None = None):
    """Instantiate the method of ``spec`` on the meta device (the training code path, no weights)."""
    from peftlab.backbones import meta_backbones
    from peftlab.methods.registry import import_method

    cls = import_method(spec.class_path)
    kwargs = dict(spec.init_args)
    kwargs["backbone"] = resolve_backbone(kwargs.get("backbone", "packaged:all-MiniLM-L6-v2"))
    if kwargs.get("task", "classification") == "classification":
        labels = spec.data.get("labels")
        kwargs["num_labels"] = num_labels or (len(labels) if labels else 2)
    if kwargs.get("num_labels") is not None and kwargs["num_labels"] < 2:
        raise PeftLabError(f"--num_labels must be >= 2 (got {kwargs['num_labels']})")
    _quiet()
    with warnings.catch_warnings(), meta_backbones():
        warnings.simplefilter("ignore")
        try:
            return cls(**kwargs).build()
        except PeftLabError as err:
            if "could not load backbone" in str(err) and not os.path.exists(kwargs["backbone"]):
                raise PeftLabError(f"{err} Shapes that need no download: {', '.join(shipped_backbones())}.") from err
            raise


def _quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class ParamReport:
    """Exact parameter counts of one configured method."""

    method: str
    class_path: str
    backbone: str
    task: str
    trainable: int
    total: int
    percent: float
    bytes_fp32: int
    bytes_bf16: int
    parts: dict[str, int]

    def lines(self) -> list[str]:
        rows = [
            ("method", f"{self.method} ({self.class_path})"),
            ("backbone", f"{self.backbone} ({self.task})"),
            ("trainable", f"{self.trainable:,}"),
            ("total", f"{self.total:,}"),
            ("trainable %", f"{self.percent:.4g}%"),
            ("file fp32", f"{self.bytes_fp32:,} bytes ({human_bytes(self.bytes_fp32)})"),
            ("file bf16", f"{self.bytes_bf16:,} bytes ({human_bytes(self.bytes_bf16)})"),
        ]
        if self.parts:
            rows.append(("parts", "; ".join(f"{k}: {v:,}" for k, v in self.parts.items())))
        return [f"{k:<12} {v}" for k, v in rows]


def report(module, spec: MethodSpec) -> ParamReport:
    """The :class:`ParamReport` of a built method (file sizes: trainable parameters only, no header)."""
    trainable, total = module.trainable_count, module.total_count
    return ParamReport(method=spec.name, class_path=spec.class_path, backbone=spec.init_args.get("backbone", ""),
                       task=module.task, trainable=trainable, total=total, percent=100.0 * trainable / total,
                       bytes_fp32=trainable * FILE_DTYPES["fp32"], bytes_bf16=trainable * FILE_DTYPES["bf16"],
                       parts=dict(module.trainable_parts()))


def count_config(*args: str) -> ParamReport:
    """Exact counts of a configured method from Python, like ``peftlab params``:
    ``count_config("configs/quickstart.yaml", "--model.init_args.r", "16")``."""
    argv = list(args)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    spec = parse_fit_config(argv)
    return report(build_meta(spec), spec)


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units (KiB, MiB, GiB, TiB), three significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= 1000 * size / 1024:  # 1000 MiB prints as 0.977 GiB
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{int(n)} B"


def with_backbone(fit_args: Sequence[str], backbone: str | None) -> list[str]:
    """``peftlab fit`` arguments ``fit_args`` plus ``backbone`` (if given) as the model.backbone override."""
    return [*fit_args, *(["--model.init_args.backbone", backbone] if backbone else [])]


def has_config(fit_args: Sequence[str]) -> bool:
    """Whether ``fit_args`` name a ``--config`` file."""
    return any(a == "--config" or a.startswith("--config=") for a in fit_args)


def params_command(*, backbone: str | None = None, num_labels: int | None = None, json: bool = False,
                   fit_args: Sequence[str] = ()) -> ParamReport:
    """Exact trainable/total parameters and adapter file size of a config, without loading weights.

    The config is read by `peftlab fit`'s own parser (so layered --config files and --model.* / --data.*
    overrides mean what they mean for training) and the method is built by the training code on the meta
    device: the backbone comes from its config.json alone, so a 70B model costs seconds and no memory.

    Args:
        backbone: override model.backbone: a model directory, a config.json, a shipped shape (configs/backbones/:
            llama-1b, llama-2-7b, llama-2-70b, roberta-base, ...), packaged:NAME or a hub name (config only)
        num_labels: classes for classification (default: len(data.labels) if set, else 2; the data is not read)
        json: print one JSON object instead of the table
        fit_args: `peftlab fit`'s arguments: --config FILE (at least one) and --model.* / --data.* overrides

    Examples:
        peftlab params --config configs/quickstart.yaml --config configs/methods/lora.yaml
        peftlab params --config configs/quickstart.yaml --backbone llama-2-7b --data.task causal_lm \\
            --model.target_modules '[q_proj, v_proj]' --json
    """
    if not has_config(fit_args):
        raise PeftLabError("peftlab params needs --config FILE (the YAML you give peftlab fit), "
                           "e.g. --config configs/quickstart.yaml")
    spec = parse_fit_config(with_backbone(fit_args, backbone))
    rep = report(build_meta(spec, num_labels), spec)
    if json:
        from json import dumps

        print(dumps(asdict(rep)))
    else:
        print("\n".join(rep.lines()))
    return rep


# Layer-name suffixes by architecture family, most specific first; the first group whose every name is a
# module of the backbone wins (GPT-2 has one fused c_attn for Q, K and V).
TARGET_GROUPS = {
    "qv": [("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("c_attn",), ("query_key_value",), ("qkv_proj",)],
    "attention": [("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "key", "value", "attention.output.dense"),
                  ("q", "k", "v", "o"), ("c_attn", "attn.c_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                  ("query_key_value", "dense"), ("qkv_proj", "o_proj")],
    "ffn": [("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("intermediate.dense", "output.dense"),
            ("wi_0", "wi_1", "wo"), ("wi", "wo"), ("c_fc", "mlp.c_proj"), ("fc1", "fc2"),
            ("dense_h_to_4h", "dense_4h_to_h")],
}


def module_names(backbone: str, task: str) -> list[str]:
    """Names of all modules of ``backbone`` built for ``task`` on the meta device."""
    from peftlab.backbones import load_backbone, meta_backbones

    _quiet()
    with warnings.catch_warnings(), meta_backbones():
        warnings.simplefilter("ignore")
        model = load_backbone(resolve_backbone(backbone), task, num_labels=2 if task == "classification" else None)
    return [n for n, _ in model.named_modules() if n]


def target_modules_for(backbone: str, task: str, scope: str = "qv") -> list[str] | str:
    """LoRA ``target_modules`` for ``scope``: ``qv`` (query + value), ``attention`` (Q, K, V, O) or
    ``attention_ffn`` (all attention and feed-forward projections); ``all-linear`` when the family is unknown."""
    names = module_names(backbone, task)

    def present(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    def first(groups) -> list[str] | None:
        return next((list(g) for g in groups if all(present(t) for t in g)), None)

    if scope == "attention_ffn":
        attn, ffn = first(TARGET_GROUPS["attention"]), first(TARGET_GROUPS["ffn"])
        return attn + [t for t in ffn if t not in attn] if attn and ffn else "all-linear"
    return first(TARGET_GROUPS[scope]) or "all-linear"


def adapt_targets(targets: list[str] | str, backbone: str, task: str) -> list[str] | str:
    """LoRA ``targets`` written for one backbone, for ``backbone``: kept if all its layers exist there, else the
    same scope (:data:`TARGET_GROUPS`: qv, attention, ffn) resolved for this backbone, else ``all-linear``."""
    if not isinstance(targets, list):
        return targets
    names = module_names(backbone, task)
    if all(any(n == t or n.endswith("." + t) for n in names) for t in targets):
        return targets
    for scope, groups in TARGET_GROUPS.items():
        if any(sorted(g) == sorted(targets) for g in groups):
            return target_modules_for(backbone, task, "attention_ffn" if scope == "ffn" else scope)
    return "all-linear"
