"""translator: a small, fast, readable encoder-decoder Transformer toolkit for machine translation.

The public names are imported on first use (PEP 562), so that `import translator` and
`translator --help` do not wait for torch, `datasets` and the trainer.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_HOMES = {
    "Translator": "api", "Translation": "api", "SourceTooLong": "api", "PairTooLong": "api", "Sampling": "search",
    "Recipe": "config", "RecipeError": "config", "load_recipe": "config",
    "train": "train", "evaluate": "evaluate", "distill": "distill",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'translator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule translator.train (or .evaluate) binds it to the package under its name;
        # that name means the function, as `from .train import train` made it (importlib.import_module gets the module).
        if name in _HOMES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
