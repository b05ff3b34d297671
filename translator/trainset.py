"""The training split as token-budget batches: tokenized (cached by `datasets`), filtered by rule,
and batched in memory, segmented anew each epoch (subword sampling), or streamed.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import datasets
import numpy as np
import torch

from .batching import bucketed_batches, sorted_batches, source_tensor, target_tensors
from .config import DataConfig
from .data import DataError, read_named, split_source, texts
from .tokenizer import PAD_ID, Tokenizer


def tokenize(pairs: datasets.Dataset, tokenizer: Tokenizer, num_proc: int | None = None) -> datasets.Dataset:
    """Add `src_ids` and `tgt_ids` (no specials); cached on disk by `datasets` for file-backed data."""
    fingerprint = hashlib.sha256(tokenizer.model_proto + pairs._fingerprint.encode()).hexdigest()[:32]
    return pairs.map(
        lambda batch: {side + "_ids": tokenizer.encode(texts(batch[side])) for side in ("src", "tgt")},
        batched=True,
        batch_size=10_000,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


@dataclass
class FilterReport:
    kept: int
    empty: int
    too_long: int
    bad_ratio: int

    def __str__(self) -> str:
        return (f"kept {self.kept} pairs; dropped {self.empty} with an empty or blank side, "
                f"{self.too_long} longer than data.max_len, {self.bad_ratio} past data.max_ratio")


def broken_rules(src_len: np.ndarray, tgt_len: np.ndarray, max_len: int, max_ratio: float) -> tuple[np.ndarray, ...]:
    """Per pair (subword counts of each side), the first filter rule it breaks: masks empty, too_long, bad_ratio."""
    shorter, longer = np.minimum(src_len, tgt_len), np.maximum(src_len, tgt_len)
    empty = shorter == 0  # blank lines encode to no pieces at all
    too_long = ~empty & (longer > max_len)
    bad_ratio = ~empty & ~too_long & (max_ratio > 0) & (longer > max_ratio * shorter)
    return empty, too_long, bad_ratio


def filter_pairs(tokenized: datasets.Dataset, max_len: int, max_ratio: float) -> tuple[datasets.Dataset, FilterReport]:
    """Drop pairs by rule, each pair counted under the first rule it breaks."""
    empty, too_long, bad_ratio = broken_rules(*lengths(tokenized), max_len, max_ratio)
    keep = np.flatnonzero(~(empty | too_long | bad_ratio))
    return tokenized.select(keep), FilterReport(len(keep), int(empty.sum()), int(too_long.sum()), int(bad_ratio.sum()))


def training_pairs(pairs: datasets.Dataset, tokenizer: Tokenizer, cfg: DataConfig) -> tuple[datasets.Dataset, FilterReport]:
    """The training split tokenized and filtered; an error naming the split if no pair is left to train on."""
    kept, report = filter_pairs(tokenize(pairs, tokenizer, cfg.num_proc), cfg.max_len, cfg.max_ratio)
    if not report.kept:
        raise DataError(f"{split_source(cfg, cfg.train_split)}: no pair left to train on ({report}); see data.max_len and data.max_ratio")
    return kept, report


def lengths(tokenized: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Subword counts per side, without specials."""
    counted = tokenized.map(
        lambda batch: {"src_len": [len(x) for x in batch["src_ids"]], "tgt_len": [len(x) for x in batch["tgt_ids"]]},
        batched=True,
        batch_size=10_000,
        remove_columns=tokenized.column_names,
        desc="counting",
    ).with_format("numpy")
    return counted["src_len"][:], counted["tgt_len"][:]


@dataclass
class Batch:
    src: torch.Tensor  # (B, S)
    tgt_in: torch.Tensor  # (B, T)
    tgt_out: torch.Tensor  # (B, T)

    @classmethod
    def of(cls, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> Batch:
        """Padded tensors from token lists without specials."""
        return cls(source_tensor(src_ids), *target_tensors(tgt_ids))

    @functools.cached_property
    def n_tgt_tokens(self) -> int:
        return int((self.tgt_out != 0).sum())

    @property
    def padding(self) -> tuple[int, int]:
        """Padding positions and all positions, source and target (by the outputs: real up to each eos) together."""
        pads = int((self.src == PAD_ID).sum()) + int((self.tgt_out == PAD_ID).sum())
        return pads, self.src.numel() + self.tgt_out.numel()

    def to(self, device: torch.device) -> Batch:
        moved = Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device))
        moved.n_tgt_tokens = self.n_tgt_tokens  # counted here: on a GPU batch, counting waits for the GPU (a host sync)
        return moved


class TrainBatches:
    """Token-budget batches over a tokenized dataset, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, tokenized: datasets.Dataset, max_tokens: int, seed: int):
        self.dataset = tokenized.select_columns(["src_ids", "tgt_ids"])
        src_len, tgt_len = lengths(tokenized)
        self.sizes = np.maximum(src_len, tgt_len) + 1  # + eos (source) / + bos (target input)
        self.max_tokens, self.seed = max_tokens, seed

    def epoch(self, epoch: int) -> list[np.ndarray]:
        return bucketed_batches(self.sizes, self.max_tokens, self.seed, epoch)

    def collate(self, indices: np.ndarray) -> Batch:
        rows = self.dataset[indices]
        return Batch.of(rows["src_ids"], rows["tgt_ids"])

    def from_position(self, position: dict) -> Iterator[tuple[dict, Batch]]:
        """Endless, epoch after epoch, from `position` ({} is the start): (the position after it, batch)."""
        epoch, start = position.get("epoch", 0), position.get("batch_in_epoch", 0)
        while True:
            for index, indices in enumerate(self.epoch(epoch)):
                if index >= start:
                    yield {"epoch": epoch, "batch_in_epoch": index + 1}, self.collate(indices)
            epoch, start = epoch + 1, 0


class SampledTrainBatches(TrainBatches):
    """TrainBatches whose pairs are segmented anew each epoch, drawn from the SentencePiece model
    (subword regularisation, Kudo 2018; BPE-dropout for bpe models): the same pairs, other pieces.
    A sampled side longer than `max_len` keeps its best segmentation. Batches are collated from
    the epoch asked for last.

    The draws are seeded by (seed, epoch), but SentencePiece 0.2.3 repeats seeded draws within a
    process only (its absl::BitGen salts every seed per process), so no process can draw an
    epoch's pieces again: a checkpoint keeps them (`drawn`, `restore`), and a resumed run finishes
    its epoch on the very batches it had, then draws the next epochs as any run does (not the
    pieces the uninterrupted run would have drawn). Under torchrun rank 0 draws and every rank
    takes its pieces (`agree`: given the draw, returns rank 0's result), so all cut the same batches."""

    def __init__(self, tokenized: datasets.Dataset, max_tokens: int, seed: int, tokenizer: Tokenizer, sampling: float, max_len: int,
                 agree: Callable[[Callable[[], list]], list] = lambda draw: draw()):
        super().__init__(tokenized, max_tokens, seed)
        self.text_pairs = tokenized.select_columns(["src", "tgt"])
        self.tokenizer, self.sampling, self.max_len, self.agree = tokenizer, sampling, max_len, agree
        self.best = {side: list(self.dataset[side + "_ids"]) for side in ("src", "tgt")}  # the fallback for a long draw, read once
        self.segmented: tuple[int, dict[str, list[list[int]]], np.ndarray] | None = None

    def _segment(self, epoch: int) -> tuple[dict[str, list[list[int]]], np.ndarray]:
        if self.segmented is None or self.segmented[0] != epoch:
            ids = {}
            for i, side in enumerate(("src", "tgt")):
                seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
                drawn = self.agree(lambda: self.tokenizer.encode(texts(self.text_pairs[side]), self.sampling, seed))
                ids[side] = [d if len(d) <= self.max_len else b for d, b in zip(drawn, self.best[side])]
            self._keep(epoch, ids)
        return self.segmented[1], self.segmented[2]

    def _keep(self, epoch: int, ids: dict[str, list[list[int]]]) -> None:
        sizes = np.maximum([len(x) for x in ids["src"]], [len(x) for x in ids["tgt"]]) + 1
        self.segmented = (epoch, ids, sizes)

    def drawn(self) -> dict[str, np.ndarray]:
        """The pieces of the epoch drawn last, as flat arrays for a checkpoint."""
        if self.segmented is None:
            return {}
        epoch, ids, _ = self.segmented
        arrays = {"epoch": np.array([epoch], dtype=np.int64)}
        for side in ("src", "tgt"):
            arrays[side + "_lengths"] = np.array([len(x) for x in ids[side]], dtype=np.int32)
            arrays[side + "_ids"] = np.fromiter((t for x in ids[side] for t in x), dtype=np.int32)
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back an epoch's pieces from `drawn`: asked for that epoch, the batches are the ones cut before."""
        if len(arrays["src_lengths"]) != len(self.best["src"]):
            raise DataError(f"the checkpoint's segmented epoch has {len(arrays['src_lengths'])} pairs, the training split {len(self.best['src'])}")
        ids = {side: [x.tolist() for x in np.split(arrays[side + "_ids"], np.cumsum(arrays[side + "_lengths"])[:-1])]
               for side in ("src", "tgt")}
        self._keep(int(arrays["epoch"][0]), ids)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        return bucketed_batches(self._segment(epoch)[1], self.max_tokens, self.seed, epoch)

    def collate(self, indices: np.ndarray) -> Batch:
        ids = self.segmented[1]
        return Batch.of([ids["src"][i] for i in indices], [ids["tgt"][i] for i in indices])


class StreamBatches:
    """Token-budget batches over a stream of pairs too large to hold or to store: the stream is
    shuffled through a buffer (a new order each epoch), read a pool at a time, and each pool is
    tokenized, filtered, sorted by length, cut by budget, and its batches shuffled.

    A position is (epoch, pairs read before the current pool, batches of it taken): resuming
    skips that many pairs of the same shuffled stream, so it goes on with the very same batches.
    """

    def __init__(self, pairs: datasets.IterableDataset, tokenizer: Tokenizer, max_tokens: int, seed: int, max_len: int,
                 max_ratio: float, pool_size: int = 100_000, shuffle_buffer: int = 10_000, source: str = "the training stream"):
        """`source`: the stream's file or dataset, named by an error in reading it."""
        self.pairs, self.tokenizer, self.max_tokens, self.seed, self.source = pairs, tokenizer, max_tokens, seed, source
        self.max_len, self.max_ratio, self.pool_size, self.shuffle_buffer = max_len, max_ratio, pool_size, shuffle_buffer

    def _pool_batches(self, pool: list[dict], epoch: int, read_before: int) -> tuple[list[list[int]], list[list[int]], list[np.ndarray]]:
        """The pool's token ids (source, target) and its batches as index arrays into them, in the order to take them."""
        src_ids = self.tokenizer.encode(texts(pair["src"] for pair in pool))
        tgt_ids = self.tokenizer.encode(texts(pair["tgt"] for pair in pool))
        src_len, tgt_len = np.array([len(x) for x in src_ids]), np.array([len(x) for x in tgt_ids])
        keep = np.flatnonzero(~np.logical_or.reduce(broken_rules(src_len, tgt_len, self.max_len, self.max_ratio)))
        sizes = np.maximum(src_len, tgt_len) + 1
        batches = sorted_batches(keep, sizes, self.max_tokens)
        order = np.random.default_rng([self.seed, epoch, read_before]).permutation(len(batches))
        return src_ids, tgt_ids, [batches[b] for b in order]

    def from_position(self, position: dict) -> Iterator[tuple[dict, Batch]]:
        epoch, read, start = position.get("epoch", 0), position.get("pairs_read", 0), position.get("batch_in_pool", 0)
        while True:
            stream = self.pairs.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(epoch)
            # islice, not stream.skip: skip() builds a new stream without the epoch set above, so every
            # epoch would read epoch 0's order, the same pools and so the same batches.
            pairs, any_batch = read_named(islice(stream, read, None), self.source), read > 0
            while pool := list(islice(pairs, self.pool_size)):
                src_ids, tgt_ids, batches = self._pool_batches(pool, epoch, read)
                for index in range(start, len(batches)):  # collated as taken: a resume builds none it skips
                    last = index + 1 == len(batches)
                    after = {"epoch": epoch, "pairs_read": read + len(pool) * last, "batch_in_pool": 0 if last else index + 1}
                    yield after, Batch.of([src_ids[i] for i in batches[index]], [tgt_ids[i] for i in batches[index]])
                read, start, any_batch = read + len(pool), 0, any_batch or bool(batches)
            if not any_batch:
                raise DataError(f"{self.source}: the training stream holds no pair that passes the filters "
                                "(both sides non-empty, within data.max_len and data.max_ratio)")
            epoch, read = epoch + 1, 0
