"""LoRA (Hu et al. 2021) through peft: W' = W + (alpha / r) * B A with A, B of rank r, W frozen.

The LoRA variants that change only the update's form, its scaling, its starting point or the optimizer's groups
are options of :class:`LoRA` (and so of QLoRA where they apply), each carried through merge, compose, export and
the parameter and memory counts:

* ``use_dora`` (DoRA, Liu et al. 2024): ``W' = m * (W + s B A) / ||W + s B A||_c``, a trainable magnitude vector
  ``m`` (one value per output feature) on top of LoRA's direction update;
* ``use_rslora`` (rsLoRA, Kalajdzievski 2023): ``s = alpha / sqrt(r)`` instead of ``alpha / r``;
* ``init: pissa`` / ``olora`` (PiSSA, Meng et al. 2024; OLoRA, Büyükakyüz 2024): ``B0 A0`` starts as the top-``r``
  singular (PiSSA) or QR (OLoRA) part of ``W``, and the frozen backbone holds the residual ``W - s B0 A0``;
  exports and merges are converted back to the original backbone (see :meth:`LoRA.export`);
* ``loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024): ``B`` trains at ``ratio x`` the learning rate of ``A``.

``peftlab.methods.lora_variants`` registers each as a method of its own (DoRA, RSLoRA, PiSSA, LoRAPlus) with its
preset, so that ``estimate-memory``, ``recommend`` and the docs list them.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from peftlab.adapters import rewrite_meta
from peftlab.errors import PeftLabError, did_you_mean
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod

#: inits whose frozen backbone holds W - s B0 A0 instead of W (peft's "mutated" inits)
RESIDUAL_INITS = ("pissa", "olora")


class LoRA(PeftBackedMethod):
    """Low-rank adapters on the chosen linear layers (peft's ``LoraConfig``).

    Merges into the backbone (``peftlab merge``) and composes exactly with other LoRAs (``peftlab compose``).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the LoRA input path.
        target_modules: module-name suffixes to adapt (``query``, ``value``, ``q_proj``, ``v_proj``, FFN layers
            such as ``intermediate.dense`` / ``up_proj``), or ``all-linear`` for every linear layer but the head.
        bias: which biases to train: ``none``, ``all`` or ``lora_only``.
        modules_to_save: modules trained in full and saved with the adapter; ``None`` lets peft pick the
            classification head (``classifier`` / ``score``) for classification.
        use_dora: DoRA: split each adapted weight into a trainable magnitude (one value per output feature) and a
            direction that LoRA updates, ``m * (W + s B A) / ||W + s B A||``. Merges; does not compose.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
        init: start of ``A`` and ``B``: ``default`` (``A`` Kaiming-uniform, ``B`` zero: the update starts at 0),
            ``gaussian`` (``A`` normal with std ``1/r``), ``pissa`` (the top-``r`` singular vectors of ``W``; the
            frozen weight becomes the residual) or ``olora`` (a QR decomposition of ``W``, likewise).
        pissa_niter: with ``init: pissa``: use a randomized SVD with this many subspace iterations (fast on large
            layers; seeded, so the start is reproducible) instead of the exact SVD; ``null``: exact.
        loraplus_lr_ratio: LoRA+: train every ``B`` at this multiple of ``learning_rate`` (the paper suggests 16);
            ``null``: one rate for ``A`` and ``B``.
        **kwargs: the :class:`PeftModule` arguments (backbone, learning rate, ...).
    """

    name = "lora"
    family = "low-rank"
    peft_type = "LORA"
    mergeable = True
    composable = True
    stack_role = "additive"
    scaled_knobs = ("r",)
    alpha_per_r = 2.0
    adapts_targets = True
    advice = ("increase the rank to 16 or 32; add target modules (K, O, then the FFN)",
              "decrease the rank to 4; add dropout (0.1); train fewer epochs")

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | str = ["query", "value"],  # noqa: B006 - shown as the CLI default
        bias: Literal["none", "all", "lora_only"] = "none",
        modules_to_save: list[str] | None = None,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: Literal["default", "gaussian", "pissa", "olora"] = "default",
        pissa_niter: int | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs,
    ):
        if r < 1:
            raise PeftLabError(f"model.r (LoRA rank) must be >= 1 (got {r})")
        if alpha <= 0:
            raise PeftLabError(f"model.alpha must be > 0 (got {alpha}); the usual choice is 2 * r")
        if not 0.0 <= dropout < 1.0:
            raise PeftLabError(f"model.dropout must be in [0, 1) (got {dropout})")
        check_variant_settings(use_dora=use_dora, init=init, pissa_niter=pissa_niter,
                               loraplus_lr_ratio=loraplus_lr_ratio)
        super().__init__(**kwargs)
        #: PiSSA / OLoRA: the starting factors (A0, B0) of every adapted layer, by module name; set in attach
        self._initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ building
    @property
    def residual_init(self) -> bool:
        """Whether the frozen backbone holds ``W - s B0 A0`` (PiSSA / OLoRA) instead of ``W``."""
        return self.hparams.get("init", "default") in RESIDUAL_INITS

    def init_lora_weights(self):
        """peft's ``init_lora_weights`` for ``init`` (and ``pissa_niter``)."""
        from peftlab.backbones import building_on_meta

        h = self.hparams
        init = h.get("init", "default")
        if init == "default" or (init in RESIDUAL_INITS and building_on_meta()):
            return True  # on the meta device (params, estimate-memory) there is nothing to decompose; same shapes
        if init == "pissa" and h.get("pissa_niter"):
            return f"pissa_niter_{h.pissa_niter}"
        return init

    def lora_config_args(self) -> dict:
        """The ``peft.LoraConfig`` arguments of this method's settings (QLoRA and stacks reuse them)."""
        h = self.hparams
        return dict(r=h.r, lora_alpha=h.alpha, lora_dropout=h.dropout, bias=h.bias,
                    target_modules=h.target_modules, modules_to_save=h.modules_to_save,
                    use_dora=h.get("use_dora", False), use_rslora=h.get("use_rslora", False),
                    init_lora_weights=self.init_lora_weights())

    def peft_config(self, backbone: nn.Module, task_type: str | None = "auto"):
        """``LoraConfig`` for this method; ``task_type`` ``auto`` is the task's (``None``: no task head handling,
        as a stack uses it when its prompt part owns the head)."""
        from peft import LoraConfig

        check_target_modules(backbone, self.hparams.target_modules)
        task = PEFT_TASK[self.task] if task_type == "auto" else task_type
        return LoraConfig(task_type=task, **self.lora_config_args())

    def attach(self, backbone: nn.Module) -> nn.Module:
        return self.attach_lora(backbone)

    def attach_lora(self, backbone: nn.Module, task_type: str | None = "auto") -> nn.Module:
        """Wrap ``backbone`` in a LoRA ``PeftModel`` (its layers are adapted in place); remember PiSSA/OLoRA's start."""
        from peft import get_peft_model

        config = self.peft_config(backbone, task_type)
        with seeded_rng(config.init_lora_weights):
            peft_model = get_peft_model(backbone, config)
        self._initial_factors = {}
        if self.residual_init and config.init_lora_weights is not True:
            for name, layer in lora_layers(peft_model):
                self._initial_factors[name] = (layer.lora_A["default"].weight.detach().clone(),
                                               layer.lora_B["default"].weight.detach().clone())
        return peft_model

    def attach_reads_backbone_weights(self) -> bool:
        """DoRA's magnitudes are the adapted weights' norms; PiSSA / OLoRA decompose the weights."""
        return bool(self.hparams.get("use_dora")) or self.residual_init

    def lora_model(self):
        """The ``peft.PeftModel`` holding the LoRA layers (QLoRA merges through it)."""
        self._require_built("merging")
        return self.model

    # ------------------------------------------------------------------ capabilities
    # merged_model (PeftBackedMethod's, peft's merge_and_unload): ``W + s B A`` in every adapted layer; DoRA's
    # ``m * (W + s B A) / ||W + s B A||``; PiSSA/OLoRA's ``(W - s B0 A0) + s B A``, i.e. the original backbone plus
    # the trained delta ``s (B A - B0 A0)``: a plain model of the original architecture

    @classmethod
    def compose_refusal(cls, config: dict, task: str | None) -> str | None:
        """DoRA adapters and adapters saved against a residual backbone (PiSSA / OLoRA as peft saves them) do not
        compose; plain LoRA and rsLoRA adapters (and peftlab's PiSSA exports, plain LoRAs) do."""
        if config.get("use_dora"):
            return ("is a DoRA adapter: its update m * (W + dW) / ||W + dW|| is not a weighted sum of deltas; only "
                    "LoRA and rsLoRA adapters compose")
        if str(config.get("init_lora_weights")).startswith(("pissa", "olora", "corda", "lora_ga")):
            return (f"is a {config['init_lora_weights']} adapter saved against its residual backbone; export it with "
                    "peftlab (a plain LoRA on the original backbone), then compose")
        return super().compose_refusal(config, task)

    @classmethod
    def describe(cls, args: dict) -> str:
        return f"{cls.__name__} r={args['r']}, alpha={args['alpha']}"

    def adapter_set_refusal(self) -> str | None:
        """PiSSA / OLoRA rewrite the frozen weights into their residual, which a shared backbone cannot hold."""
        if not self.residual_init:
            return None
        return (f"init: {self.hparams.init} rewrites the backbone's weights (W - s B0 A0), so it cannot share a "
                "backbone; add the run's exported adapter, which peftlab converts to a plain LoRA on the original "
                "backbone (its adapter/ directory, or peftlab export-lora)")

    def serving_engine_refusal(self) -> str | None:
        """vLLM's LoRA loader takes plain LoRA (PiSSA / OLoRA exports are converted to one): not DoRA, trained
        biases or extra saved modules (issue #32's measurement with vLLM 0.32; not re-run here)."""
        h = self.hparams
        if h.get("use_dora"):
            return ("DoRA's magnitude vectors are not a plain LoRA and vLLM's loader refuses them; convert it with "
                    "peftlab export-lora (fidelity measured) or serve it with peftlab serve")
        if h.get("bias", "none") != "none":
            return (f"trained biases (model.bias: {h.bias}) are not part of a plain LoRA and vLLM's loader refuses them; "
                    "serve it with peftlab serve, or train with bias: none")
        if h.get("modules_to_save"):
            return (f"modules_to_save {h.modules_to_save} are trained in full, which vLLM's loader refuses (beyond a "
                    "classification head); serve it with peftlab serve")
        return None

    def per_row_config(self):
        """LoRA's peft config: peft routes each row of a batch to its own LoRA (``adapter_names``); not DoRA's, which
        peft 0.21 refuses there ("Cannot pass `adapter_names` when DoRA is enabled"): DoRA's rows are grouped."""
        self._require_built("per-row routing")
        return None if self.hparams.get("use_dora") else self.lora_model().peft_config["default"]

    def optimizer_groups(self) -> list[dict]:
        """LoRA+ (``loraplus_lr_ratio``): every ``B`` in a group at ``ratio x learning_rate``; else one group."""
        ratio = self.hparams.get("loraplus_lr_ratio")
        if not ratio:
            return super().optimizer_groups()
        b = [p for n, p in self.named_parameters() if p.requires_grad and is_lora_b(n)]
        ids = {id(p) for p in b}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": b, "lr": ratio * self.hparams.learning_rate}]

    def trainable_parts(self) -> dict[str, int]:
        """With DoRA: the LoRA factors, the magnitude vectors (one value per output feature of each adapted layer)
        and the head; plain LoRA reports no parts."""
        if not self.hparams.get("use_dora"):
            return {}
        parts = {"A, B": 0, "DoRA magnitudes": 0, "head": 0}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = "DoRA magnitudes" if "lora_magnitude_vector" in name else "A, B" if "lora_" in name else "head"
                parts[key] += p.numel()
        if not parts["head"]:
            del parts["head"]
        return parts

    def export(self, directory) -> str:
        """peft's adapter (``PeftModel.from_pretrained`` loads it; ``use_dora`` / ``use_rslora`` are recorded in
        its ``adapter_config.json``, so the scaling is read back as trained).

        PiSSA / OLoRA: converted to a plain LoRA of rank ``2r`` on the *original* backbone,
        ``A' = [A; A0]``, ``B' = [B, -B0]``, so ``s B' A' = s (B A - B0 A0)``, the trained delta (peft's
        ``path_initial_model_for_weight_conversion`` does the same); ``alpha`` doubles (``x sqrt 2`` with rsLoRA) so
        the scaling is unchanged. ``peftlab_meta.json`` then describes that plain LoRA, which
        :func:`peftlab.api.load_run` rebuilds on the original backbone."""
        if not self.residual_init:
            return super().export(directory)
        self.save_converted(directory)
        return "peft"

    def save_converted(self, directory) -> None:
        """Write the PiSSA/OLoRA adapter as a plain LoRA on the original backbone (see :meth:`export`)."""
        import copy

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not self._initial_factors:
            raise PeftLabError(f"{type(self).__name__}: the starting factors of init {self.hparams.init!r} are "
                               "unknown (built on the meta device?); cannot convert the adapter")
        state = get_peft_model_state_dict(self.model)
        layers = dict(lora_layers(self.model))
        out = {}
        for key, value in state.items():
            value = value.detach()
            for part, dim, sign in ((".lora_A.weight", 0, 1.0), (".lora_B.weight", 1, -1.0)):
                if key.endswith(part):
                    name = key.removesuffix(part)
                    a0, b0 = self._initial_factors[name]
                    start = a0 if part == ".lora_A.weight" else b0
                    if name not in layers:
                        raise PeftLabError(f"cannot convert {key}: no LoRA layer {name}")
                    value = torch.cat([value, sign * start.to(value)], dim=dim)
            out[key] = value.cpu().contiguous()
        config = copy.deepcopy(self.model.peft_config["default"])
        config.init_lora_weights = True
        config.r *= 2
        config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
        config.inference_mode = True
        config.save_pretrained(str(directory))
        save_file(out, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})
        h = self.hparams
        rewrite_meta(directory, "peftlab.methods.LoRA", {
            "r": 2 * h.r, "alpha": config.lora_alpha, "init": "default", "pissa_niter": None,
            "use_rslora": bool(h.get("use_rslora", False)), "use_dora": False})


# ---------------------------------------------------------------------------------------------- helpers
def check_variant_settings(*, use_dora: bool, init: str, pissa_niter: int | None,
                           loraplus_lr_ratio: float | None) -> None:
    """Refuse, in one line each, LoRA variant settings that do not go together."""
    if init not in ("default", "gaussian", *RESIDUAL_INITS):
        raise PeftLabError(f"model.init {init!r} is unknown; choose default, gaussian, pissa or olora")
    if use_dora and init in RESIDUAL_INITS:
        raise PeftLabError(f"model.use_dora with init: {init} is not supported: the exported adapter could not be "
                           "converted to the original backbone exactly; use one of them")
    if pissa_niter is not None and (init != "pissa" or pissa_niter < 1):
        raise PeftLabError(f"model.pissa_niter ({pissa_niter}) needs init: pissa and a value >= 1 (null: exact SVD)")
    if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
        raise PeftLabError(f"model.loraplus_lr_ratio must be > 0 (got {loraplus_lr_ratio}); LoRA+ suggests 16")


def is_lora_b(name: str) -> bool:
    """Whether a parameter name is a LoRA ``B`` factor (LoRA+ trains these at a higher rate)."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def lora_layers(model: nn.Module):
    """``(name, layer)`` of every peft LoRA layer in ``model`` (names as in the model)."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def seeded_rng(init_lora_weights):
    """PiSSA's randomized SVD draws from the global RNG: fix it (and leave the caller's RNG untouched), so that the
    residual backbone is the same every time the method is built (resume, load_run)."""
    if not (isinstance(init_lora_weights, str) and "_niter_" in init_lora_weights):
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def check_target_modules(model: nn.Module, targets: list[str] | str) -> None:
    """Fail with the list of adaptable layer names when a target matches no module."""
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        # peft reads a single string as a regular expression over full module names, not as a suffix
        import re

        if not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
            raise PeftLabError(
                f"model.target_modules {targets!r} is a single string, which peft matches as a regular expression "
                "against full module names, and it matches none; give a list of layer names, e.g. [query, value]"
            )
        return
    if not targets:
        raise PeftLabError("model.target_modules is empty; name at least one layer, e.g. [query, value]")
    names = [n for n, _ in model.named_modules()]
    linear_suffixes = sorted({n.split(".")[-1] for n, m in model.named_modules()
                              if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")})
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise PeftLabError(
                f"target module {target!r} (model.target_modules) is not in this backbone; its linear layers are: "
                f"{', '.join(linear_suffixes)}.{did_you_mean(target, linear_suffixes)} Or use 'all-linear'."
            )
