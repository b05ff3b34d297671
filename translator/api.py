"""`Translator`: load a model directory and translate sentences.

    t = Translator.from_pretrained("runs/multi30k_de_en")
    t.translate("Ein Mann fährt Fahrrad.")                    # -> str
    t.translate(["Zwei Hunde.", "Ein Kind lacht."], beam_size=5)  # -> list[str], input order
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import chunk_by_budget, source_tensor
from .checkpoint import load_model_dir, save_model_dir
from .config import DecodeConfig, Recipe
from .model import Transformer
from .search import beam_search, greedy_search, max_output_lengths
from .tokenizer import PAD_ID, Tokenizer


class Translator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, recipe: Recipe):
        self.model, self.tokenizer, self.recipe = model.eval(), tokenizer, recipe
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Translator:
        """Load a model directory written by training or `save_pretrained` (no pickle involved)."""
        recipe, model, tokenizer = load_model_dir(path, device)
        return cls(model, tokenizer, recipe)

    def save_pretrained(self, path: str | Path) -> None:
        save_model_dir(path, self.model, self.recipe, self.tokenizer)

    def translate(
        self,
        sentences: str | list[str],
        *,
        beam_size: int | None = None,
        alpha: float | None = None,
        max_tokens: int | None = None,
        progress: bool = False,
    ) -> str | list[str]:
        """Translate one sentence (-> str) or a list (-> list[str], same order).

        Args:
            beam_size: 1 is greedy search; default from the recipe's `decode` section.
            alpha: GNMT length penalty for beam search; default from the recipe.
            max_tokens: source tokens per batch (sentences are sorted by length into batches).
            progress: show a progress bar on stderr.
        """
        single = isinstance(sentences, str)
        batch = [sentences] if single else list(sentences)
        for i, s in enumerate(batch):
            if not isinstance(s, str):
                raise TypeError(f"translate() takes a str or a list of str; item {i} is {type(s).__name__}: {s!r}")
        decode = self._decode_config(beam_size, alpha, max_tokens)
        outputs = self._translate(batch, decode, progress)
        return outputs[0] if single else outputs

    def _decode_config(self, beam_size: int | None, alpha: float | None, max_tokens: int | None) -> DecodeConfig:
        overrides = {k: v for k, v in dict(beam_size=beam_size, alpha=alpha, max_tokens=max_tokens).items() if v is not None}
        decode = replace(self.recipe.decode, **overrides)
        decode.validate()
        return decode

    def _translate(self, sentences: list[str], decode: DecodeConfig, progress: bool) -> list[str]:
        limit = self.recipe.model.max_positions
        src_ids = self.tokenizer.encode(sentences)
        too_long = [i for i, ids in enumerate(src_ids) if len(ids) + 1 > limit]
        if too_long:
            warnings.warn(f"{len(too_long)} sentence(s) longer than model.max_positions={limit} tokens were truncated (first: #{too_long[0]})")
            src_ids = [ids[: limit - 1] for ids in src_ids]
        outputs = [""] * len(sentences)
        # Blank input has nothing to translate: it maps to "" rather than to whatever the model invents.
        todo = np.array([i for i, s in enumerate(sentences) if s.strip()], dtype=np.int64)
        sizes = np.array([len(ids) + 1 for ids in src_ids], dtype=np.int64)
        order = todo[np.argsort(sizes[todo], kind="stable")]
        batches = chunk_by_budget(order, sizes, decode.max_tokens)
        for indices in tqdm(batches, desc="translating", unit="batch", disable=not progress):
            src = source_tensor([src_ids[i] for i in indices]).to(self.device)
            max_lens = max_output_lengths(src, PAD_ID, decode.max_len_a, decode.max_len_b, limit)
            if decode.beam_size == 1:
                best = [h.tokens for h in greedy_search(self.model, src, max_lens)]
            else:
                best = [hyps[0].tokens for hyps in beam_search(self.model, src, max_lens, decode.beam_size, decode.alpha)]
            for i, text in zip(indices, self.tokenizer.decode(best)):
                outputs[i] = text
        return outputs
