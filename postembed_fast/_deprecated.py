"""Old import paths kept as re-exports, each with a DeprecationWarning naming the new place."""
from __future__ import annotations

import importlib
import warnings


def moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there (the old path will be removed)",
                  DeprecationWarning, stacklevel=stacklevel)


def reexport(old_module_globals: dict, old: str, new: str, *also: str) -> None:
    """Make module `old` (whose globals are given) hold the names of module `new` (and of the modules
    `also`, which took some of its names), after a DeprecationWarning at import time."""
    moved(old, new, stacklevel=4)
    for module in (*also, new):
        target = importlib.import_module(module)
        for name in dir(target):
            if not name.startswith("__"):
                old_module_globals[name] = getattr(target, name)
