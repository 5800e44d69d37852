"""peftlab callbacks: adapter export and the newest-state checkpoint (both on by default in the CLI), LoRA
merging, LoRA composition, prediction writing (added by ``peftlab predict``), generated-text metrics and the test's
generations file (added by ``peftlab test``), lm-evaluation-harness tasks during training (``LMEval``)."""

from peftlab.callbacks.compose import ComposeLoRA
from peftlab.callbacks.export import AdapterExport
from peftlab.callbacks.generation import GenerationEval
from peftlab.callbacks.harness import LMEval
from peftlab.callbacks.last import LastCheckpoint
from peftlab.callbacks.merge import LoRAMerge
from peftlab.callbacks.predictions import PredictionWriter
from peftlab.callbacks.timer import EpochTimer

__all__ = ["AdapterExport", "ComposeLoRA", "EpochTimer", "GenerationEval", "LastCheckpoint", "LMEval", "LoRAMerge", "PredictionWriter"]
