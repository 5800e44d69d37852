"""The commands besides ``fit``/``validate``/``test``/``predict``: one table of typed functions.

Each command is a plain Python function whose signature (types, defaults, ``Literal`` choices) and Google-style
docstring (``Args:``, ``Examples:``) are its whole interface: :func:`build_parser` makes a jsonargparse
``ArgumentParser`` from it with ``add_function_arguments`` (as LightningCLI does for ``fit``), so
``peftlab <command> --help`` is generated from the same source as ``fit --help``, and :func:`run_command`
parses and calls it. The functions work from Python too: ``merge_command("runs/x/version_0", output="m")``.

Conventions of the signatures:

* positional-only parameters (before ``/``) are positional on the command line (``peftlab merge RUN``); a
  list-typed one takes every free token (``peftlab compose A B C``);
* a parameter called ``fit_args`` receives ``peftlab fit``'s own arguments: ``--config FILE``, ``--model.*``,
  ``--data.*``, ``--trainer.*``, ``--seed_everything`` (with their values) are split off the command line
  before jsonargparse sees the rest (:func:`split_fit_args`), so they mean exactly what they mean for ``fit``;
* list-typed options take the following values or repeated options (``--weights 0.7 0.3``,
  ``--config a --config b``) and bool options a bare ``--flag`` or ``--no-flag``: jsonargparse itself wants
  ``--weights [0.7,0.3]`` and ``--flag true``, which still work (:func:`normalize_argv`).

Importing this module imports nothing heavy: ``peftlab --help`` lists the table without loading Lightning.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from peftlab.errors import PeftLabError


class Command(NamedTuple):
    """One row of the command table: where the function is, and the line ``peftlab --help`` shows for it
    (the first line of the function's docstring; ``tests/unit/test_cli.py`` checks that they agree)."""

    target: str  # "module:function"
    summary: str
    #: builds methods only on the meta device, then exits: run from the console, it skips importing bitsandbytes
    #: (:func:`peftlab.backbones.hide_bitsandbytes_during_meta_builds`)
    meta_only: bool = False


COMMANDS: dict[str, Command] = {
    "merge": Command("peftlab.merge:merge_command",
                     "Merge a trained mergeable adapter (LoRA family, IA3, VeRA) into its backbone: a plain transformers model, no peft needed."),
    "compose": Command("peftlab.compose:compose_command",
                       "Combine trained LoRA adapters by weighted sum into one adapter (or a merged model)."),
    "plot": Command("peftlab.plot:plot_command", "Plot a run's learning curves (metrics.csv) to a PNG."),
    "params": Command("peftlab.analysis.params:params_command",
                      "Exact trainable/total parameters and adapter file size of a config, without loading weights.",
                      meta_only=True),
    "estimate-memory": Command("peftlab.analysis.memory:estimate_memory_command",
                               "Training memory of a method by component, without loading weights.", meta_only=True),
    "recommend": Command("peftlab.analysis.recommend:recommend_command",
                         "Recommend a PEFT method from the design notes' decision tables and write its config.",
                         meta_only=True),
    "evaluate": Command("peftlab.evaluate:evaluate_command",
                        "Run lm-evaluation-harness tasks on a trained run of any method (or a bare backbone)."),
    "chat": Command("peftlab.api:chat_command",
                    "Talk to a trained chat adapter in the terminal, in its chat template, streaming the reply."),
    "export-lora": Command("peftlab.lora_export:export_lora_command",
                           "Write a trained run as a plain LoRA adapter that serving engines load (vLLM --enable-lora), converting other methods."),
    "serve": Command("peftlab.serve:serve_command",
                     "Serve trained adapters on one backbone over an OpenAI-compatible HTTP API (model = adapter name)."),
    "compare": Command("peftlab.compare:compare_command",
                       "Tune, train and test several methods fairly from a study file; report intervals and Pareto plots."),
}

#: the name of the parameter that receives ``peftlab fit``'s arguments
FIT_ARGS = "fit_args"
#: first key of the options that belong to ``peftlab fit``'s parser (``--model.r`` -> model)
FIT_ROOTS = ("config", "model", "data", "trainer", "seed_everything", "optimizer", "lr_scheduler")
BOOL_VALUES = ("true", "false")


def function(name: str) -> Callable[..., Any]:
    """The function behind command ``name``."""
    module, _, attribute = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ---------------------------------------------------------------------------------------------- signatures
def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _is_bool(hint: Any) -> bool:
    return _unwrap_optional(hint) is bool


def _is_list(hint: Any) -> bool:
    import collections.abc

    return typing.get_origin(_unwrap_optional(hint)) in (list, tuple, collections.abc.Sequence)


class Signature(NamedTuple):
    """What the command line needs to know about a command function."""

    hints: dict[str, Any]  # parameter -> type
    positionals: tuple[str, ...]  # positional-only parameters, in order
    options: tuple[str, ...]  # the other parameters, except fit_args
    takes_fit_args: bool
    optional: tuple[str, ...] = ()  # positional-only parameters with a default: may be left out

    @property
    def bools(self) -> set[str]:
        return {n for n in self.options if _is_bool(self.hints.get(n))}

    @property
    def lists(self) -> set[str]:
        return {n for n in (*self.positionals, *self.options) if _is_list(self.hints.get(n))}


def signature(fn: Callable[..., Any]) -> Signature:
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    positionals = tuple(n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY)
    optional = tuple(n for n in positionals if params[n].default is not params[n].empty)
    options = tuple(n for n, p in params.items() if p.kind is not p.POSITIONAL_ONLY and n != FIT_ARGS)
    return Signature(hints, positionals, options, FIT_ARGS in params, optional)


def _is_option(token: str) -> bool:
    """``-x`` / ``--x`` but not a negative number (``--weights 1.5 -0.5``)."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


# ---------------------------------------------------------------------------------------------- argv
def split_fit_args(fn: Callable[..., Any], argv: list[str], command: str = "") -> tuple[list[str], list[str]]:
    """``argv`` split into (this command's own arguments, ``peftlab fit``'s): options whose first key is one of
    :data:`FIT_ROOTS` (``--config F``, ``--model.r 16``, ``--trainer.precision=bf16``) go to fit with their
    value, unless the function has a parameter of that name (estimate-memory's own ``--optimizer``). Any other
    unknown ``--option`` is refused here, naming both kinds of options."""
    sig = signature(fn)
    own_names = set(sig.options) | {f"no{sep}{b}" for b in sig.bools for sep in "-_"}
    own: list[str] = []
    fit: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            name = token[2:].partition("=")[0]
            root = re.split(r"[.+]", name, maxsplit=1)[0]
            if name not in own_names and root in FIT_ROOTS:
                fit.append(token)
                if "=" not in token and i + 1 < len(argv) and not _is_option(argv[i + 1]):
                    fit.append(argv[i + 1])
                    i += 1
                i += 1
                continue
            if name not in own_names and name not in ("help",):
                raise PeftLabError(
                    f"unknown option {token.partition('=')[0]}; options are this command's (see `peftlab {command} "
                    "--help`), --config FILE and peftlab fit's --model.* / --data.* / --trainer.* overrides")
        own.append(token)
        i += 1
    return own, fit


def normalize_argv(fn: Callable[..., Any], argv: list[str]) -> list[str]:
    """``argv`` in the form jsonargparse parses, driven by ``fn``'s signature.

    * a list-typed option takes the values that follow it (up to the next option) and repeated options
      accumulate: ``--weights 0.7 0.3`` becomes ``--weights=["0.7", "0.3"]``, ``--target_modules q
      --target_modules v`` becomes ``--target_modules=["q", "v"]``; a ``[a, b]`` value is read as a YAML list;
    * a list-typed positional parameter takes every free token: ``A B C`` becomes ``["A", "B", "C"]``;
    * a bool option accepts a bare ``--flag`` (true), ``--no-flag`` / ``--no_flag`` (false) and
      ``--flag true|false``;
    * everything else is left as it is (jsonargparse reports unknown options itself).
    """
    import yaml

    sig = signature(fn)
    bools, lists = sig.bools, sig.lists
    scalars = set(sig.options) - bools - lists
    out: list[Any] = []  # strings, and ("list", name) where a list option is emitted
    values: dict[str, list[Any]] = {}
    free: list[str] = []

    def add(name: str, items: list[str]) -> None:
        if name not in values:
            values[name] = []
            out.append(("list", name))
        for item in items:
            if item.startswith("[") and item.endswith("]"):
                try:
                    loaded = yaml.safe_load(item)
                except yaml.YAMLError:
                    loaded = None
                if isinstance(loaded, list):
                    values[name].extend(loaded)
                    continue
            values[name].append(item)

    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # the rest is positional
            free += argv[i + 1:]
            break
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        negated = next((name[3:] for sep in "-_" if name.startswith(f"no{sep}") and name[3:] in bools), None)
        if negated and name not in sig.options and not eq:
            out.append(f"--{negated}=false")
        elif name in bools and not eq:
            follows = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if follows in BOOL_VALUES:
                out.append(f"--{name}={follows}")
                i += 1
            else:
                out.append(f"--{name}=true")
        elif name in lists and name in sig.options:
            items = [value] if eq else []
            while not eq and i + 1 < len(argv) and not _is_option(argv[i + 1]):
                items.append(argv[i + 1])
                i += 1
            add(name, items)
        elif name in scalars and not eq and i + 1 < len(argv) and not _is_option(argv[i + 1]):
            out += [token, argv[i + 1]]  # its value, even when it looks like a positional or "-1"
            i += 1
        elif (name.partition(".")[0] in sig.options and "." in name and not eq and i + 1 < len(argv)
              and not _is_option(argv[i + 1])):  # a field of a dataclass option: --generation.top_p 0.9
            out += [token, argv[i + 1]]
            i += 1
        elif _is_option(token):
            out.append(token)
        else:
            free.append(token)
        i += 1
    list_positional = next((n for n in sig.positionals if n in lists), None)
    if list_positional is not None:
        for token in free:
            add(list_positional, [token])
        free = []
    result = []
    for item in out:
        if isinstance(item, tuple):  # a list, as one JSON (so YAML) value
            name = item[1]
            item = f"--{name}={json.dumps(values[name])}" if name in sig.options else json.dumps(values[name])
        result.append(item)
    return result + free


# ---------------------------------------------------------------------------------------------- parser
def _help_text(fn: Callable[..., Any]) -> tuple[str, str, dict[str, str]]:
    """(description, examples, {parameter: help}) from ``fn``'s Google-style docstring."""
    import docstring_parser

    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    description = "\n\n".join(t for t in (doc.short_description, doc.long_description) if t)
    examples = "\n".join(e.description or "" for e in doc.examples)
    return description, examples, {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


def build_parser(name: str):
    """The jsonargparse parser of ``peftlab NAME``, generated from the command's function."""
    import argparse

    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, keeping the line breaks of the docstring's description and examples."""

    fn = function(name)
    sig = signature(fn)
    description, examples, params = _help_text(fn)
    notes = []
    if sig.takes_fit_args:
        notes.append("Also takes `peftlab fit`'s arguments, read by the same parser as `peftlab fit` (see "
                     "`peftlab fit --help`): --config FILE (repeatable; later files override earlier ones) and "
                     "--model.* / --data.* / --trainer.* / --seed_everything overrides.")
    if sig.lists - set(sig.positionals):
        notes.append("List options take several values or repeat: --name A B, --name A --name B (or a YAML list "
                     "'[A, B]').")
    if sig.bools:
        notes.append("Yes/no options: --name or --no-name (or --name true|false).")
    epilog = "\n".join(textwrap.fill(n, 100) for n in notes)
    if examples:
        epilog = "examples:\n" + textwrap.indent(examples, "  ") + ("\n\n" + epilog if epilog else "")
    parser = ArgumentParser(prog=f"peftlab {name}", description=description, epilog=epilog or None,
                            formatter_class=Formatter, exit_on_error=False, default_env=False,
                            allow_abbrev=False)  # an abbreviated option is refused, not silently widened
    parser.add_function_arguments(fn, as_group=False, skip={*sig.positionals, FIT_ARGS})
    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items() if n in sig.optional}
    for positional in sig.positionals:
        extra = {"nargs": "?", "default": defaults[positional]} if positional in sig.optional else {}
        parser.add_argument(positional, type=sig.hints.get(positional, str), help=params.get(positional),
                            metavar=metavar(positional, positional in sig.lists), **extra)
    return parser


def metavar(name: str, many: bool = False) -> str:
    """How the usage names positional parameter ``name``: ``RUN``, or ``ADAPTER [ADAPTER ...]`` for a list."""
    one = (name[:-1] if many and name.endswith("s") else name).upper()
    return f"{one} [{one} ...]" if many else one


def parse_command(name: str, argv: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """``argv`` of ``peftlab NAME`` as the (positional, keyword) arguments of the command's function.

    A parse error becomes a one-line :class:`PeftLabError` (:func:`peftlab.cli_errors.command_error`);
    ``--help`` prints the generated help and exits."""
    from jsonargparse import ArgumentError

    from peftlab.cli_errors import command_error

    fn = function(name)
    sig = signature(fn)
    fit: list[str] = []
    if sig.takes_fit_args:
        argv, fit = split_fit_args(fn, argv, name)
    parser = build_parser(name)
    try:
        config = parser.parse_args(normalize_argv(fn, argv))
    except ArgumentError as err:
        shown = {p: metavar(p, p in sig.lists) for p in sig.positionals}
        raise PeftLabError(command_error(str(err), name, shown)) from err
    kwargs = config.as_dict()
    args = [kwargs.pop(p) for p in sig.positionals]
    if sig.takes_fit_args:
        kwargs[FIT_ARGS] = fit
    return args, kwargs


def run_command(name: str, argv: list[str]) -> Any:
    """Run ``peftlab NAME ARGV``: parse (:func:`parse_command`) and call the command's function."""
    args, kwargs = parse_command(name, argv)
    return function(name)(*args, **kwargs)
