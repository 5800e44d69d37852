"""QLoRA (Dettmers et al. 2023): LoRA on a backbone quantized to 4 bits by bitsandbytes."""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
from torch import nn

from peftlab.backbones import load_backbone, torch_dtype, transformers_model
from peftlab.errors import PeftLabError
from peftlab.methods.base import HEAD_NAMES
from peftlab.methods.lora import RESIDUAL_INITS, LoRA


def compute_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it (the paper's choice), else fp32 (CPUs, older GPUs)."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return torch_dtype(name)


class QLoRA(LoRA):
    """LoRA adapters in full precision on a frozen 4-bit (NF4 or FP4) backbone.

    The linear layers of the backbone are stored in 4 bits (bitsandbytes ``Linear4bit``); each forward
    dequantizes blocks to ``compute_dtype``. ``prepare_model_for_kbit_training`` casts the remaining
    small parameters (norms, embeddings) to fp32 and enables input gradients. Works on CPU (bitsandbytes
    >= 0.45) and on CUDA GPUs unchanged. Use ``optimizer: paged_adamw_8bit`` or ``paged_adamw_32bit`` for
    the paper's paged optimizers. LoRA's variant options apply: ``use_dora`` (QDoRA; merged as
    ``m * (W + dW) / ||W + dW||`` on the dequantized weight), ``use_rslora`` and ``loraplus_lr_ratio``; ``init: pissa``
    / ``olora`` are refused (the 4-bit backbone could not hold the residual exactly).

    Args:
        quant_type: ``nf4`` (4-bit NormalFloat, the paper's) or ``fp4``.
        double_quant: also quantize the quantization constants (saves ~0.37 bit per parameter).
        compute_dtype: dtype of the dequantized matmuls: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        gradient_checkpointing: recompute activations in backward to save memory.
        quant_storage: dtype the packed 4-bit weights are stored in: ``uint8`` (bitsandbytes' default), or
            ``bfloat16``/``float16``/``float32`` (bitsandbytes' option for sharding 4-bit weights): under
            FSDP2Strategy with ``mixed_precision: bf16`` store them in ``bfloat16`` (docs/distributed.md).
        optimizer: see :class:`PeftModule`; QLoRA defaults to the paper's ``paged_adamw_32bit``.
        **kwargs: the :class:`LoRA` arguments (r, alpha, target_modules, ...) and :class:`PeftModule` ones.
    """

    name = "qlora"
    stack_role = None  # a stack's additive part shares the stack's (unquantized) backbone

    def __init__(
        self,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        gradient_checkpointing: bool = False,
        quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8",
        optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "paged_adamw_32bit",
        **kwargs,
    ):
        init = kwargs.get("init", "default")
        if init in RESIDUAL_INITS:
            raise PeftLabError(
                f"QLoRA cannot use init: {init}: it moves the top of each weight into A and B and leaves the residual "
                "W - s B0 A0 in the backbone, which a 4-bit backbone stores only approximately (the exported adapter "
                "would not be exact on the original backbone); use peftlab.methods.PiSSA / LoRA in full precision"
            )
        super().__init__(optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, **kwargs)

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        s = self.hparams
        extra = {}
        if self.task == "classification":
            # the new head is trained in full (peft copies it into modules_to_save): keep it unquantized
            extra["llm_int8_skip_modules"] = list(HEAD_NAMES)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                                  bnb_4bit_use_double_quant=s["double_quant"],
                                  bnb_4bit_compute_dtype=compute_dtype(s["compute_dtype"]),
                                  bnb_4bit_quant_storage=getattr(torch, s["quant_storage"]), **extra)

    def shared_backbone_key(self) -> dict:
        """The 4-bit backbone also depends on its quantization settings."""
        h = self.hparams
        return {**super().shared_backbone_key(), "quantization": [h["quant_type"], h["double_quant"],
                                                                 h["compute_dtype"], h["quant_storage"]]}

    def load_backbone(self) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        h = self.hparams
        # bitsandbytes quantizes while loading onto the device: this rank's GPU, or the CPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        model = load_backbone(h.backbone, self.task, num_labels=self.num_labels, dtype=h.dtype,
                              trust_remote_code=h.trust_remote_code, revision=h.revision,
                              quantization_config=self.quantization_config(), device_map={"": device},
                              **self.attention_kwargs())
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes repacks 4-bit weights for a bf16 CPU inference kernel on the first eval forward
                # and never unpacks them, after which training fails ("a view of a leaf Variable ... in-place
                # operation") -- e.g. on the first step after a validation. Keep the training layout.
                module.support_avx512bf16_for_cpu = False
        if device == "cpu":
            # bitsandbytes' CPU kernels pack 4-bit weights in blocks of 64 input features
            small = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit" and m.in_features < 64]
            if small:
                raise PeftLabError(
                    f"QLoRA on CPU needs linear layers with >= 64 input features; {small[0]} has "
                    f"{model.get_submodule(small[0]).in_features}. Use LoRA for so small a model, or a GPU."
                )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=h.gradient_checkpointing)
        release_checkpoint_mapping(model)
        return model


    def merged_model(self, dtype: str = "float32") -> nn.Module:
        """Merging into 4-bit weights would requantize ``W + dW`` and lose the update's precision: the backbone is
        rebuilt in full precision, every 4-bit layer set to dequant(W) (+ its LoRA update; with DoRA
        ``m * (W + dW) / ||W + dW||``), and the result cast to ``dtype``. Not bit-equal to the 4-bit model that was
        trained (``peftlab merge`` reports the difference). An adapted layer the backbone kept in full precision
        (``_keep_in_fp32_modules``, e.g. T5's ``wo``) gets its update on its own weight."""
        import bitsandbytes as bnb
        from peft.utils.integrations import dequantize_bnb_weight

        out_dtype = torch_dtype(dtype)
        h = self.hparams
        plain = load_backbone(h.backbone, self.task, num_labels=self.num_labels, dtype="float32",
                              trust_remote_code=h.trust_remote_code, revision=h.revision)
        peft_model = self.lora_model()
        prefix = "base_model.model."
        with torch.no_grad():
            for name, layer in peft_model.named_modules():
                quantized = isinstance(layer, bnb.nn.Linear4bit)
                if not (quantized or name.endswith(".base_layer")):
                    continue
                target = name.removeprefix(prefix).removesuffix(".base_layer")
                weight = dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state).float() if quantized \
                    else layer.weight.detach().float()
                if name.endswith(".base_layer"):
                    lora = peft_model.get_submodule(name.removesuffix(".base_layer"))
                    for adapter in lora.active_adapters:
                        weight = weight + lora.get_delta_weight(adapter).float()
                        if lora.use_dora.get(adapter, False):  # DoRA: m * (W + dW) / ||W + dW|| per output row
                            magnitude = lora.lora_magnitude_vector[adapter].weight.float()
                            weight = (magnitude / torch.linalg.norm(weight, dim=1)).view(-1, 1) * weight
                dest = plain.get_submodule(target)
                dest.weight.copy_(weight.to(dest.weight.dtype))
                if layer.bias is not None:
                    dest.bias.copy_(layer.bias.to(dest.bias.dtype))
            # trained full copies (peft's modules_to_save, e.g. the classification head)
            for name, param in peft_model.named_parameters():
                if param.requires_grad and ".modules_to_save.default." in name:
                    target = name.removeprefix(prefix).replace(".modules_to_save.default.", ".")
                    plain.get_parameter(target).copy_(param)
        return plain.to(out_dtype).eval()

    def quantized_weights(self) -> dict[int, int]:
        """The frozen linear weights bitsandbytes stores in 4 bits (all but the skipped modules: the classification
        head, the output embedding / tied weights, ``_keep_in_fp32_modules``), each with its bytes: packed values +
        absmax (+ double quantization's nested constants). Decided from the module names, as transformers does, so
        it answers on the meta device too."""
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        self._require_built("the quantized weights")
        base = transformers_model(self.model)
        skip = list(HEAD_NAMES) if self.task == "classification" else get_keys_to_not_convert(base)
        skip += list(getattr(base, "_keep_in_fp32_modules", None) or [])
        out = {}
        for name, sub in base.named_modules():
            weight = getattr(sub, "weight", None)
            linear = type(sub) is nn.Linear or isinstance(sub, Conv1D) or type(sub).__name__ == "Linear4bit"
            if linear and weight is not None and not weight.requires_grad:
                clean = name.replace(".base_layer", "").replace(".original_module", "")
                if should_convert_module(clean, skip):
                    n = math.prod(weight.quant_state.shape) if getattr(weight, "quant_state", None) else weight.numel()
                    out[id(weight)] = nf4_bytes(n, self.hparams.double_quant)
        return out


#: bitsandbytes' 4-bit block sizes: values per absmax, absmax values per nested (double-quantization) absmax
BNB_4BIT_BLOCK, BNB_NESTED_BLOCK = 64, 256


def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one 4-bit bitsandbytes weight of ``n`` elements: packed values + absmax (+ nested absmax)."""
    blocks = math.ceil(n / BNB_4BIT_BLOCK)
    code = 4 * 16  # the 16-entry fp32 NF4/FP4 code book
    if double_quant:  # absmax as uint8 in blocks of 256, each with an fp32 absmax; 256-entry code; fp32 offset
        return math.ceil(n / 2) + code + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 4 * 256 + 4
    return math.ceil(n / 2) + code + 4 * blocks


def release_checkpoint_mapping(model: nn.Module) -> None:
    """Copy the parameters and buffers that loading left as views of the memory-mapped checkpoint file.

    transformers memory-maps safetensors files; the 4-bit layers get new storage, but tensors kept in the
    checkpoint's own dtype (embeddings and norms of an fp32 checkpoint) still point into the mapping, which
    keeps the whole fp32 file resident, so QLoRA used more memory than fp32 LoRA (measured in
    docs/benchmarks.md, "Memory"; benchmarks/qlora_mapping.py).
    """
    with torch.no_grad():
        for module in model.modules():
            for _name, param in list(module.named_parameters(recurse=False)):
                if type(param).__name__ != "Params4bit":
                    param.data = param.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buffer.clone()
