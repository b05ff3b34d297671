"""Batches by a token budget, and padding: shared by training and inference.

A batch costs `sentences x longest sentence` tokens of compute (padding included), so
batches are formed over length-sorted runs of examples: neighbours have similar lengths
and little of the budget goes to padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID


def chunk_by_budget(order: np.ndarray, sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut `order` (indices, ideally sorted by size) into consecutive batches with
    len(batch) * max(size in batch) <= max_tokens. An example over budget gets a batch of its own."""
    batches, start, longest = [], 0, 0
    for end, index in enumerate(order):
        longest_if_added = max(longest, int(sizes[index]))
        if end > start and (end - start + 1) * longest_if_added > max_tokens:
            batches.append(order[start:end])
            start, longest_if_added = end, int(sizes[index])
        longest = longest_if_added
    if len(order) > start:
        batches.append(order[start:])
    return batches


def sorted_batches(indices: np.ndarray, sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """A pool of examples sorted by size, then cut by budget: neighbours in a batch have similar lengths."""
    return chunk_by_budget(indices[np.argsort(sizes[indices], kind="stable")], sizes, max_tokens)


def bucketed_batches(sizes: np.ndarray, max_tokens: int, seed: int, epoch: int, pool_size: int = 100_000) -> list[np.ndarray]:
    """One epoch of training batches: shuffle, sort inside large random pools, cut by budget, shuffle the batches.

    Each example lands in exactly one batch; the same (seed, epoch) gives the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(sizes))
    batches = []
    for start in range(0, len(order), pool_size):
        batches.extend(sorted_batches(order[start:start + pool_size], sizes, max_tokens))
    return [batches[i] for i in rng.permutation(len(batches))]


def pad(rows: Sequence[Sequence[int]], prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> torch.Tensor:
    """Right-pad token lists (with optional specials added to each) into a (B, L) tensor."""
    length = max(len(r) for r in rows) + len(prefix) + len(suffix)
    out = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        full = [*prefix, *row, *suffix]
        out[i, : len(full)] = full
    return torch.from_numpy(out)


def source_tensor(src_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    return pad(src_ids, suffix=[EOS_ID])  # (B, S)


def target_tensors(tgt_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: the decoder reads `bos y1 .. yn` and predicts `y1 .. yn eos`."""
    tgt = pad(tgt_ids, prefix=[BOS_ID], suffix=[EOS_ID])  # (B, T + 1)
    return tgt[:, :-1], tgt[:, 1:]
