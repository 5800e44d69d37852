"""Adapter-only checkpoints (a mixin of :class:`~peftlab.methods.PeftModule`): a checkpoint holds the trainable
parameters only, by names without the segments wrappers insert, and is checked against the model when loaded."""

from __future__ import annotations

from torch import nn

from peftlab.adapters import state_mismatch, unwrapped_name
from peftlab.errors import PeftLabError
from peftlab.strategies import is_sharded


class AdapterCheckpoints:
    """``on_save_checkpoint`` / ``on_load_checkpoint`` over the trainable parameters."""

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by their checkpoint names: without the ``_fsdp_wrapped_module.`` (and
        activation-checkpointing / ``torch.compile``) segments that wrappers insert into module paths."""
        return {unwrapped_name(n): p for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint):
        # Only trainable parameters: a LoRA checkpoint is the size of the adapter, not of the backbone.
        names = set(self.trainable_named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if unwrapped_name(k) in names}
        checkpoint["peftlab"] = {"method": type(self).__name__, "trainable_only": True}

    def on_load_checkpoint(self, checkpoint):
        # strict_loading is off (the backbone is not in the file), so check the adapter part ourselves.
        if "state_dict" not in checkpoint:
            # a sharding strategy (FSDP2's distributed checkpoint, DeepSpeed) loaded the weights itself, by name,
            # before this hook: there is nothing here to compare
            return
        got = {unwrapped_name(k): v for k, v in checkpoint["state_dict"].items()}
        # under a sharding strategy a rank holds flat shards, not the parameters' shapes: compare names only
        detail = state_mismatch(self.trainable_named_parameters(), got, shapes=not is_sharded(self))
        if detail:
            raise PeftLabError(
                f"checkpoint does not match this {type(self).__name__} model ({detail}); it was written by "
                "another method, backbone or setting. Resume with the config the checkpoint was trained with."
            )
