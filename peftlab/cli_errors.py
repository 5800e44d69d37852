"""One-line error messages for the ``peftlab`` commands.

Every error the user can act on is printed as one line, ``peftlab: error: <what is wrong and what to do>``,
with exit status 2 (``--debug`` shows the traceback instead). This module turns what the libraries raise into
that line:

* :func:`user_error` is what :func:`peftlab.cli.main` calls for any exception: a :class:`PeftLabError` (also
  one wrapped by jsonargparse while it instantiates a class), running out of memory, or a jsonargparse parse
  error of ``peftlab fit|validate|test|predict`` (:func:`argument_error`);
* :func:`command_error` words a parse error of the other commands (``peftlab merge``, ``params``, ...: the
  command table of :mod:`peftlab.commands`) the way argparse would;
* :func:`one_line` keeps the most specific line of a multi-line jsonargparse error (``peftlab params`` and
  ``estimate-memory`` parse their ``--config`` with ``peftlab fit``'s parser).

jsonargparse words its errors for people reading the whole report (every Union branch it tried, the usage);
the patterns below depend on that wording, so ``tests/unit/test_cli_errors.py`` builds its inputs by running real
jsonargparse parsers: an upgrade that rewords an error fails those tests instead of degrading the messages.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path

from peftlab.errors import PeftLabError, did_you_mean


def user_error(err: BaseException, argv: list[str]) -> PeftLabError | None:
    """The one-line error for ``err`` raised while running ``peftlab ARGV``, or None to show the traceback."""
    from peftlab.trackers import missing_tracker

    return find_user_error(err) or missing_tracker(err) or out_of_memory(err) or argument_error(err, argv)


# ---------------------------------------------------------------------------------------------- fit & co.
def argument_error(err: BaseException, argv: list[str]) -> PeftLabError | None:
    """One line for a jsonargparse parse error (which would otherwise print the whole usage and a nested
    report of every Union branch it tried), naming the key, what was wrong and what to do."""
    from jsonargparse import ArgumentError

    if not isinstance(err, ArgumentError):
        return None
    subcommand = next((a for a in argv if not a.startswith("-")), "fit")
    hint = f"see `peftlab {subcommand} --help`"
    return PeftLabError(f"{explain_argument_error(str(err), argv)}; {hint}")


def broken_config(argv: list[str]) -> str | None:
    """The first ``--config`` file of ``argv`` that YAML cannot parse, with the line of the problem."""
    import yaml

    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c") and os.path.isfile(value):
            try:
                yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                mark = getattr(err, "problem_mark", None)
                return f"{value}" + (f" (line {mark.line + 1})" if mark is not None else "")
    return None


def explain_argument_error(text: str, argv: list[str]) -> str:
    """The message of a jsonargparse error ``text`` (from parsing ``argv``) in one line, keys named as in a config."""
    keys = re.findall(r'Parser key "([^"]+)"', text)
    class_path = re.search(r"Problem with given class_path '([^']+)':", text)
    key = ".".join(k for k in keys if k)  # "model" + "r" -> model.r, made model.init_args.r below
    if class_path and keys and keys[0] in ("model", "data") and len(keys) > 1:
        key = f"{keys[0]}.init_args.{'.'.join(keys[1:])}"
    method = class_path.group(1).rsplit(".", 1)[-1] if class_path else None
    if m := re.search(r"Option '([^']+)' is not accepted", text):
        where = f"{keys[0]}.init_args" if keys else "the config"
        return f"{where}.{m.group(1)} is not an argument of {method or 'this class'}" + close_argument(
            class_path.group(1) if class_path else None, m.group(1))
    if m := re.search(r"has no attribute '([^']+)'|No module named '([^']+)'", text):
        import peftlab

        name = class_path.group(1) if class_path else (m.group(1) or m.group(2))
        return f"cannot find class {name!r} ({keys[0] if keys else 'class_path'})" + did_you_mean(
            name.rsplit(".", 1)[-1], peftlab.__all__)
    if m := re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", text):
        choices = m.group(1).replace("'", "")
        return f"{key or 'a value'} must be one of {choices} (got {m.group(2).strip()!r})"
    if m := re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", text):
        return f"{key or 'a value'} must be of type {m.group(1)} (got {m.group(2).strip()!r})"
    if m := re.search(r"unrecognized arguments: (.*)", text, flags=re.I):
        return f"unknown option(s) {m.group(1).strip()}{close_option(m.group(1).split())}"
    if m := re.search(r"File does not exist: '([^']+)'", text):
        return f"config file {m.group(1)} does not exist"
    if "Problems parsing config" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip() and "<unicode string>" not in line]
        return f"{broken_config(argv) or 'a --config file'} is not valid YAML ({' '.join(lines)[-120:]})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    noise = ("Given value", "- Expected a <class 'NoneType'>", "Subtypes:", "Errors:")
    detail = next((line for line in reversed(lines) if not line.startswith(noise)), text)
    return f"{key + ': ' if key else ''}{detail}"


#: the class whose signature makes the options under each group of ``peftlab fit`` (``--data.max_length``)
OPTION_GROUPS = {"data": "peftlab.data.PeftDataModule", "trainer": "lightning.pytorch.Trainer",
                 "model": "peftlab.methods.PeftModule"}


def close_option(tokens: list[str]) -> str:
    """' (did you mean --data.max_eval_samples?)' for the first unknown ``--group.name`` of ``tokens`` that is
    close to an argument of that group's class (argparse's abbreviation matching is off: a prefix is unknown)."""
    for token in tokens:
        group, _, name = token.partition("=")[0].lstrip("-").partition(".")
        name = name.removeprefix("init_args.")
        if group not in OPTION_GROUPS or not name or "." in name:
            continue
        module, _, cls_name = OPTION_GROUPS[group].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        params = [p for klass in inspect.getmro(cls) if "__init__" in vars(klass)
                  for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
        close = difflib.get_close_matches(name, params, n=1)
        if close:
            return f" (did you mean --{group}.{close[0]}?)"
    return ""


def close_argument(class_path: str | None, name: str) -> str:
    """' Did you mean ...?' for a misspelt init argument of ``class_path`` (its signature and its bases')."""
    if not class_path:
        return ""
    try:
        module, _, cls_name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError, ValueError):
        return ""
    params = {p for klass in inspect.getmro(cls) if "__init__" in vars(klass)
              for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}
    close = did_you_mean(name, sorted(params)) if params else ""
    return f" (it takes: {', '.join(sorted(params))})" if params and not close else close


def out_of_memory(err: BaseException | None) -> PeftLabError | None:
    """Advice for running out of (GPU or host) memory, or None if ``err`` is something else."""
    while err is not None:
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or \
                "out of memory" in str(err).lower()[:200]:
            return PeftLabError(
                f"out of memory ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}). "
                "Lower data.batch_size (and raise trainer.accumulate_grad_batches to keep the effective batch), "
                "lower data.max_length, turn on model.gradient_checkpointing (LoRA, QLoRA, adapters, full "
                "fine-tuning), load the backbone with model.dtype bfloat16, or use QLoRA; "
                "`peftlab estimate-memory --config FILE` tells what fits before you start"
            )
        err = err.__cause__ or err.__context__
    return None


def find_user_error(err: BaseException | None) -> PeftLabError | None:
    """The PeftLabError behind ``err``; jsonargparse wraps errors raised while instantiating classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PeftLabError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(message: str) -> str:
    """The most specific line of a (multi-line) jsonargparse error (YAML syntax errors keep their whole story)."""
    skip = ("Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>", "Does not validate",
            "Problem with given class_path")
    lines = [ln.strip(" -") for ln in str(message).splitlines() if ln.strip(" -")]
    if lines and lines[0].startswith("Problems parsing config"):
        return "invalid YAML: " + " ".join(ln.replace('"<unicode string>"', "the file") for ln in lines)
    useful = [ln for ln in lines if not ln.startswith(skip) and not ln.startswith('Parser key "model"')]
    return (useful or lines or ["invalid arguments"])[-1 if useful else 0]


# ---------------------------------------------------------------------------------------------- the command table
def command_error(text: str, command: str, positionals: Mapping[str, str] | None = None) -> str:
    """A parse error of ``peftlab COMMAND`` (built from a function by :mod:`peftlab.commands`) in argparse's
    words, which these commands have always used: ``argument --precision: invalid choice: 'fp8' (choose from
    fp32, bf16, fp16); see `peftlab estimate-memory --help```. ``positionals`` maps the command's positional
    arguments to the name its usage shows (``{"run": "RUN"}``); options are named ``--option``."""
    def shown(name: str) -> str:
        return (positionals or {}).get(name) or f"--{name}"

    key = re.search(r'Parser key "([^"]+)"', text)
    where = f"argument {shown(key.group(1))}: " if key else ""
    value = re.findall(r"Got value: (.*)", text) or re.findall(r"Given value: (.*)", text)  # the element, else all
    got = value[-1].strip() if value else ""
    if m := re.search(r"unrecognized arguments: (.*)", text, flags=re.I):
        message = f"unknown argument {m.group(1).split()[0]!r}"
    elif m := re.search(r"the following arguments are required: (.*)", text):
        message = "the following arguments are required: " + ", ".join(
            shown(n.strip().lstrip("-")) for n in m.group(1).split(","))
    elif m := re.search(r'Key "([^"]+)" is required', text):
        message = f"the following arguments are required: {shown(m.group(1))}"
    elif m := re.search(r"Expected a typing\.Literal\[(.*?)\]", text):
        message = f"{where}invalid choice: {got!r} (choose from {m.group(1).replace(chr(39), '')})"
    elif (m := re.findall(r"Expected a <class '(\w+)'>", text)) and [t for t in m if t != "NoneType"]:
        kind = next(t for t in m if t != "NoneType")
        message = f"{where}invalid {kind} value: {got!r}"
    elif m := re.search(r"argument (\S+): expected one argument", text):
        message = f"argument {m.group(1)}: expected one argument"
    else:
        message = f"{where}{one_line(text)}"
    return f"{message}; see `peftlab {command} --help`"
