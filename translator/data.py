"""Parallel data from Hugging Face `datasets`: load a split and find its language columns
(trainset.py tokenizes, filters and batches the training split).

Two layouts are understood, both common on the hub:
  flat columns      {"de": "...", "en": "..."}                     (bentrevett/multi30k)
  translation dict  {"translation": {"de": "...", "en": "..."}}    (wmt14, iwslt2017, opus_books)
and two of plain text in a local folder, read into the first:
  line-aligned      train.de + train.en, one sentence a line       (Moses format from OPUS, fairseq, Joey NMT)
  tab-separated     train.tsv: source<TAB>target a line            (two-column exports)
"""

from __future__ import annotations

import codecs
import functools
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import datasets

from . import datafiles
from .config import DataConfig

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset, split or column that cannot be used; the message names it."""


def texts(cells: Iterable[str | None]) -> list[str]:
    """A column's cells as sentences: a missing cell (JSON null, empty CSV field) is an empty one,
    which training's filter drops and which translates to ""."""
    return [cell or "" for cell in cells]


def dataset_repository(folder: Path) -> bool:
    """A hub dataset downloaded whole (`huggingface-cli download NAME --repo-type dataset --local-dir DIR`): its files under
    data/ (data/train-00000-of-00001.parquet) or configurations in its card, and no split files at the top. datasets
    reads it as it reads the hub."""
    card = folder / "README.md"
    configured = card.is_file() and "\nconfigs:" in card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    top = [f for f in folder.iterdir() if f.is_file()]
    return ((folder / "data").is_dir() or configured) and not any(f.suffix in LOCAL_FORMATS for f in top)


def _local_split_files(folder: Path, languages: tuple[str, str]) -> tuple[str, dict[str, str]]:
    """A folder of `train.jsonl`, `validation.jsonl`, ... (one format) -> (builder, {split: file})."""
    files = {}
    for file in sorted(folder.iterdir()):
        if file.suffix in LOCAL_FORMATS and file.is_file():
            files.setdefault(LOCAL_FORMATS[file.suffix], {})[file.stem] = str(file)
    if len(files) != 1:
        found = ", ".join(sorted(f.name for f in folder.iterdir())) or "nothing"
        src, tgt = languages
        raise DataError(f"data.path {folder}: expected split files of one format ({', '.join(LOCAL_FORMATS)}) or of plain text "
                        f"({{split}}.{src} + {{split}}.{tgt}, or {{split}}.tsv), found {found}")
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
    if problem := datafiles.nothing_to_read(file) or (builder == "csv" and datafiles.csv_rows_problem(file, languages)):
        raise DataError(problem)
    try:
        options = datafiles.csv_as_text(file) if builder == "csv" else {}  # pandas reads the header: a broken quote fails here
        # Loaded as "train": datasets' split names must be identifiers, file names need not be (test-2016.jsonl).
        with _datasets_errors_unlogged():
            return datasets.load_dataset(builder, data_files=file, split="train", streaming=streaming, **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:  # e.g. a number among strings, or a broken line
        problem = _json_lines_problem(file, e.__cause__ or e, languages)
        raise DataError(problem or f"{file}: cannot be read as {builder} ({_one_line(e.__cause__ or e)})") from None


def _json_lines_problem(file: str, error: BaseException, languages: tuple[str, ...]) -> str | None:
    """The line of a JSON Lines file behind a reader's error, which names a row of its block but not the line:
    one that is not JSON (or not text), or whose keys differ from the first line's. None for other files."""
    if not file.endswith(".jsonl"):
        return None
    problem = datafiles.first_unreadable_json_line(file, languages)
    if not problem and "column names don't match" in str(error):
        problem = datafiles.first_line_of_other_keys(file)
    return problem


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
    elif folder.is_dir() and not dataset_repository(folder):
        _, split_files = _local_split_files(folder, (cfg.src_lang, cfg.tgt_lang))
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
    streams = [open(file, encoding="utf-8-sig", newline="\n") for file in files]  # -sig: a byte-order mark is not text
    try:
        for number, lines in enumerate(zip(*streams), start=1):
            cells = [line.rstrip("\r\n") for line in lines]
            if len(files) == 1:  # a blank line is an empty pair, as in line-aligned files (the filter drops it)
                cells = cells[0].split("\t") if cells[0].strip() else ["", ""]
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
        if problem := _first_invalid_utf8_line(str(file)) or datafiles.nothing_to_read(str(file)):
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
    elif folder.is_dir() and not dataset_repository(folder):
        builder, split_files = _local_split_files(folder, (cfg.src_lang, cfg.tgt_lang))
        if split not in split_files:
            raise DataError(f"split {split!r} not found in {folder}; splits there: {', '.join(split_files)}")
        dataset = _load_local(builder, split_files[split], streaming, (cfg.src_lang, cfg.tgt_lang))
    elif folder.is_dir():  # a dataset repository downloaded whole: read as the hub's
        dataset = _load_hub(replace(cfg, path=str(folder)), split, streaming)
    elif cfg.path.startswith(("/", "./", "../", "~")) or folder.exists():
        why = "a file: point data.path at the folder that holds it" if folder.exists() else "no such directory"
        raise DataError(f"data.path: {cfg.path} is not a folder of split files ({why})")
    else:
        dataset = _load_hub(cfg, split, streaming)
    source = split_source(cfg, split)
    try:
        with _datasets_errors_unlogged():
            pairs = to_pairs(dataset, cfg.src_lang, cfg.tgt_lang)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    except ValueError as e:  # a stream reads its first row to learn its columns: a broken line there
        raise DataError(_json_lines_problem(source, e, ()) or f"{source}: cannot be read ({_one_line(e)})") from e
    if isinstance(pairs, datasets.IterableDataset):  # a stream cannot be checked up front: each row as it is read
        pairs = pairs.map(functools.partial(_check_row, source=source, languages=(cfg.src_lang, cfg.tgt_lang)), with_indices=True)
    if whole_through_stream:
        pairs = datasets.Dataset.from_list(list(read_named(pairs, source)))
    if isinstance(pairs, datasets.Dataset):
        _check_text(pairs, source, (cfg.src_lang, cfg.tgt_lang))
    return pairs


def _check_text(pairs: datasets.Dataset, source: str, languages: tuple[str, str]) -> None:
    """Every cell is text or missing (an empty side, dropped by the filter): a number or a list is an error naming its line."""
    if not len(pairs):
        raise DataError(f"{source}: no pairs")
    for column, language in zip(("src", "tgt"), languages):
        feature = pairs.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype == "null":
            raise DataError(f"{source}: no {language!r} text in any pair")
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            continue  # all text: nothing to read
        for row, value in enumerate(pairs[column]):
            if problem := datafiles.not_text(value, language):
                raise DataError(f"{source}, {_where(source, row)}: {problem}")


def _check_row(pair: dict, row: int, source: str, languages: tuple[str, str]) -> dict:
    for column, language in zip(("src", "tgt"), languages):
        if problem := datafiles.not_text(pair[column], language):
            raise DataError(f"{source}, {_where(source, row)}: {problem}")
    return pair


def read_named(rows: Iterable[dict], source: str) -> Iterator[dict]:
    """The rows of a stream, a failed read named: a broken line far into a large file is met only as it is read,
    and the reader's own error ("Expected object or value at position 17") names neither the file nor the line."""
    try:
        yield from rows
    except DataError:
        raise
    except ValueError as e:  # pyarrow's ArrowInvalid is one
        problem = _json_lines_problem(source, e, languages=())
        raise DataError(problem or f"{source}: cannot be read further ({_one_line(e)})") from e  # --debug shows the reader's own


def _where(source: str, row: int) -> str:
    """Row `row` (0-based) of a split, as its user would find it: a JSON Lines file's line, else its row from 1."""
    return f"line {datafiles.line_of_row(source, row)}" if source.endswith(".jsonl") else f"row {row + 1}"


def to_pairs(dataset: datasets.Dataset | datasets.IterableDataset, src_lang: str, tgt_lang: str):
    """Map either layout onto columns `src` and `tgt`."""
    columns = dataset.column_names or list(next(iter(dataset), {}))  # a stream may not know its columns before reading
    if src_lang in columns and tgt_lang in columns:
        dataset = dataset.select_columns([src_lang, tgt_lang])
        if isinstance(dataset, datasets.IterableDataset):  # a stream refuses to rename onto a name it holds (languages "src", "tgt")
            return dataset.map(lambda row: {"src": row[src_lang], "tgt": row[tgt_lang]}, remove_columns=[src_lang, tgt_lang])
        return dataset.rename_columns({src_lang: "src", tgt_lang: "tgt"})
    if "translation" in columns:
        # datasets.Translation (wmt14), a dict of Values, or in a stream of unknown features the first example's keys.
        # Rows of other languages (a JSON Lines file) give a Json feature that names none: the rows themselves decide.
        feature = dataset.features["translation"] if dataset.features else next(iter(dataset))["translation"]
        languages = getattr(feature, "languages", None) or (feature.keys() if isinstance(feature, (dict, datasets.Features)) else ())
        for lang in (src_lang, tgt_lang) if languages else ():
            if lang not in languages:
                raise DataError(f"language {lang!r} not in the translation column; languages there: {', '.join(sorted(languages))}")
        return dataset.map(
            lambda batch: {  # a row without the language, or without a translation (null), is an empty side
                "src": [(pair or {}).get(src_lang) for pair in batch["translation"]],
                "tgt": [(pair or {}).get(tgt_lang) for pair in batch["translation"]],
            },
            batched=True,
            remove_columns=columns,
        )
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in columns]
    raise DataError(
        f"language column(s) {', '.join(map(repr, missing))} not found; columns: {', '.join(columns)} "
        "(expected one column per language, or a 'translation' column of {language: text})"
    )
