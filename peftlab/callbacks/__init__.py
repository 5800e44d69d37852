"""peftlab callbacks: adapter export and the newest-state checkpoint (both on by default in the CLI), LoRA
merging, LoRA composition, prediction writing (added by ``peftlab predict``)."""

from peftlab.callbacks.compose import ComposeLoRA
from peftlab.callbacks.export import AdapterExport
from peftlab.callbacks.last import LastCheckpoint
from peftlab.callbacks.merge import LoRAMerge
from peftlab.callbacks.predictions import PredictionWriter
from peftlab.callbacks.timer import EpochTimer

__all__ = ["AdapterExport", "ComposeLoRA", "EpochTimer", "LastCheckpoint", "LoRAMerge", "PredictionWriter"]
