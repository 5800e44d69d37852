"""peftlab methods: one LightningModule per PEFT method, all subclasses of :class:`PeftModule`.

Every module of this package is imported here, and each method class it defines (a subclass with a ``name``) is
exported under its class name, so a shipped method is one file in this folder plus its preset
(``configs/methods/<name>.yaml``): nothing else lists it.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from peftlab.methods.base import PeftModule
from peftlab.methods.registry import METHODS, display_order

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _attr, _obj in vars(_module).items():
        # the classes defined in that module that register a name (not helpers such as PeftBackedMethod)
        if isinstance(_obj, type) and _obj.__module__ == _module.__name__ and _obj.__dict__.get("name"):
            globals()[_attr] = _obj

# display order without load_plugins(): a plugin that imports peftlab.methods must not run inside this import
__all__ = ["METHODS", "PeftModule"] + [
    METHODS[n].__name__
    for n in display_order(METHODS)
    if METHODS[n].__module__.startswith(f"{__name__}.")
]
