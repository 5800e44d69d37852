"""Weighted composition of several trained LoRA adapters on one backbone.

``exact`` (default) gives every adapted layer the update ``sum_i w_i * s_i * B_i A_i`` (``s_i = alpha_i / r_i``,
or ``alpha_i / sqrt(r_i)`` for an rsLoRA adapter), whatever the ranks and scalings: peft's ``cat`` combination
stacks the factors, ``A = [A_1; A_2; ...]`` and
``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, so ``B A`` is the weighted sum with no cross terms (rank
``sum r_i``). peft's other modes are offered as they are, and are approximations of that sum:

* ``linear`` (equal ranks only) mixes the factors, ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``,
  so ``B A`` contains cross terms ``B_i A_j``;
* ``svd`` computes the exact sum and truncates it to a rank (lossy when the sum has a higher rank);
* ``ties``, ``dare_linear``, ``dare_ties`` prune and rescale entries (``density``) before mixing.

Only LoRA / rsLoRA adapters trained on the same backbone with the same target modules are composed (DoRA and
AdaLoRA adapters are refused: their update is not a weighted sum of deltas); generative tasks only (one
classification head per adapter cannot be summed meaningfully).
"""

from __future__ import annotations

from typing import Literal

from peftlab.adapters import read_adapter_config, read_meta
from peftlab.errors import PeftLabError
from peftlab.export import atomic_directory

Mode = Literal["exact", "linear", "svd", "ties", "dare_linear", "dare_ties"]
PEFT_MODE = {"exact": "cat", "linear": "linear", "svd": "svd", "ties": "ties", "dare_linear": "dare_linear",
             "dare_ties": "dare_ties"}
COMPOSED = "composed"


def check_compatible(directories: list[str], weights: list[float]) -> list[dict]:
    """Read and cross-check the adapters' configs; return them."""
    if len(directories) < 2:
        raise PeftLabError("give at least two adapters to compose")
    if len(weights) != len(directories):
        raise PeftLabError(f"{len(directories)} adapters but {len(weights)} weights; give one weight per adapter")
    from peftlab.methods.registry import adapter_method

    configs = [read_adapter_config(d) for d in directories]
    for d, c in zip(directories, configs):
        cls, task = adapter_method(d, c)  # the adapter's method decides whether it composes
        if cls is None:
            raise PeftLabError(f"{d} is not an adapter of a peftlab method ({c.get('peft_type') or c.get('method')}); "
                               "only LoRA composes")
        reason = cls.compose_refusal(c, task)
        if reason:
            raise PeftLabError(f"{d} {reason}")
    first = configs[0]
    for d, c in zip(directories[1:], configs[1:]):
        if c.get("base_model_name_or_path") != first.get("base_model_name_or_path"):
            raise PeftLabError(
                f"adapters were trained on different backbones: {directories[0]} on "
                f"{first.get('base_model_name_or_path')!r}, {d} on {c.get('base_model_name_or_path')!r}"
            )
        if set(c.get("target_modules") or []) != set(first.get("target_modules") or []):
            raise PeftLabError(
                f"adapters adapt different layers: {directories[0]} {sorted(first.get('target_modules') or [])}, "
                f"{d} {sorted(c.get('target_modules') or [])}; train them with the same target_modules"
            )
    return configs


def compose(peft_model, directories: list[str], weights: list[float], mode: Mode = "exact",
            density: float = 0.5, svd_rank: int | None = None) -> str:
    """Load the adapters into ``peft_model`` and activate their weighted combination; return its name."""
    if mode not in PEFT_MODE:
        raise PeftLabError(f"unknown composition mode {mode!r}; choose one of {', '.join(PEFT_MODE)}")
    configs = check_compatible(directories, weights)
    own = getattr(peft_model, "peft_config", {}).get("default")
    if own is not None and str(getattr(own, "init_lora_weights", "")).startswith(("pissa", "olora")):
        raise PeftLabError(f"cannot compose onto a {own.init_lora_weights} model: its backbone holds the residual "
                           "W - s B0 A0, not the weights the adapters were trained on; compose on a LoRA model")
    if mode == "linear" and len({c["r"] for c in configs}) > 1:
        raise PeftLabError("mode 'linear' needs adapters of equal rank; use mode 'exact'")
    names = []
    for i, directory in enumerate(directories):
        name = f"adapter{i}"
        if name in peft_model.peft_config:
            peft_model.delete_adapter(name)
        peft_model.load_adapter(str(directory), adapter_name=name)
        names.append(name)
    if COMPOSED in peft_model.peft_config:
        peft_model.delete_adapter(COMPOSED)
    extra = {}
    if mode in ("ties", "dare_linear", "dare_ties"):
        extra["density"] = density
    if mode == "svd":
        extra["svd_rank"] = svd_rank or max(c["r"] for c in configs)
    peft_model.add_weighted_adapter(names, [float(w) for w in weights], COMPOSED,
                                    combination_type=PEFT_MODE[mode], **extra)
    # every mode folds each adapter's own scaling (alpha_i / r_i, or alpha_i / sqrt(r_i) for rsLoRA) into the new
    # factors and gives the result alpha = r, i.e. scaling 1; but peft (0.21.2) copies the first adapter's
    # use_rslora, which turns that 1 into sqrt(r) when the first adapter is an rsLoRA: make it 1, in the layers and
    # in the config that is saved
    config = peft_model.peft_config[COMPOSED]
    if config.use_rslora:
        config.use_rslora = False
        for module in peft_model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and COMPOSED in module.scaling:  # LoRA layers
                module.scaling[COMPOSED] = config.lora_alpha / config.r
                module.use_rslora[COMPOSED] = False
    peft_model.set_adapter(COMPOSED)
    return COMPOSED


def compose_command(adapters: list[str], /, *, weights: list[float], output: str, mode: Mode = "exact",
                    density: float = 0.5, merge: bool = False) -> dict:
    """Combine trained LoRA adapters by weighted sum into one adapter (or a merged model).

    The adapters (exported by peftlab, or by peft with a peftlab_meta.json next to them) must be LoRAs of a
    generative task trained on the same backbone with the same target modules. ``exact`` gives every adapted
    layer the update sum_i w_i * (alpha_i / r_i) * B_i A_i; the other modes are peft's approximations.

    Args:
        adapters: adapter directories (e.g. runs/NAME/version_N/adapter/best), at least two
        weights: one weight per adapter, in the same order
        output: directory to write the composed adapter (or with --merge the merged model) to
        mode: exact (the weighted sum), linear (equal ranks), svd, ties, dare_linear or dare_ties
        density: ties/dare modes: fraction of entries kept
        merge: save a merged plain transformers model instead of an adapter

    Examples:
        peftlab compose A/adapter/best B/adapter/best --weights 0.7 0.3 --output AB/
        peftlab compose A/adapter/best B/adapter/best --weights 0.5 0.5 --output AB-merged/ --merge
    """
    import json

    from peftlab.api import build_module
    from peftlab.merge import merge_to_directory, probe_batch

    check_compatible(adapters, weights)
    module = build_module(read_meta(adapters[0], "compose"))
    compose(module.model, adapters, weights, mode, density)
    if merge:
        report = merge_to_directory(module, output, probe_batch=probe_batch(module))
    else:
        with atomic_directory(output) as tmp:
            module.model.save_pretrained(tmp, selected_adapters=[COMPOSED])
            nested = tmp / COMPOSED  # peft writes non-default adapters into a sub-folder
            if nested.is_dir():
                for f in nested.iterdir():
                    f.rename(tmp / f.name)
                nested.rmdir()
        report = {"directory": output}
    report.update({"adapters": list(adapters), "weights": list(weights), "mode": mode})
    print(json.dumps(report, indent=2))
    return report
