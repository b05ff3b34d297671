"""translator: a small, fast, readable encoder-decoder Transformer toolkit for machine translation."""

__version__ = "0.1.0"

from .api import Translation, Translator  # noqa: E402
from .config import Recipe, RecipeError, load_recipe  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .search import Sampling  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["Translator", "Translation", "Sampling", "Recipe", "RecipeError", "load_recipe", "train", "evaluate"]
