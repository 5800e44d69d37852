"""The method registry: names, presets, display order and the one way to import a method by its class path.

Every ``PeftModule`` subclass registers itself when its class is defined (``PeftModule.__init_subclass__`` calls
:func:`register`); one with a ``name`` is listed in :data:`METHODS`, which ``params``, ``estimate-memory``,
``recommend``, stacks and the docs read. Importing this module imports the shipped methods (it lives in
:mod:`peftlab.methods`, whose ``__init__`` imports them).
"""

from __future__ import annotations

import importlib
import warnings
import weakref
from pathlib import Path

from peftlab.adapters import META_FILE, PEFT_TASK, read_meta
from peftlab.errors import PeftLabError, did_you_mean

#: name -> method class, filled by every ``PeftModule`` subclass that sets ``name`` (a subclass defined in a
#: user's file registers when it is imported). ``peftlab params / estimate-memory / recommend`` list these.
METHODS: dict[str, type] = {}
#: every PeftModule subclass defined so far, named or not: what :func:`import_method` agrees to build
_CLASSES: weakref.WeakSet = weakref.WeakSet()

#: configs/methods/ of the repository: the preset (the one source of hyperparameters) of each shipped method
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"

#: the families a method class declares (``PeftModule.family``), in display order: the baseline first; a method
#: of no listed family (a plugin's) comes after them
FAMILIES = ("baseline", "low-rank", "soft prompt", "adapter", "composition")


def register(cls: type) -> None:
    """Record a ``PeftModule`` subclass; one that sets ``name`` becomes ``METHODS[name]`` (a re-definition, by a
    re-import or a test, replaces the earlier class)."""
    _CLASSES.add(cls)
    if cls.__dict__.get("name"):
        METHODS[cls.name] = cls


def display_order(names) -> list[str]:
    """Registered method ``names`` by family (:data:`FAMILIES`), then in the order their classes were registered
    (:data:`METHODS`' order; the shipped ones: peftlab.methods imports its modules alphabetically, each module's
    own imports first)."""
    registered = {name: i for i, name in enumerate(METHODS)}

    def key(name: str) -> tuple[int, int]:
        family = METHODS[name].family
        return (FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), registered[name])
    return sorted(names, key=key)


def preset_path(cls: type) -> Path | None:
    """The preset config file of method class ``cls``: its ``preset``, else ``configs/methods/<name>.yaml`` if it
    exists."""
    if cls.preset:
        return Path(cls.preset)
    path = PRESETS_DIR / f"{cls.name}.yaml"
    return path if cls.name and path.is_file() else None


def preset_args(cls: type) -> dict:
    """``init_args`` of ``cls``'s preset config (empty without one), minus the backbone it was written for."""
    import yaml

    path = cls.preset_path()
    if path is None:
        return {}
    try:
        model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (OSError, yaml.YAMLError) as err:
        raise PeftLabError(f"preset config {path} of method {cls.name!r} cannot be read: {err}") from err
    args = dict(model.get("init_args") or {})
    args.pop("backbone", None)
    return args


def load_plugins() -> None:
    """Import the methods that installed packages declare under the entry-point group ``peftlab.methods``
    (``[project.entry-points."peftlab.methods"] bitfit = "mypkg.bitfit:BitFit"``), which registers them. A
    method in a file of your own registers when it is imported (``--config`` with its class_path does that)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="peftlab.methods"):
        try:
            entry.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break peftlab's own commands
            warnings.warn(f"peftlab method plugin {entry.name!r} ({entry.value}) failed to load: {err}", stacklevel=2)


def method_names() -> list[str]:
    """Every registered method (``PeftModule`` subclasses with a ``name``: the shipped ones, plugins and any
    imported), in display order."""
    load_plugins()
    return display_order(METHODS)


def method_class(name: str) -> type:
    """The registered method class called ``name``."""
    names = method_names()
    if name not in names:
        raise PeftLabError(f"--method {name!r} is unknown; choose one of {', '.join(names)} or all."
                           f"{did_you_mean(name, names)}")
    return METHODS[name]


def import_method(path: str, what: str = "model.class_path") -> type:
    """The method class at ``path`` (``package.module.Class``; a bare ``Class`` is looked up in
    :mod:`peftlab.methods`), imported; refused in one line naming ``what`` when it is missing or no method."""
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "peftlab.methods"), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise PeftLabError(f"cannot import {what} {path!r}: {err}") from err
    if not (isinstance(cls, type) and cls in _CLASSES):
        raise PeftLabError(f"{what} {path!r} is not a PeftModule subclass; refusing to build it")
    return cls


def adapter_method(directory, config: dict) -> tuple[type | None, str | None]:
    """(method class, task) of an exported adapter with ``adapter_config.json`` ``config``: from its
    ``peftlab_meta.json``, else (saved by plain peft) the first registered method of its ``peft_type``; the class
    is None when neither names one."""
    if (Path(directory) / META_FILE).is_file():
        meta = read_meta(directory)
        return import_method(meta["method"], "the adapter's method"), meta.get("task")
    task = next((t for t, peft_task in PEFT_TASK.items() if peft_task == config.get("task_type")), None)
    peft_type = config.get("peft_type")
    cls = next((METHODS[n] for n in method_names() if peft_type and getattr(METHODS[n], "peft_type", None) == peft_type),
               None)
    return cls, task


def construct_from_meta(meta: dict, backbone: str | None = None):
    """The method an adapter's ``peftlab_meta.json`` describes, constructed (settings checked) but not built;
    ``backbone``: another backbone than the recorded one."""
    init_args = dict(meta["init_args"])
    init_args["task"] = meta["task"]
    init_args["num_labels"] = meta.get("num_labels")
    if backbone:
        init_args["backbone"] = backbone
    cls = import_method(meta["method"], "the adapter's method")
    try:
        return cls(**init_args)
    except TypeError as err:  # a field the method does not take: a hand-edited or foreign peftlab_meta.json
        raise PeftLabError(f"peftlab_meta.json does not fit {cls.__name__}: {err}; export the adapter again") from err
