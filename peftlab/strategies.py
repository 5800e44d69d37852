"""``FSDP2Strategy``: fully sharded data parallelism for PEFT, through Lightning's ``ModelParallelStrategy``.

Lightning's ``ModelParallelStrategy`` leaves applying ``fully_shard`` (FSDP2) to the user's ``configure_model``.
This strategy does it for every peftlab method, so a config only names it (``configs/strategies/fsdp2.yaml``):

* one FSDP2 unit per transformer block, found from the transformers model's own ``_no_split_modules`` (e.g.
  ``LlamaDecoderLayer``), plus the root (embeddings, head, and the method's prompt / prefix parameters). FSDP2
  shards every parameter on its own, so frozen and trainable weights share a unit and only trainable ones get
  gradients (FSDP1's flat parameters needed ``use_orig_params`` and one dtype per unit);
* a sharded start (``sharded_start: true``, the default): the backbone is built from its config with placeholders
  for its weights, sharded, then each rank reads only its rows of each tensor from the safetensors checkpoint
  (:func:`peftlab.backbones.load_shards`): peak host memory during start-up is about one shard per process
  instead of one full copy (docs/distributed.md has the measurement);
* an optional mixed-precision policy: compute in bf16/fp16, reduce gradients in fp32, parameters stored as
  they are (peft keeps adapters in fp32);
* checkpoints are distributed (each rank writes its shard) and hold the trainable parameters and optimizer
  state only (``PeftModule.on_save_checkpoint``), written to a temporary directory and renamed into place, so
  a crash mid-save leaves the previous checkpoint;
* exported adapters gather the *trainable* parameters only (never the frozen backbone on one rank), see
  :func:`peftlab.adapters.trainable_state`.

FSDP1 (Lightning's ``FSDPStrategy``) and DeepSpeed configs were retired in favour of this one: docs/distributed.md
says why. QLoRA's packed 4-bit weights are sharded like any tensor (with a mixed-precision policy they must be stored
in its dtype: ``model.quant_storage``); its backbone loads in full (then shards), the sharded start does not
apply to quantized loading.
Tested on CPU with 2 processes over gloo (tests/integration/test_fsdp2_runs.py); see docs/distributed.md for what ran on GPUs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from peftlab.backbones import load_shards, sharded_start, torch_dtype
from peftlab.errors import PeftLabError


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s trainable parameters are sharded across processes (FSDP2 DTensors): a rank then holds
    shards, and gathering them is a collective."""
    return any(isinstance(p, DTensor) for p in module.parameters() if p.requires_grad)


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s repeated transformer blocks, from transformers' ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise PeftLabError(
            f"cannot find the transformer blocks of {type(model).__name__} to shard (it declares no "
            "_no_split_modules); use strategy ddp, or a backbone from transformers"
        )
    return classes


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2, ``fully_shard`` per transformer block) for any peftlab method.

    Args:
        mixed_precision: ``bf16`` / ``fp16``: all-gather and compute in that dtype, reduce gradients in fp32;
            ``null``: compute in the parameters' dtype (use with ``trainer.precision``'s autocast or fp32).
        reshard_after_forward: free each block's gathered parameters after its forward (less memory, one more
            all-gather in backward); ``false`` keeps them until backward (ZeRO-2-like).
        save_distributed_checkpoint: each rank writes its shard (a checkpoint directory); ``false`` gathers the
            (trainable-only) state on rank 0 into one file.
        data_parallel_size: processes that shard the model (default: all of them).
        tensor_parallel_size: must be 1 (no tensor parallelism).
        sharded_start: build the backbone without its weights and fill each rank's shards from the safetensors
            checkpoint after sharding (no rank holds a full copy); ``false`` loads the whole backbone on every
            process first. Methods whose attach reads the weights (DoRA, PiSSA, prompts started from embeddings)
            and checkpoints without safetensors files load in full either way.
    """

    def __init__(self, mixed_precision: Literal["bf16", "fp16"] | None = None, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, data_parallel_size: int | Literal["auto"] = "auto",
                 tensor_parallel_size: int = 1, sharded_start: bool = True, **kwargs: Any) -> None:
        if tensor_parallel_size != 1:
            raise PeftLabError("FSDP2Strategy shards data-parallel only: tensor_parallel_size must be 1")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.sharded_start = sharded_start

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # all processes shard (Lightning's default is one group per node)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @contextlib.contextmanager
    def model_sharded_context(self):
        """Around the method's ``configure_model``: with ``sharded_start``, backbones are built without weights."""
        with super().model_sharded_context(), sharded_start(self.sharded_start):
            yield

    def setup(self, trainer) -> None:
        # configure_model (the method's build) has run: shard before Lightning materializes and moves the model
        self.shard(self.lightning_module)
        super().setup(trainer)

    def shard(self, module) -> None:
        """``fully_shard`` every transformer block of ``module.model``, then its root."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        model = getattr(module, "model", None)
        if isinstance(model, FSDPModule):  # already sharded (test / predict after fit reuse the model)
            return
        if model is None:
            raise PeftLabError(f"{type(module).__name__} has no built model to shard; FSDP2Strategy shards peftlab "
                               "methods (their configure_model builds self.model)")
        self.check_packed_weights(module, model)
        mesh = self.device_mesh["data_parallel"]
        policy = None
        if self.mixed_precision:
            policy = MixedPrecisionPolicy(param_dtype=torch_dtype(self.mixed_precision), reduce_dtype=torch.float32)
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if policy is not None:
            options["mp_policy"] = policy
        blocks = transformer_block_classes(model)
        for sub in model.modules():
            if type(sub) in blocks:
                fully_shard(sub, **options)
        fully_shard(model, **options)
        load_shards(model)  # a sharded start's placeholders: each rank reads its rows of the checkpoint

    def check_packed_weights(self, module, model) -> None:
        """Packed quantized weights (QLoRA's 4-bit values in bitsandbytes' ``quant_storage`` dtype) shard like any
        tensor: FSDP2 moves their bytes and bitsandbytes finds their quantization state on the module. A mixed
        precision policy would cast them to its dtype and scramble the bytes, unless they are stored in it."""
        quantized = module.quantized_weights() if hasattr(module, "quantized_weights") else {}
        if not self.mixed_precision or not quantized:
            return
        wanted = torch_dtype(self.mixed_precision)
        stored = {p.dtype for p in model.parameters() if id(p) in quantized}
        if stored - {wanted}:
            name = str(wanted).removeprefix("torch.")
            raise PeftLabError(
                f"{type(module).__name__}'s quantized weights are stored as {', '.join(sorted(map(str, stored)))} "
                f"and mixed_precision: {self.mixed_precision} would cast (scramble) them: store them in {name} "
                f"(model.quant_storage: {name}) or set the strategy's mixed_precision: null")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Lightning's save, into a temporary sibling renamed into place: a crash mid-save keeps the old one."""
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("peftlab_checkpoint_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("peftlab_checkpoint_written")
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier("peftlab_checkpoint_renamed")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, for checkpoints that hold the trainable parameters only.

        Lightning 2.6 reads a distributed checkpoint into the *whole* model's state dict, and torch's distributed
        checkpoint then refuses every frozen key the file does not hold ("Missing key in checkpoint state_dict"):
        here only the trainable parameters (and the optimizer state) are requested. The loop state and callbacks'
        states are read weights-only, like every checkpoint peftlab reads."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=True)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from peftlab.checkpointing import checkpoint_errors

        module = self.model
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in get_model_state_dict(module).items() if k in trainable}
        with checkpoint_errors(path):
            dcp.load({"state_dict": model_state}, checkpoint_id=path)
            set_model_state_dict(module, model_state, options=StateDictOptions(strict=False))
            for index, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{index}"
                optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
                dcp.load(optimizer_state, checkpoint_id=path)
                set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                         options=StateDictOptions(cpu_offload=True))
            return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
