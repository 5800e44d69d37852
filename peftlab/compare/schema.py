"""The typed sections of a study file (docs/compare.md): each a dataclass whose fields are the keys a section may
hold, with their types and defaults, read by :func:`read_section` with one-line errors.

Not jsonargparse: a study's sections are plain YAML mappings merged key by key over the study's top level (parts,
``--smoke``), and what a run's stored results depend on (its fingerprint) is the mapping as written plus these
defaults, so a section is read into a ``dict`` (only the keys given and the fields with a default) rather than
into an instance carrying every field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from peftlab.errors import PeftLabError, did_you_mean


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: the default of a field that is absent from the section unless the study file sets it
UNSET: Any = _Unset()


@dataclass
class Budget:
    max_steps: int = UNSET
    max_epochs: int = UNSET
    val_check_interval: int | float = UNSET
    batch_size: int = UNSET


@dataclass
class Tuning:
    trials: int = 4
    sampler: Literal["tpe", "random", "qmc"] = "tpe"
    pruner: Literal["successive_halving", "none"] | None = "successive_halving"
    reduction_factor: int | float = 3
    min_resource: int = UNSET
    seed: int = UNSET
    overrides: dict | None = UNSET


@dataclass
class Generation:
    max_new_tokens: int = 32
    during_validation: bool | None = None


@dataclass
class Forgetting:
    source: str = "packaged:rotten_tomatoes_plots"
    text_column: str = "text"
    max_samples: int = 64
    max_length: int = 128
    batch_size: int = 8


@dataclass
class Latency:
    repeats: int = 10
    warmup: int = 2


@dataclass
class LmEval:
    tasks: list | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    max_gen_toks: int = 32
    during_validation: bool | None = None


@dataclass
class Bootstrap:
    reps: int = 2000
    seed: int = 0
    level: float = 0.95


@dataclass
class MethodEntry:
    config: str | list | None = UNSET
    overrides: dict | None = UNSET
    search: dict | None = UNSET
    title: str | None = UNSET


def fail(where: str, message: str) -> PeftLabError:
    return PeftLabError(f"{where}: {message}")


def check_keys(where: str, value: Any, allowed: set[str] | list[str]) -> dict:
    """``value`` as a mapping whose keys are all ``allowed`` ({} for None)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(where, f"must be a mapping (got {type(value).__name__})")
    for key in value:
        if key not in allowed:
            raise fail(where, f"unknown key {key!r}; allowed: {', '.join(sorted(allowed))}."
                       f"{did_you_mean(key, sorted(allowed))}")
    return value


def keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def read_section(where: str, value: Any, schema: type, *, optional: bool = False) -> dict | None:
    """The section ``value`` checked against ``schema``: its keys known, each value of its field's type, the fields
    with a default filled in. ``optional``: the section is off when absent or ``false`` (None) and all defaults when
    ``true``; else an absent section is its defaults."""
    if optional and value in (None, False):
        return None
    given = {} if value is True and optional else check_keys(where, value, keys(schema))
    hints = typing.get_type_hints(schema)
    out = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not UNSET}
    for key, item in given.items():
        expected = hints[key]
        if not _is(item, expected):
            raise fail(f"{where}.{key}", f"must be {_describe(expected)} (got {item!r})")
        out[key] = item
    return out


def _is(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, arg) for arg in typing.get_args(expected))
    if origin is Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        named = [_describe(a) for a in typing.get_args(expected) if a is not type(None)]
        return " or ".join(named) if len(named) > 1 else named[0]
    if origin is Literal:
        choices = [str(c) for c in typing.get_args(expected)]
        return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a mapping"}.get(expected, getattr(expected, "__name__", str(expected)))


__all__ = ["Budget", "Tuning", "Generation", "Forgetting", "Latency", "LmEval", "Bootstrap", "MethodEntry",
           "check_keys", "read_section", "keys", "fail"]
