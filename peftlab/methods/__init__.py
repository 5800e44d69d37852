"""peftlab methods: one LightningModule per PEFT method, all subclasses of :class:`PeftModule`."""

from peftlab.methods.adalora import AdaLoRA
from peftlab.methods.adapters import BottleneckAdapter
from peftlab.methods.base import PeftModule
from peftlab.methods.full import FullFineTuning
from peftlab.methods.lora import LoRA
from peftlab.methods.lora_prompt import LoRAPromptTuning
from peftlab.methods.lora_variants import DoRA, LoRAPlus, PiSSA, RSLoRA
from peftlab.methods.p_tuning import PTuning
from peftlab.methods.p_tuning_v2 import PTuningV2
from peftlab.methods.prefix_tuning import PrefixTuning
from peftlab.methods.prompt_tuning import PromptTuning
from peftlab.methods.qlora import QLoRA
from peftlab.methods.registry import METHODS
from peftlab.methods.stack import Stack

__all__ = ["METHODS", "PeftModule", "FullFineTuning", "LoRA", "QLoRA", "PromptTuning", "PTuning", "PrefixTuning",
           "PTuningV2", "BottleneckAdapter", "LoRAPromptTuning", "DoRA", "RSLoRA", "PiSSA", "LoRAPlus", "AdaLoRA",
           "Stack"]
