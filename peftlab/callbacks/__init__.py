"""peftlab callbacks: adapter export (on by default in the CLI) and LoRA merging."""

from peftlab.callbacks.export import AdapterExport
from peftlab.callbacks.merge import LoRAMerge

__all__ = ["AdapterExport", "LoRAMerge"]
