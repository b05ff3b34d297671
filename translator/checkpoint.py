"""A model directory: everything needed to translate, and nothing that executes on load.

    config.json          {"format_version": 1, "recipe": {...}}   the resolved recipe
    model.safetensors    the weights
    sentencepiece.model  the joint subword model

Every file is written atomically (temporary file in the same directory, fsync, rename), so
a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Recipe, RecipeError, recipe_from_dict
from .model import Transformer
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG, WEIGHTS, SPM = "config.json", "model.safetensors", "sentencepiece.model"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then fsync and rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_weights(model: Transformer, path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format_version": str(FORMAT_VERSION)}))


def save_model_dir(directory: str | Path, model: Transformer, recipe: Recipe, tokenizer: Tokenizer) -> None:
    directory = Path(directory)
    config = json.dumps({"format_version": FORMAT_VERSION, "recipe": recipe.to_dict()}, indent=2)
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(config + "\n", encoding="utf-8"))
    atomic_write(directory / SPM, lambda tmp: Path(tmp).write_bytes(tokenizer.model_proto))
    save_weights(model, directory / WEIGHTS)


def load_recipe_json(directory: Path) -> Recipe:
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} was written by a newer translator (this one reads {FORMAT_VERSION}); upgrade translator")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not one this translator reads ({FORMAT_VERSION})")
    try:
        return recipe_from_dict(config["recipe"])
    except (KeyError, RecipeError) as e:
        raise CheckpointError(f"{path}: invalid recipe ({e})") from None


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Recipe, Transformer, Tokenizer]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    recipe = load_recipe_json(directory)
    try:
        tokenizer = Tokenizer.load(directory / SPM)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{directory / SPM}: cannot load the SentencePiece model ({e})") from None
    model = Transformer(recipe.model, tokenizer.vocab_size)
    try:
        state = load_file(directory / WEIGHTS, device=str(device))  # safetensors: tensors only, never code
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory / WEIGHTS}: cannot load the weights ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory / WEIGHTS}: weights do not match config.json ({e})") from None
    return recipe, model.to(device).eval(), tokenizer
