"""Workarounds for upstream releases, each in one place, naming the versions it is for.

Every workaround here is applied only when the installed libraries show the behaviour it works around
(checked on the objects, not on version numbers), so it does nothing on versions that do not need it.
``tests/unit/test_compat.py`` checks each against an independent computation on the versions installed, and
``KNOWN_BAD`` lists combinations no workaround can save, which ``peftlab fit`` refuses up front.

The KV-cache argument rename (transformers 5.24.0, peft <= 0.21.2)
    transformers 5.24 renamed the key/value-cache argument of every model's ``forward`` and of
    ``prepare_inputs_for_generation`` from ``past_key_values`` to ``cache`` (the old name stays a deprecated
    alias until 5.40). peft <= 0.21.2 still speaks ``past_key_values``, and
    breaks in two ways:

    * prefix tuning for sequence classification looks for a ``past_key_values`` parameter in the model's
      signature and raises "Model does not support past key values which are required for prefix tuning"
      (prefix tuning, prefix + MLP and P-tuning v2 on BERT);
    * generation with prompt learning (prompt tuning, P-tuning, prefix tuning) reads the cache under
      ``past_key_values`` in ``prepare_inputs_for_generation``, finds none, and re-inserts the virtual tokens
      (or replaces the cache with the prefix) at every step: greedy decoding silently returns other tokens.

    :func:`bridge_cache_argument` makes the peft model's transformers model speak both names: its
    ``forward`` takes ``past_key_values`` and passes it on as ``cache``, and peft's generation hooks see
    the cache under the name peft reads. Remove it once peft reads ``cache`` itself.
"""

from __future__ import annotations

import inspect
import logging
import types
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

#: Installed combinations that break a method and have no workaround: (requirements that must all hold, e.g.
#: ``("transformers==5.24.0", "peft<=0.21.2")``; the method classes affected, ``"*"`` for all; the fix). A method
#: refuses them in one line when it is constructed, before anything is loaded (:func:`known_bad_versions`).
#: Empty today: the one break found so far (the KV-cache rename above) has its workaround. Add an entry when
#: ``scripts/test.sh --latest`` finds a break that cannot be fixed at once, and exclude the release in
#: pyproject.toml too (docs/dependencies.md).
KNOWN_BAD: list[tuple[tuple[str, ...], tuple[str, ...], str]] = []


def uses_cache_argument(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) names its KV-cache argument ``cache`` (transformers >= 5.24)."""
    for candidate in (model, getattr(model, "base_model", None)):  # the model, then its backbone (BertModel, ...)
        if candidate is None:
            continue
        params = inspect.signature(type(candidate).forward).parameters
        if "cache" in params and "past_key_values" not in params:
            return True
        if "past_key_values" in params:
            return False
    return False


def _forward_taking_past_key_values(model: nn.Module):
    """``type(model).forward`` that also takes ``past_key_values`` (passed on as ``cache``), with a signature
    naming both, so peft's signature check for prefix tuning and transformers' check of generate's
    arguments see what the model accepts."""

    def forward(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None and kwargs.get("cache") is None:
            kwargs["cache"] = past_key_values
        return type(self).forward(self, *args, **kwargs)

    signature = inspect.signature(type(model).forward)
    params = list(signature.parameters.values())
    if "past_key_values" not in signature.parameters:
        extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
        tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD] + [extra] + tail
        params = _valid_order(params)
    forward.__signature__ = signature.replace(parameters=params)
    return forward


def _valid_order(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Parameters sorted by kind (positional, *args, keyword-only, **kwargs), keeping their order within a kind."""
    return sorted(params, key=lambda p: p.kind)


def _base_prepare_inputs(self, *args, past_key_values=None, **kwargs):
    # transformers' prepare_inputs_for_generation, called by peft: cache in, cache out under peft's name
    if past_key_values is not None and kwargs.get("cache") is None:
        kwargs["cache"] = past_key_values
    inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    if "cache" in inputs:
        inputs["past_key_values"] = inputs.pop("cache")
    return inputs


def _peft_prepare_inputs(self, *args, cache=None, **kwargs):
    # peft's prepare_inputs_for_generation, called by transformers' generate with cache=...
    if cache is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = cache
    inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    if "past_key_values" in inputs:  # hand the model its own argument name (no deprecation warning)
        inputs["cache"] = inputs.pop("past_key_values")
    return inputs


def bridge_cache_argument(peft_model: nn.Module) -> bool:
    """Apply the KV-cache rename workaround (module docstring) to a ``peft.PeftModel``; return whether it was
    needed. Bound methods on the instances, so ``copy.deepcopy`` (merging) rebinds them to the copy."""
    base = peft_model.get_base_model()
    if not uses_cache_argument(base):
        return False
    base.forward = types.MethodType(_forward_taking_past_key_values(base), base)
    if hasattr(peft_model, "base_model_prepare_inputs_for_generation"):  # peft's causal LM / seq2seq models
        peft_model.base_model_prepare_inputs_for_generation = types.MethodType(_base_prepare_inputs, base)
        peft_model.prepare_inputs_for_generation = types.MethodType(_peft_prepare_inputs, peft_model)
    return True


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_upstream_noise() -> None:
    """Silence, at their source, library messages a peftlab user cannot act on (each named below).

    Called when peftlab is imported; warnings and log records that carry something to act on are kept.
    """
    # bitsandbytes >= 0.49 logs at import (peft imports it whenever it is installed, even for a LoRA run with no
    # 4-bit layer) that its optional CPU kernel could not be fetched from the Hugging Face hub; 4-bit layers work
    # without it (docs/methods.md, QLoRA)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft 0.21.2 reads transformers' deprecated `is_gradient_checkpointing` property (transformers >= 5.23)
    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Lightning 2.6's pytree helper builds torch's deprecated LeafSpec (torch >= 2.13)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning 2.6 advertises its cloud logger and model registry ("Tip: ... try installing litlogger") every run
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def _installed(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def known_bad_versions(method_classes: tuple[str, ...] = ("*",)) -> str | None:
    """One line naming an installed combination of :data:`KNOWN_BAD` that breaks one of ``method_classes`` (class
    names, e.g. the method's MRO) and its fix, or None."""
    from packaging.requirements import Requirement

    for requirements, methods, fix in KNOWN_BAD:
        if "*" not in methods and not set(methods) & set(method_classes) and "*" not in method_classes:
            continue
        found = []
        for text in requirements:
            requirement = Requirement(text)
            version = _installed(requirement.name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                break
            found.append(f"{requirement.name} {version}")
        else:
            which = ", ".join(methods) if "*" not in methods else "every method"
            return f"the installed {' with '.join(found)} is known to break {which}; {fix}"
    return None


def unmet_requirements(distribution: str = "peftlab") -> str | None:
    """One line naming the first installed library outside the range ``distribution`` declares (pyproject.toml's
    ``dependencies``), with the fix; None when all fit or ``distribution`` is not installed (a source checkout).

    pip keeps these ranges at install time; this catches environments changed afterwards (an upgrade of one
    library, ``--no-deps`` installs), where a library outside its range fails in ways that are hard to trace."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra (dev, experiments) or another platform's requirement
        version = _installed(requirement.name)
        if version is None:
            return (f"{requirement.name} is not installed but {distribution} needs {requirement}; run "
                    f"`bash scripts/setup.sh` (the locked versions) or `pip install '{requirement}'`")
        if not requirement.specifier.contains(version, prereleases=True):
            return (f"{requirement.name} {version} is installed but {distribution} needs {requirement}; run "
                    f"`bash scripts/setup.sh` (the locked versions) or `pip install '{requirement}'`")
    return None
