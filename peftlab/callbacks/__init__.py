"""peftlab callbacks: adapter export (on by default in the CLI), LoRA merging, LoRA composition."""

from peftlab.callbacks.compose import ComposeLoRA
from peftlab.callbacks.export import AdapterExport
from peftlab.callbacks.merge import LoRAMerge
from peftlab.callbacks.timer import EpochTimer

__all__ = ["AdapterExport", "ComposeLoRA", "EpochTimer", "LoRAMerge"]
