"""peftlab: parameter-efficient fine-tuning of transformers as PyTorch Lightning modules.

Heavy libraries (torch, lightning, transformers) load only when a name below is first used.
"""

__version__ = "0.1.0"

from peftlab.compat import quiet_upstream_noise as _quiet_upstream_noise  # noqa: E402

_quiet_upstream_noise()

_LAZY = {
    "PeftModule": "peftlab.methods",
    "FullFineTuning": "peftlab.methods",
    "LoRA": "peftlab.methods",
    "QLoRA": "peftlab.methods",
    "PromptTuning": "peftlab.methods",
    "PTuning": "peftlab.methods",
    "PrefixTuning": "peftlab.methods",
    "PTuningV2": "peftlab.methods",
    "BottleneckAdapter": "peftlab.methods",
    "LoRAPromptTuning": "peftlab.methods",
    "DoRA": "peftlab.methods",
    "RSLoRA": "peftlab.methods",
    "PiSSA": "peftlab.methods",
    "LoRAPlus": "peftlab.methods",
    "AdaLoRA": "peftlab.methods",
    "Stack": "peftlab.methods",
    "PeftDataModule": "peftlab.data",
    "PeftLabError": "peftlab.errors",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
