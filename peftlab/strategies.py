"""Lightning's FSDP strategy with the settings a frozen backbone needs.

Plain ``FSDPStrategy`` breaks on PEFT in two known ways, both fixed here without code of our own in the
training loop:

* a wrapped unit holding frozen and trainable parameters (a LoRA'd attention block) fails to flatten
  unless ``use_orig_params=True``;
* with no ``auto_wrap_policy`` the whole model is one unit: no memory is saved. peftlab wraps the
  backbone's transformer blocks, named by the transformers model itself (``_no_split_modules``, e.g.
  ``LlamaDecoderLayer``), so a config does not have to spell out classes.

Prompt/prefix parameters live outside the blocks and end up in the root unit, which is fine with
``use_orig_params``. Checkpoints use the ``full`` state dict (gathered on rank 0), which ``PeftModule``
then reduces to the trainable parameters, so the ``.ckpt`` stays adapter-sized.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s repeated transformer blocks, from transformers' ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        from peftlab.errors import PeftLabError

        raise PeftLabError(
            f"cannot find the transformer blocks of {type(model).__name__} to shard (it declares no "
            "_no_split_modules); give trainer.strategy.init_args.auto_wrap_policy explicitly"
        )
    return classes


class PeftFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` with ``use_orig_params=True`` and, unless given, an auto-wrap policy over the
    backbone's transformer blocks. Every other argument is Lightning's (``sharding_strategy``,
    ``cpu_offload``, ``mixed_precision``, ``state_dict_type``, ...)."""

    def __init__(self, use_orig_params: bool = True, **kwargs: Any) -> None:
        super().__init__(use_orig_params=use_orig_params, **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(transformer_block_classes(model))
        return super()._setup_model(model)
