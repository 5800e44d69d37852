"""peftlab: parameter-efficient fine-tuning of transformers as PyTorch Lightning modules.

Heavy libraries (torch, lightning, transformers) load only when a name below is first used.
"""

__version__ = "0.1.0"

from peftlab.compat import quiet_upstream_noise as _quiet_upstream_noise  # noqa: E402

_quiet_upstream_noise()

# every method class comes from peftlab.methods, which exports each shipped method (nothing lists them here)
_LAZY = {
    "PeftDataModule": "peftlab.data",
    "PeftLabError": "peftlab.errors",
}


def _methods():
    import importlib

    return importlib.import_module("peftlab.methods")


def __getattr__(name):
    if name == "__all__":  # computed: the method classes are known once peftlab.methods is imported
        return [n for n in _methods().__all__ if n != "METHODS"] + list(_LAZY)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name[:1].isupper() and name in _methods().__all__:
        return getattr(_methods(), name)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
