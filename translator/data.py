"""Parallel data from Hugging Face `datasets`: load a split, find the language columns,
tokenize (cached by `datasets`), filter, and serve token-budget batches.

Two layouts are understood, both common on the hub:
  flat columns      {"de": "...", "en": "..."}                     (bentrevett/multi30k)
  translation dict  {"translation": {"de": "...", "en": "..."}}    (wmt14, iwslt2017, opus_books)
and two of plain text in a local folder, read into the first:
  line-aligned      train.de + train.en, one sentence a line       (Moses format from OPUS, fairseq, Joey NMT)
  tab-separated     train.tsv: source<TAB>target a line            (Tatoeba exports)
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import torch

from . import datafiles
from .batching import bucketed_batches, sorted_batches, source_tensor, target_tensors
from .config import DataConfig
from .tokenizer import PAD_ID, Tokenizer

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset, split or column that cannot be used; the message names it."""


def _local_split_files(folder: Path) -> tuple[str, dict[str, str]]:
    """A folder of `train.jsonl`, `validation.jsonl`, ... (one format) -> (builder, {split: file})."""
    files = {}
    for file in sorted(folder.iterdir()):
        if file.suffix in LOCAL_FORMATS and file.is_file():
            files.setdefault(LOCAL_FORMATS[file.suffix], {})[file.stem] = str(file)
    if len(files) != 1:
        found = ", ".join(f.name for f in folder.iterdir()) or "nothing"
        raise DataError(f"data.path {folder}: expected split files of one format ({', '.join(LOCAL_FORMATS)}), found {found}")
    ((builder, split_files),) = files.items()
    return builder, split_files


def _first_invalid_utf8_line(file: str) -> str | None:
    """None if the whole file is UTF-8, else where it is not (file, line, bytes)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(file, "rb") as f:
        try:
            while block := f.read(1 << 24):  # fast path: whole blocks
                decoder.decode(block)
            decoder.decode(b"", final=True)
            return None
        except UnicodeDecodeError:
            pass
    with open(file, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{file}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start}: {line[max(0, e.start - 10):e.start + 10]!r})"
    return None


def _load_local(builder: str, file: str, streaming: bool, languages: tuple[str, str]) -> datasets.Dataset | datasets.IterableDataset:
    # pyarrow's JSON reader accepts invalid UTF-8 and fails later, far from the cause: check first.
    if builder in ("json", "csv") and (problem := _first_invalid_utf8_line(file)):
        raise DataError(problem)
    if problem := datafiles.nothing_to_read(file, builder):
        raise DataError(problem)
    options = datafiles.csv_as_text(file) if builder == "csv" else {}
    try:
        # Loaded as "train": datasets' split names must be identifiers, file names need not be (test-2016.jsonl).
        with _datasets_errors_unlogged():
            return datasets.load_dataset(builder, data_files=file, split="train", streaming=streaming, **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # e.g. a number among strings, or a broken line
        problem = datafiles.first_unreadable_json_line(file, languages) if file.endswith(".jsonl") else None
        raise DataError(problem or f"{file}: cannot be read as {builder} ({_one_line(e.__cause__ or e)})") from None


@contextmanager
def _datasets_errors_unlogged():
    """datasets logs a failed read and then raises it: the DataError says it once, on one line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def split_source(cfg: DataConfig, split: str) -> str:
    """Where a split's pairs come from, for messages: its file, or the hub dataset and split."""
    folder = Path(cfg.path).expanduser()
    if folder.is_dir() and (text_splits := plain_text_splits(folder, cfg.src_lang, cfg.tgt_lang)):
        if split in text_splits:
            return " + ".join(map(str, text_splits[split]))
    elif folder.is_dir():
        _, split_files = _local_split_files(folder)
        if split in split_files:
            return split_files[split]
    return f"dataset {cfg.path!r}{f' ({cfg.name})' if cfg.name else ''} split {split!r}"


def _load_hub(cfg: DataConfig, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(cfg.path, cfg.name, split=split, streaming=streaming)
    except ValueError as e:  # a missing or unknown configuration, or split: datasets says which only in words
        raise DataError(_hub_usage_problem(cfg, split) or f"dataset {cfg.path!r}: {_one_line(e)}") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(
            f"could not load dataset {cfg.path!r} ({type(e).__name__}: {_one_line(e)}). Without internet access, "
            "point data.path at a local folder of split files, e.g. --set data.path=../shared/data/multi30k"
        ) from None


def _hub_usage_problem(cfg: DataConfig, split: str) -> str | None:
    """What is wrong with data.name or the split for this hub dataset, asked of datasets itself."""
    try:
        splits = datasets.get_dataset_split_names(cfg.path, cfg.name)
    except ValueError:  # the configuration: missing (several exist, none is the default) or unknown
        configs = ", ".join(datasets.get_dataset_config_names(cfg.path))
        if cfg.name is None:
            return f"dataset {cfg.path!r} needs a configuration name: set data.name to one of {configs}"
        return f"data.name: dataset {cfg.path!r} has no configuration {cfg.name!r}; configurations: {configs}"
    if split not in splits:
        return f"split {split!r} not in dataset {cfg.path!r}; splits there: {', '.join(splits)}"
    return None


def plain_text_splits(folder: Path, src_lang: str, tgt_lang: str) -> dict[str, tuple[Path, ...]]:
    """{split: (source file, target file)} for `{split}.{src_lang}` + `{split}.{tgt_lang}`, or
    {split: (tsv file,)} for `{split}.tsv`; empty when the folder holds neither layout."""
    files = [f for f in sorted(folder.iterdir()) if f.is_file()]
    line_aligned = [f for f in files if f.suffix in (f".{src_lang}", f".{tgt_lang}")]
    tab_separated = [f for f in files if f.suffix == ".tsv"]
    others = [f.name for f in files if f.suffix in LOCAL_FORMATS]
    if not (line_aligned or tab_separated):
        return {}
    if (line_aligned and tab_separated) or others:
        found = ", ".join(f.name for f in line_aligned + tab_separated) + (", " if others else "") + ", ".join(others)
        raise DataError(f"data.path {folder}: expected split files of one layout, found {found}")
    if tab_separated:
        return {f.stem: (f,) for f in tab_separated}
    splits = {f.stem for f in line_aligned}
    return {split: (folder / f"{split}.{src_lang}", folder / f"{split}.{tgt_lang}") for split in sorted(splits)}


def _count_lines(file: Path) -> int:
    """Lines as Python iterates them: newline-terminated, and a last one without its newline."""
    count, last = 0, b"\n"
    with open(file, "rb") as f:
        while block := f.read(1 << 24):
            count, last = count + block.count(b"\n"), block[-1:]
    return count + (last != b"\n")


def _read_plain_text(files: tuple[str, ...], src_lang: str, tgt_lang: str, stats: tuple) -> Iterator[dict[str, str]]:
    """Rows {src_lang: ..., tgt_lang: ...} from line-aligned files or one TSV file. `stats` (size and
    modification time) is there for `datasets`' cache key: an edited file is read again."""
    streams = [open(file, encoding="utf-8", newline="\n") for file in files]
    try:
        for number, lines in enumerate(zip(*streams), start=1):
            cells = [line.rstrip("\r\n") for line in lines]
            if len(files) == 1:
                cells = cells[0].split("\t")
                if len(cells) != 2:
                    raise DataError(f"{files[0]}, line {number}: expected source<TAB>target, found {len(cells)} field(s)")
            yield {src_lang: cells[0], tgt_lang: cells[1]}
    finally:
        for stream in streams:
            stream.close()


def load_plain_text(text_splits: dict[str, tuple[Path, ...]], split: str, folder: Path, src_lang: str, tgt_lang: str,
                    streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """One split of line-aligned or TSV files as a dataset of columns src_lang and tgt_lang (the flat layout)."""
    if split not in text_splits:
        raise DataError(f"split {split!r} not found in {folder}; splits there: {', '.join(text_splits)}")
    files = text_splits[split]
    for file in files:
        if not file.is_file():
            raise DataError(f"split {split!r}: {file} is missing (line-aligned splits need {split}.{src_lang} and {split}.{tgt_lang})")
        if problem := _first_invalid_utf8_line(str(file)):
            raise DataError(problem)
    if len(files) == 2 and (counts := [_count_lines(f) for f in files])[0] != counts[1]:
        raise DataError(f"split {split!r}: {files[0]} has {counts[0]} lines but {files[1]} has {counts[1]}; line-aligned files must match")
    features = datasets.Features({src_lang: datasets.Value("string"), tgt_lang: datasets.Value("string")})
    # Tuples, not lists: `datasets` would shard a list of files between generator calls.
    stats = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    kwargs = {"files": tuple(str(f) for f in files), "src_lang": src_lang, "tgt_lang": tgt_lang, "stats": stats}
    if streaming:
        return datasets.IterableDataset.from_generator(_read_plain_text, features=features, gen_kwargs=kwargs)
    try:
        return datasets.Dataset.from_generator(_read_plain_text, features=features, gen_kwargs=kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):  # a line of a TSV file without its tab: the message names it
            raise e.__cause__ from None
        raise


def load_split(cfg: DataConfig, split: str, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """One split with string columns `src` and `tgt`: a `datasets.Dataset`, or with `streaming`
    an `IterableDataset` read as it is iterated (nothing downloaded or prepared up front).

    Under `data.streaming` a whole split (validation, test) is read through a stream too, so
    that loading it never downloads the rest of a dataset too large for the disk."""
    whole_through_stream = cfg.streaming and not streaming
    streaming = streaming or cfg.streaming
    folder = Path(cfg.path).expanduser()
    if folder.is_dir() and (text_splits := plain_text_splits(folder, cfg.src_lang, cfg.tgt_lang)):
        dataset = load_plain_text(text_splits, split, folder, cfg.src_lang, cfg.tgt_lang, streaming)
    elif folder.is_dir():
        builder, split_files = _local_split_files(folder)
        if split not in split_files:
            raise DataError(f"split {split!r} not found in {folder}; splits there: {', '.join(split_files)}")
        dataset = _load_local(builder, split_files[split], streaming, (cfg.src_lang, cfg.tgt_lang))
    elif cfg.path.startswith(("/", "./", "../", "~")) or folder.exists():
        raise DataError(f"data.path: {cfg.path} is not a folder of split files (no such directory)")
    else:
        dataset = _load_hub(cfg, split, streaming)
    source = split_source(cfg, split)
    try:
        pairs = to_pairs(dataset, cfg.src_lang, cfg.tgt_lang)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    if whole_through_stream:
        pairs = datasets.Dataset.from_list(list(pairs))
    if isinstance(pairs, datasets.Dataset):
        _check_text(pairs, source, (cfg.src_lang, cfg.tgt_lang))
    return pairs


def _check_text(pairs: datasets.Dataset, source: str, languages: tuple[str, str]) -> None:
    """Every cell is text or missing (an empty side, dropped by the filter): a number or a list is an error naming its line."""
    if not len(pairs):
        raise DataError(f"{source}: no pairs")
    for column, language in zip(("src", "tgt"), languages):
        feature = pairs.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null"):
            continue  # all text: nothing to read
        for row, value in enumerate(pairs[column]):
            if problem := datafiles.not_text(value, language):
                where = f"line {datafiles.line_of_row(source, row)}" if source.endswith(".jsonl") else f"row {row + 1}"
                raise DataError(f"{source}, {where}: {problem}")


def to_pairs(dataset: datasets.Dataset | datasets.IterableDataset, src_lang: str, tgt_lang: str):
    """Map either layout onto columns `src` and `tgt`."""
    columns = dataset.column_names or list(next(iter(dataset), {}))  # a stream may not know its columns before reading
    if src_lang in columns and tgt_lang in columns:
        dataset = dataset.select_columns([src_lang, tgt_lang])
        return dataset.rename_columns({src_lang: "src", tgt_lang: "tgt"})
    if "translation" in columns:
        # datasets.Translation (wmt14), a dict of Values, or in a stream of unknown features the first example's keys
        feature = dataset.features["translation"] if dataset.features else next(iter(dataset))["translation"]
        languages = set(getattr(feature, "languages", None) or feature.keys())
        for lang in (src_lang, tgt_lang):
            if lang not in languages:
                raise DataError(f"language {lang!r} not in the translation column; languages there: {', '.join(sorted(languages))}")
        return dataset.map(
            lambda batch: {
                "src": [pair[src_lang] for pair in batch["translation"]],
                "tgt": [pair[tgt_lang] for pair in batch["translation"]],
            },
            batched=True,
            remove_columns=columns,
        )
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in columns]
    raise DataError(
        f"language column(s) {', '.join(map(repr, missing))} not found; columns: {', '.join(columns)} "
        "(expected one column per language, or a 'translation' column of {language: text})"
    )


def tokenize(pairs: datasets.Dataset, tokenizer: Tokenizer, num_proc: int | None = None) -> datasets.Dataset:
    """Add `src_ids` and `tgt_ids` (no specials); cached on disk by `datasets` for file-backed data."""
    fingerprint = hashlib.sha256(tokenizer.model_proto + pairs._fingerprint.encode()).hexdigest()[:32]
    return pairs.map(
        # A missing cell (JSON null, empty CSV field) is an empty sentence, which filter_pairs then drops.
        lambda batch: {side + "_ids": tokenizer.encode([text or "" for text in batch[side]]) for side in ("src", "tgt")},
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

    @property
    def n_tgt_tokens(self) -> int:
        return int((self.tgt_out != 0).sum())

    @property
    def padding(self) -> tuple[int, int]:
        """Padding positions and all positions, source and target (by the outputs: real up to each eos) together."""
        pads = int((self.src == PAD_ID).sum()) + int((self.tgt_out == PAD_ID).sum())
        return pads, self.src.numel() + self.tgt_out.numel()

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device))


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
    (subword regularisation, Kudo 2018; BPE-dropout for bpe models): the same pairs, other pieces,
    seeded by (seed, epoch) so a resumed run sees the very same ones. A sampled side longer than
    `max_len` keeps its best segmentation. Batches are collated from the epoch asked for last."""

    def __init__(self, tokenized: datasets.Dataset, max_tokens: int, seed: int, tokenizer: Tokenizer, sampling: float, max_len: int):
        super().__init__(tokenized, max_tokens, seed)
        self.texts = tokenized.select_columns(["src", "tgt"])
        self.tokenizer, self.sampling, self.max_len = tokenizer, sampling, max_len
        self.best = {side: list(self.dataset[side + "_ids"]) for side in ("src", "tgt")}  # the fallback for a long draw, read once
        self.segmented: tuple[int, dict[str, list[list[int]]], np.ndarray] | None = None

    def _segment(self, epoch: int) -> tuple[dict[str, list[list[int]]], np.ndarray]:
        if self.segmented is None or self.segmented[0] != epoch:
            ids = {}
            for i, side in enumerate(("src", "tgt")):
                seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
                drawn = self.tokenizer.encode([text or "" for text in self.texts[side]], self.sampling, seed)
                ids[side] = [d if len(d) <= self.max_len else b for d, b in zip(drawn, self.best[side])]
            sizes = np.maximum([len(x) for x in ids["src"]], [len(x) for x in ids["tgt"]]) + 1
            self.segmented = (epoch, ids, sizes)
        return self.segmented[1], self.segmented[2]

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
                 max_ratio: float, pool_size: int = 100_000, shuffle_buffer: int = 10_000):
        self.pairs, self.tokenizer, self.max_tokens, self.seed = pairs, tokenizer, max_tokens, seed
        self.max_len, self.max_ratio, self.pool_size, self.shuffle_buffer = max_len, max_ratio, pool_size, shuffle_buffer

    def _pool_batches(self, pool: list[dict], epoch: int, read_before: int) -> tuple[list[list[int]], list[list[int]], list[np.ndarray]]:
        """The pool's token ids (source, target) and its batches as index arrays into them, in the order to take them."""
        src_ids = self.tokenizer.encode([pair["src"] or "" for pair in pool])
        tgt_ids = self.tokenizer.encode([pair["tgt"] or "" for pair in pool])
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
            pairs, any_batch = iter(stream.skip(read)), read > 0
            while pool := list(islice(pairs, self.pool_size)):
                src_ids, tgt_ids, batches = self._pool_batches(pool, epoch, read)
                for index in range(start, len(batches)):  # collated as taken: a resume builds none it skips
                    last = index + 1 == len(batches)
                    after = {"epoch": epoch, "pairs_read": read + len(pool) * last, "batch_in_pool": 0 if last else index + 1}
                    yield after, Batch.of([src_ids[i] for i in batches[index]], [tgt_ids[i] for i in batches[index]])
                read, start, any_batch = read + len(pool), 0, any_batch or bool(batches)
            if not any_batch:
                raise DataError("the training stream holds no pair that passes the filters (data.max_len, data.max_ratio)")
            epoch, read = epoch + 1, 0
