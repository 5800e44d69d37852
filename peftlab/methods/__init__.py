"""peftlab methods: one LightningModule per PEFT method, all subclasses of :class:`PeftModule`."""

from peftlab.methods.base import PeftModule
from peftlab.methods.full import FullFineTuning
from peftlab.methods.lora import LoRA

__all__ = ["PeftModule", "FullFineTuning", "LoRA"]
