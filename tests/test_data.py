"""Data: both dataset layouts, local split files, errors that name what exists, filtering, and batches."""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MULTI30K, toy_pair
from translator.batching import bucketed_batches, chunk_by_budget, pad, source_tensor, target_tensors
from translator.config import DataConfig
from translator.data import DataError, load_split, to_pairs
from translator.trainset import Batch, FilterReport, StreamBatches, TrainBatches, filter_pairs, lengths, tokenize, training_pairs
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from translator.train import sentences

DE = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen, \"draußen\" im Schnee.", "Die Straße ist nass."]
EN = ["A man rides a bicycle.", "Two dogs play, \"outside\" in the snow.", "The street is wet."]
FR = ["Un homme fait du vélo.", "Deux chiens jouent dehors dans la neige.", "La rue est mouillée."]


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [toy_pair(rng) for _ in range(n)]


# --- layouts -----------------------------------------------------------------------------------


def test_to_pairs_flat_columns():
    ds = datasets.Dataset.from_dict({"en": EN, "de": DE, "fr": FR})
    pairs = to_pairs(ds, "de", "en")
    assert pairs.column_names == ["src", "tgt"]
    assert pairs["src"] == DE and pairs["tgt"] == EN
    reverse = to_pairs(ds, "fr", "de")
    assert reverse["src"] == FR and reverse["tgt"] == DE


def test_to_pairs_translation_column_of_dicts():
    ds = datasets.Dataset.from_dict({"id": ["0", "1", "2"], "translation": [{"de": d, "en": e, "fr": f} for d, e, f in zip(DE, EN, FR)]})
    pairs = to_pairs(ds, "de", "en")
    assert sorted(pairs.column_names) == ["src", "tgt"]
    assert pairs["src"] == DE and pairs["tgt"] == EN
    assert to_pairs(ds, "en", "fr")["tgt"] == FR


def test_to_pairs_translation_feature():
    # The hub's datasets.Translation feature (wmt14, iwslt2017) exposes `languages` rather than keys.
    features = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
    ds = datasets.Dataset.from_dict({"translation": [{"de": d, "en": e} for d, e in zip(DE, EN)]}, features=features)
    pairs = to_pairs(ds, "en", "de")
    assert pairs["src"] == EN and pairs["tgt"] == DE
    with pytest.raises(DataError, match=r"'fr'.*languages there: de, en"):
        to_pairs(ds, "de", "fr")


def test_to_pairs_missing_language_column_names_columns_found():
    ds = datasets.Dataset.from_dict({"de": DE, "en": EN, "fr": FR})
    with pytest.raises(DataError, match=r"'cs' not found; columns: de, en, fr"):
        to_pairs(ds, "de", "cs")
    with pytest.raises(DataError) as info:
        to_pairs(ds, "it", "cs")
    assert "'it'" in str(info.value) and "'cs'" in str(info.value)


def test_to_pairs_missing_language_in_translation_column_names_languages():
    ds = datasets.Dataset.from_dict({"translation": [{"de": d, "en": e} for d, e in zip(DE, EN)]})
    with pytest.raises(DataError, match=r"language 'fr' not in the translation column; languages there: de, en"):
        to_pairs(ds, "fr", "en")
    with pytest.raises(DataError, match=r"language 'cs'.*languages there: de, en"):
        to_pairs(ds, "de", "cs")


# --- local folders -----------------------------------------------------------------------------


def write_split(folder: Path, split: str, fmt: str, data: list[dict[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    elif fmt == "parquet":
        datasets.Dataset.from_list(data).to_parquet(str(path))
    else:
        raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_load_split_local_folder(tmp_path, fmt):
    train = [{"de": d, "en": e, "fr": f} for d, e, f in zip(DE, EN, FR)] + [{**r, "fr": f"fr {i}"} for i, r in enumerate(rows(20))]
    valid = [{"de": r["de"], "en": r["en"], "fr": "x"} for r in rows(5, seed=1)]
    write_split(tmp_path, "train", fmt, train)
    write_split(tmp_path, "validation", fmt, valid)
    cfg = DataConfig(path=str(tmp_path), src_lang="de", tgt_lang="en")

    pairs = load_split(cfg, "train")
    assert sorted(pairs.column_names) == ["src", "tgt"]
    assert pairs["src"] == [r["de"] for r in train]
    assert pairs["tgt"] == [r["en"] for r in train]
    assert load_split(cfg, "validation")["tgt"] == [r["en"] for r in valid]
    reverse = load_split(DataConfig(path=str(tmp_path), src_lang="en", tgt_lang="fr"), "train")
    assert reverse["src"] == [r["en"] for r in train] and reverse["tgt"] == [r["fr"] for r in train]


def test_load_split_toy_corpus(toy_corpus):
    cfg = DataConfig(path=str(toy_corpus), src_lang="de", tgt_lang="en")
    expected = [json.loads(line) for line in (toy_corpus / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = load_split(cfg, "test")
    assert len(pairs) == 60
    assert pairs["src"] == [r["de"] for r in expected]
    assert pairs["tgt"] == [r["en"] for r in expected]


def test_missing_split_names_the_splits_that_exist(tmp_path):
    write_split(tmp_path, "train", "jsonl", rows(3))
    write_split(tmp_path, "validation", "jsonl", rows(3))
    cfg = DataConfig(path=str(tmp_path))
    with pytest.raises(DataError, match=r"split 'test' not found.*splits there: train, validation"):
        load_split(cfg, "test")


def test_missing_language_column_in_local_file(tmp_path):
    write_split(tmp_path, "train", "jsonl", rows(3))
    with pytest.raises(DataError, match=r"'fr' not found; columns: de, en"):
        load_split(DataConfig(path=str(tmp_path), src_lang="de", tgt_lang="fr"), "train")


def test_local_translation_column(tmp_path):
    data = [{"translation": {"de": d, "en": e}} for d, e in zip(DE, EN)]
    write_split(tmp_path, "train", "jsonl", data)
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert pairs["src"] == DE and pairs["tgt"] == EN
    with pytest.raises(DataError, match=r"languages there: de, en"):
        load_split(DataConfig(path=str(tmp_path), src_lang="fr"), "train")


def test_mixed_formats_are_an_error(tmp_path):
    write_split(tmp_path, "train", "jsonl", rows(3))
    write_split(tmp_path, "test", "csv", rows(3))
    with pytest.raises(DataError, match=r"one format.*found"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_folder_without_split_files_is_an_error_naming_the_layouts_it_reads(tmp_path):
    (tmp_path / "README.md").write_text("nothing here\n")
    write_line_aligned(tmp_path, "train", [{"src": "a", "tgt": "b"}])  # named for no language
    with pytest.raises(DataError, match=r"\{split\}\.de \+ \{split\}\.en, or \{split\}\.tsv\), found README\.md, train\.src, train\.tgt$"):
        load_split(DataConfig(path=str(tmp_path)), "train")
    with pytest.raises(DataError, match=r"is not a folder of split files \(a file: point data\.path at the folder that holds it\)"):
        load_split(DataConfig(path=str(tmp_path / "train.src")), "train")


def test_split_file_name_with_a_hyphen(tmp_path):
    write_split(tmp_path, "test-2016", "jsonl", rows(4))
    pairs = load_split(DataConfig(path=str(tmp_path)), "test-2016")
    assert len(pairs) == 4


def test_empty_csv_cell_is_dropped_as_an_empty_side(tmp_path):
    write_split(tmp_path, "train", "csv", [{"de": "Ein Hund.", "en": "A dog."}, {"de": "Eine Katze.", "en": ""}])
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    tokenizer = Tokenizer.train(["Ein Hund.", "A dog.", "Eine Katze."] * 10, vocab_size=40)
    kept, report = filter_pairs(tokenize(pairs, tokenizer), max_len=10, max_ratio=0)
    assert (report.kept, report.empty) == (1, 1)


# --- plain text: {split}.{lang} line-aligned files and {split}.tsv -------------------------------


def write_line_aligned(folder: Path, split: str, data: list[dict[str, str]], newline: str = "\n") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for lang in data[0]:
        (folder / f"{split}.{lang}").write_bytes("".join(r[lang] + newline for r in data).encode())


def write_tsv(folder: Path, split: str, data: list[dict[str, str]], src: str = "de", tgt: str = "en") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.tsv").write_text("".join(f"{r[src]}\t{r[tgt]}\n" for r in data), encoding="utf-8")


# Lines a careless reader would split or change: a carriage return, Unicode line separators, a form feed.
AWKWARD = [{"de": "Ein\rHund.", "en": "A\u2028dog."}, {"de": "Zwei\x0cKatzen.", "en": "Two\u0085cats."}, {"de": "", "en": "Nothing."}]


@pytest.mark.parametrize("layout", ["line-aligned", "tsv"])
def test_plain_text_loads_like_the_jsonl_layout(tmp_path, layout):
    train, valid = [{"de": d, "en": e} for d, e in zip(DE, EN)] + AWKWARD + rows(20), rows(5, seed=1)
    for split, data in (("train", train), ("validation", valid)):
        write_split(tmp_path / "jsonl", split, "jsonl", data)
        (write_line_aligned if layout == "line-aligned" else write_tsv)(tmp_path / "text", split, data)
    for split in ("train", "validation"):
        expected = load_split(DataConfig(path=str(tmp_path / "jsonl")), split)
        pairs = load_split(DataConfig(path=str(tmp_path / "text")), split)
        assert (pairs["src"][:], pairs["tgt"][:]) == (expected["src"][:], expected["tgt"][:])
        streamed = list(load_split(DataConfig(path=str(tmp_path / "text")), split, streaming=True))
        assert streamed == [{"src": s, "tgt": t} for s, t in zip(expected["src"], expected["tgt"])]
    assert load_split(DataConfig(path=str(tmp_path / "text")), "train")["src"][:len(AWKWARD) + 3][3:] == [r["de"] for r in AWKWARD]


@pytest.mark.parametrize("layout", ["csv", "jsonl", "line-aligned", "tsv"])
def test_a_byte_order_mark_is_not_text(tmp_path, layout):
    """Excel's "CSV UTF-8" and Windows editors start a file with U+FEFF: it is neither a column's name nor the first sentence's."""
    data = rows(3)
    writers = {"csv": lambda d: write_split(d, "train", "csv", data), "jsonl": lambda d: write_split(d, "train", "jsonl", data),
               "line-aligned": lambda d: write_line_aligned(d, "train", data), "tsv": lambda d: write_tsv(d, "train", data)}
    writers[layout](tmp_path)
    for file in tmp_path.iterdir():
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert (pairs["src"], pairs["tgt"]) == ([r["de"] for r in data], [r["en"] for r in data])


@pytest.mark.parametrize("layout", ["line-aligned", "tsv"])
@pytest.mark.parametrize("content", [b"\n", b"\xef\xbb\xbf"], ids=["blank", "byte-order-mark-alone"])  # Notepad's empty UTF-8 file
def test_an_empty_plain_text_split_names_its_file(tmp_path, layout, content):
    write_line_aligned(tmp_path, "validation", rows(3)) if layout == "line-aligned" else write_tsv(tmp_path, "validation", rows(3))
    empty = tmp_path / ("train.de" if layout == "line-aligned" else "train.tsv")
    for file in [empty, tmp_path / "train.en"] if layout == "line-aligned" else [empty]:
        file.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: the file is empty \(no pairs\)$"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_line_aligned_files_read_in_either_direction_and_windows_line_ends(tmp_path):
    data = [{"de": d, "en": e, "fr": f} for d, e, f in zip(DE, EN, FR)]
    write_line_aligned(tmp_path, "train", data, newline="\r\n")
    pairs = load_split(DataConfig(path=str(tmp_path), src_lang="fr", tgt_lang="de"), "train")
    assert (pairs["src"][:], pairs["tgt"][:]) == (FR, DE)


@pytest.mark.parametrize("streaming", [False, True])
def test_languages_named_src_and_tgt_load_either_way_round(tmp_path, streaming):
    """fairseq's train.src + train.tgt: the languages' names are the names of the pair's own columns."""
    write_line_aligned(tmp_path, "train", [{"src": d, "tgt": e} for d, e in zip(DE, EN)])
    for (src_lang, tgt_lang), expected in ((("src", "tgt"), (DE, EN)), (("tgt", "src"), (EN, DE))):
        pairs = load_split(DataConfig(path=str(tmp_path), src_lang=src_lang, tgt_lang=tgt_lang), "train", streaming=streaming)
        assert [(pair["src"], pair["tgt"]) for pair in pairs] == list(zip(*expected))


def test_plain_text_filters_like_every_layout(tmp_path):
    data = [{"de": "Ein Hund.", "en": "A dog."}, {"de": "Eine Katze.", "en": "   "}, {"de": "Hund " * 30, "en": "Dog."}]
    write_line_aligned(tmp_path, "train", data)
    tokenizer = Tokenizer.train(["Ein Hund.", "A dog.", "Eine Katze.", "Dog."] * 10, vocab_size=40)
    _, report = filter_pairs(tokenize(load_split(DataConfig(path=str(tmp_path)), "train"), tokenizer), max_len=20, max_ratio=0)
    assert (report.kept, report.empty, report.too_long) == (1, 1, 1)


def test_edited_plain_text_file_is_read_again(tmp_path):
    write_line_aligned(tmp_path, "train", [{"de": d, "en": e} for d, e in zip(DE, EN)])
    assert load_split(DataConfig(path=str(tmp_path)), "train")["tgt"][:] == EN
    write_line_aligned(tmp_path, "train", [{"de": d, "en": e.upper()} for d, e in zip(DE, EN)])
    assert load_split(DataConfig(path=str(tmp_path)), "train")["tgt"][:] == [e.upper() for e in EN]


def test_unequal_line_counts_name_both_files_and_counts(tmp_path):
    write_line_aligned(tmp_path, "train", rows(5))
    with open(tmp_path / "train.en", "a", encoding="utf-8") as f:
        f.write("One line too many")  # no final newline: still a line
    with pytest.raises(DataError, match=rf"{tmp_path}/train.de has 5 lines but {tmp_path}/train.en has 6"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_line_aligned_split_without_its_target_file_names_it(tmp_path):
    write_line_aligned(tmp_path, "train", rows(3))
    (tmp_path / "test.de").write_text("Ein Hund.\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"split 'test': {tmp_path}/test.en is missing"):
        load_split(DataConfig(path=str(tmp_path)), "test")
    with pytest.raises(DataError, match=r"split 'dev' not found.*splits there: test, train"):
        load_split(DataConfig(path=str(tmp_path)), "dev")


@pytest.mark.parametrize("name", ["train.en", "train.tsv"])
def test_plain_text_invalid_utf8_names_the_file_and_line(tmp_path, name):
    lines = [b"Ein Hund.\tA dog.", b"Eine Katze.\tA cat.", b"Ein Hut.\tA \xff hat."]
    if name == "train.en":
        lines = [line.split(b"\t")[1] for line in lines]
        (tmp_path / "train.de").write_bytes(b"a\nb\nc\n")
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{tmp_path}/{name}, line 3: not valid UTF-8"):
        load_split(DataConfig(path=str(tmp_path)), "train")


@pytest.mark.parametrize("line, fields", [("Eine Katze. A cat.", 1), ("17\tEine Katze.\t18\tA cat.", 4)])  # 4: Tatoeba's pairs
def test_tsv_line_without_exactly_one_tab_names_the_file_and_line(tmp_path, line, fields):
    (tmp_path / "train.tsv").write_text(f"Ein Hund.\tA dog.\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{tmp_path}/train.tsv, line 2: expected source<TAB>target, found {fields} field"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_a_blank_tsv_line_is_an_empty_pair_as_a_blank_line_of_line_aligned_files(tmp_path):
    data = rows(3)
    lines = [f"{r['de']}\t{r['en']}" for r in data[:1]] + ["", f"{data[1]['de']}\t{data[1]['en']}", "  ", f"{data[2]['de']}\t{data[2]['en']}", ""]
    (tmp_path / "train.tsv").write_bytes("".join(line + "\r\n" for line in lines).encode())  # ends in a blank line
    expected = [(data[0]["de"], data[0]["en"]), ("", ""), (data[1]["de"], data[1]["en"]), ("", ""), (data[2]["de"], data[2]["en"]), ("", "")]
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert list(zip(pairs["src"], pairs["tgt"])) == expected
    assert [(p["src"], p["tgt"]) for p in load_split(DataConfig(path=str(tmp_path)), "train", streaming=True)] == expected


def test_plain_text_next_to_another_layout_is_an_error(tmp_path):
    write_line_aligned(tmp_path, "train", rows(3))
    write_split(tmp_path, "test", "jsonl", rows(3))
    with pytest.raises(DataError, match=r"one layout, found train.de, train.en, test.jsonl"):
        load_split(DataConfig(path=str(tmp_path)), "train")


@pytest.mark.parametrize("cell", ["NA", "N/A", "n/a", "null", "NULL", "None", "nan", "NaN", "-nan", "#N/A", "<NA>", "007", "1e3", "TRUE"])
def test_csv_cells_that_pandas_reads_as_missing_or_numbers_stay_text(tmp_path, cell):
    # Today's pandas defaults turn these into missing values (the pair is dropped) or numbers (007 -> 7).
    data = [{"de": cell, "en": "A dog."}, {"de": "Ein Hund.", "en": cell}, {"de": "Eine Katze.", "en": "A cat."}]
    write_split(tmp_path, "train", "csv", data)
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert pairs["src"] == [r["de"] for r in data] and pairs["tgt"] == [r["en"] for r in data]


def test_a_csv_with_unnamed_columns_loads(tmp_path):
    # pandas' df.to_csv() writes its index as a first column with an empty name; a trailing comma adds another.
    (tmp_path / "train.csv").write_text(',de,en,\n0,Ein Hund.,A dog.,\n1,NA,007,\n', encoding="utf-8")
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert pairs["src"] == ["Ein Hund.", "NA"] and pairs["tgt"] == ["A dog.", "007"]


def test_a_csv_with_an_unclosed_quote_names_the_file(tmp_path):
    (tmp_path / "train.csv").write_text('de,en\nEin Mann.,A man.\n"Ein Hund.,A dog.\nEine Katze.,A cat.\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}/train\.csv, line 3: no 'en' cell .*a quote never closed\?"):
        load_split(DataConfig(path=str(tmp_path)), "train")


@pytest.mark.parametrize("content, message", [
    (b"", r"train\.jsonl: the file is empty"),
    (b"\n \n", r"train\.jsonl: the file is empty"),
    (b"\xef\xbb\xbf", r"train\.jsonl: the file is empty"),
    (b'{"de": "a", "en": "b"}\n{"de": "kaputt \\ud83d", "en": "d"}\n', r"train\.jsonl, line 2: '\\ud83d' is half of a surrogate pair"),
    (b'{"de": "a", "en": "b"}\n{"de": "c", "en": \n', r"train\.jsonl, line 2: not valid JSON \(Expecting value at column 19\)"),
    (b'{"de": "a", "en": "b"}\n\n\n{"de": 5, "en": "b"}\n', r"train\.jsonl, line 4: 'de' is int 5, expected text"),
    (b'{"de": 1, "en": "b"}\n{"de": 3, "en": "d"}\n', r"train\.jsonl, line 1: 'de' is int 1"),
    (b'{"de": "a", "en": 1.5}\n', r"train\.jsonl, line 1: 'en' is float 1\.5"),
    (b'{"de": "a", "en": "b"}\n{"de": {"x": 1}, "en": "b"}\n', r"train\.jsonl, line 2: 'de' is dict"),
    (b'{"translation": {"de": "a", "en": "b"}}\n{"translation": {"de": true, "en": "b"}}\n', r"train\.jsonl, line 2: 'de' is bool"),
    (b'{"de": "a", "en": "b"}\n"just text"\n', r"train\.jsonl, line 2: expected a JSON object of \{language: text\}, got str"),
], ids=["empty", "blank", "byte-order-mark-alone", "lone-surrogate", "malformed", "number-after-blank-lines", "all-numbers", "float", "dict",
        "translation-bool", "not-an-object"])
def test_a_json_lines_file_that_cannot_give_pairs_names_its_line(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}/{message}"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_translation_dicts_of_other_languages_a_row_are_read_by_each_rows_keys(tmp_path):
    # datasets reads dicts whose keys differ between rows as a Json feature, which names no languages
    rows = [{"translation": {"de": "a", "en": "b"}}, {"translation": {"de": "c"}}, {"translation": None},
            {"translation": {"de": "e", "en": "f", "fr": "g"}}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    for streaming in (False, True):
        pairs = list(load_split(DataConfig(path=str(tmp_path)), "train", streaming))
        assert [(p["src"], p["tgt"]) for p in pairs] == [("a", "b"), ("c", None), (None, None), ("e", "f")]
    with pytest.raises(DataError, match=r"train\.jsonl: no 'cs' text in any pair$"):
        load_split(DataConfig(path=str(tmp_path), tgt_lang="cs"), "train")


def test_a_large_json_lines_file_whose_later_lines_have_other_keys_names_the_first(tmp_path):
    row = json.dumps({"de": "Ein Hund läuft über die Wiese.", "en": "A dog runs across the meadow."}) + "\n"
    n = 11_000_000 // len(row.encode()) + 1  # past the 10 MB block datasets reads first
    (tmp_path / "train.jsonl").write_text(row * n + json.dumps({"de": "a", "en": "b", "fr": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"train\.jsonl, line {n + 1}: its keys \(de, en, fr\) differ from the first line's \(de, en\)"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_a_json_lines_error_after_a_byte_order_mark_names_its_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'\xef\xbb\xbf{"de": "a", "en": "b"}\n{"de": "c", "en": "d"}\n{"de": "e" "en": "f"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl, line 3: not valid JSON"):
        load_split(DataConfig(path=str(tmp_path)), "train")


@pytest.mark.parametrize("content, line, language", [
    ('de,en\nEin Hund.,A dog.\nEin Mann\nläuft.,A man runs.\n', 3, "en"),  # a line break inside an unquoted cell
    ('de,en\r\n"Ein\r\nHund.",A dog.\r\n \r\n"Eine\r\nKatze."\r\n', 5, "en"),  # the line where the row begins; blank lines skipped
    ('en,note,de\nA dog.,x,Ein Hund.\nA cat.,y\n', 3, "de"),
])
def test_a_csv_row_short_of_a_languages_cell_names_its_line(tmp_path, content, line, language):
    (tmp_path / "train.csv").write_text(content, encoding="utf-8", newline="")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}/train\.csv, line {line}: no '{language}' cell"):
        load_split(DataConfig(path=str(tmp_path)), "train")


@pytest.mark.parametrize("content", [
    'de,en,note\nEin Hund.,A dog.,x\nEine Katze.,A cat.\n',  # short of a column that is no language
    'de,en,\nEin Hund.,A dog.\n   \nEine Katze.,A cat.\n',  # a trailing comma in the header; a line of spaces
    'de,en\nEin Hund.,"A\ndog."\nEine Katze.,A cat.\n',  # a quoted line break in the last cell
])
def test_csv_rows_that_hold_both_languages_load(tmp_path, content):
    (tmp_path / "train.csv").write_text(content, encoding="utf-8")
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert pairs["src"] == ["Ein Hund.", "Eine Katze."] and [t.replace("\n", " ") for t in pairs["tgt"]] == ["A dog.", "A cat."]


def test_a_csv_cell_as_long_as_a_document_loads_and_a_quote_never_closed_names_its_line(tmp_path):
    long = "Wort, " * 25_000  # 150 kB: over the csv module's default limit of 128 KiB a cell, which pandas does not have
    (tmp_path / "train.csv").write_text(f'de,en\n"{long}",A word.\nEin Hund.,A dog.\n', encoding="utf-8")
    assert load_split(DataConfig(path=str(tmp_path)), "train")["src"] == [long, "Ein Hund."]
    assert csv.field_size_limit() == 131_072  # the process's own limit, as it was
    # an unclosed quote in the first row swallows the rest of the file into one cell
    rows = "".join(f"Ein Hund {i}.,A dog {i}.\n" for i in range(20_000))
    (tmp_path / "train.csv").write_text(f'de,en\n"Ein Mann.,A man.\n{rows}', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}/train\.csv, line 2: no 'en' cell .*a quote never closed\?"):
        load_split(DataConfig(path=str(tmp_path)), "train")


def test_missing_cells_are_empty_sides_not_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"de": "a", "en": "b"}\n{"de": null, "en": "d"}\n{"de": "e"}\n', encoding="utf-8")
    pairs = load_split(DataConfig(path=str(tmp_path)), "train")
    assert pairs["src"] == ["a", None, "e"] and pairs["tgt"] == ["b", "d", None]


def test_a_split_with_no_pair_left_after_filtering_names_its_file(tmp_path):
    write_split(tmp_path, "train", "jsonl", rows(20))
    cfg = DataConfig(path=str(tmp_path), max_len=2)
    pairs = load_split(cfg, "train")
    tokenizer = Tokenizer.train([r[k] for r in rows(20) for k in ("de", "en")], vocab_size=40)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'train.jsonl'))}: no pair left to train on \(kept 0 pairs; .* 20 longer"):
        training_pairs(pairs, tokenizer, cfg)
    kept, report = training_pairs(pairs, tokenizer, DataConfig(path=str(tmp_path)))
    assert report.kept == len(kept) == 20


@pytest.fixture
def hub_with_two_configurations(tmp_path, monkeypatch):
    """`org/parallel` on the "hub": a dataset with configurations de-en and fr-en and no default, as wmt14
    (de-en, fr-en, ...). datasets itself reads it, from a local folder that stands in for the hub."""
    folder = tmp_path / "parallel"
    for config, lang in (("de-en", "de"), ("fr-en", "fr")):
        write_split(folder / config, "train", "jsonl", [{"translation": {lang: "x", "en": "y"}}])
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n" for c in ("de-en", "fr-en"))
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n", encoding="utf-8")
    for name in ("load_dataset", "get_dataset_split_names", "get_dataset_config_names"):
        real = getattr(datasets, name)
        monkeypatch.setattr(datasets, name, lambda path, *a, real=real, **k: real(str(folder) if path == "org/parallel" else path, *a, **k))
    return "org/parallel"


def test_a_hub_dataset_that_needs_a_configuration_name_says_so(hub_with_two_configurations):
    with pytest.raises(DataError, match=r"^dataset 'org/parallel' needs a configuration name: set data\.name to one of de-en, fr-en$"):
        load_split(DataConfig(path=hub_with_two_configurations), "train")
    with pytest.raises(DataError, match=r"^data\.name: dataset 'org/parallel' has no configuration 'it-en'; configurations: de-en, fr-en$"):
        load_split(DataConfig(path=hub_with_two_configurations, name="it-en"), "train")
    with pytest.raises(DataError, match=r"^split 'test' not in dataset 'org/parallel'; splits there: train$"):
        load_split(DataConfig(path=hub_with_two_configurations, name="de-en"), "test")
    assert load_split(DataConfig(path=hub_with_two_configurations, name="de-en"), "train")["src"] == ["x"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_downloaded_whole_loads_as_the_hub_does(hub_with_two_configurations, tmp_path, streaming):
    # huggingface-cli download ... --local-dir: the card's configurations, or data/{split}-00000-of-00001.parquet without one
    configured = DataConfig(path=str(tmp_path / "parallel"), name="de-en", streaming=streaming)
    assert [p["src"] for p in load_split(configured, "train")] == ["x"]
    with pytest.raises(DataError, match=rf"^data\.name: dataset '{re.escape(str(tmp_path))}/parallel' has no configuration 'it-en'"):
        load_split(replace(configured, name="it-en"), "train")
    (tmp_path / "plain" / "data").mkdir(parents=True)
    for split, data in (("train", rows(4)), ("validation", rows(2, seed=1))):
        pd.DataFrame(data).to_parquet(tmp_path / "plain" / "data" / f"{split}-00000-of-00001.parquet")
    plain = DataConfig(path=str(tmp_path / "plain"), streaming=streaming)
    assert [(p["src"], p["tgt"]) for p in load_split(plain, "validation")] == [(r["de"], r["en"]) for r in rows(2, seed=1)]
    with pytest.raises(DataError, match=r"^split 'test' not in dataset .*plain'; splits there: train, validation$"):
        load_split(plain, "test")


@pytest.mark.skipif(not MULTI30K.exists(), reason=f"Multi30k not found at {MULTI30K}")
def test_multi30k_local_copy():
    cfg = DataConfig(path=str(MULTI30K), src_lang="de", tgt_lang="en")
    train = load_split(cfg, "train")
    assert len(train) == 29000
    first = json.loads((MULTI30K / "train.jsonl").open(encoding="utf-8").readline())
    assert (train[0]["src"], train[0]["tgt"]) == (first["de"], first["en"])
    src, tgt = train["src"][:500], train["tgt"][:500]
    # German source, English target: umlauts and German function words on one side only.
    assert sum(any(c in s for c in "äöüßÄÖÜ") for s in src) > 50
    assert sum(any(c in t for c in "äöüß") for t in tgt) < 5
    assert sum(" der " in s or " die " in s for s in src) > sum(" der " in t or " die " in t for t in tgt) + 50
    assert sum(" the " in t.lower() for t in tgt) > sum(" the " in s.lower() for s in src) + 50


# --- tokenize and filter -----------------------------------------------------------------------


def ids_dataset(src: list[list[int]], tgt: list[list[int]]) -> datasets.Dataset:
    features = datasets.Features({"src_ids": datasets.Sequence(datasets.Value("int64")), "tgt_ids": datasets.Sequence(datasets.Value("int64"))})
    return datasets.Dataset.from_dict({"src_ids": src, "tgt_ids": tgt}, features=features)


def test_tokenize_adds_ids_without_specials():
    data = rows(40)
    pairs = to_pairs(datasets.Dataset.from_list(data), "de", "en")
    tokenizer = Tokenizer.train([r[k] for r in data for k in ("de", "en")], vocab_size=60)
    tokenized = tokenize(pairs, tokenizer)
    assert tokenized["src_ids"] == tokenizer.encode(list(pairs["src"]))
    assert tokenized["tgt_ids"] == tokenizer.encode(list(pairs["tgt"]))
    assert tokenized["src"] == pairs["src"]
    src_len, tgt_len = lengths(tokenized)
    assert src_len.tolist() == [len(x) for x in tokenized["src_ids"]]
    assert tgt_len.tolist() == [len(x) for x in tokenized["tgt_ids"]]


def test_filter_pairs_drops_empty_and_too_long():
    src = [[], [5], [], [5, 6, 7], [5, 6, 7, 8], [5], [5], [9, 9]]
    tgt = [[5], [], [], [8], [9], [6, 7, 8, 9], [6], [9, 9, 9]]
    # index:  0 empty, 1 empty, 2 empty, 3 kept (== max_len), 4 too long, 5 too long, 6 kept, 7 kept
    kept, report = filter_pairs(ids_dataset(src, tgt), max_len=3, max_ratio=0)
    assert report == FilterReport(kept=3, empty=3, too_long=2, bad_ratio=0)
    assert kept["src_ids"] == [src[3], src[6], src[7]]
    assert kept["tgt_ids"] == [tgt[3], tgt[6], tgt[7]]
    text = str(report)
    assert "kept 3" in text and "3 with an empty or blank side" in text and "2 longer" in text


def test_filter_pairs_empty_and_long_is_counted_once():
    kept, report = filter_pairs(ids_dataset([[], [1] * 10], [[1] * 10, [1]]), max_len=3, max_ratio=2)
    assert report == FilterReport(kept=0, empty=1, too_long=1, bad_ratio=0)
    assert len(kept) == 0


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=30),
    max_len=st.integers(1, 8),
    max_ratio=st.sampled_from([0, 1, 1.5, 3]),
)
def test_filter_pairs_property(lens, max_len, max_ratio):
    src = [[4 + i] * a for i, (a, _) in enumerate(lens)]
    tgt = [[4 + i] * b for i, (_, b) in enumerate(lens)]
    kept, report = filter_pairs(ids_dataset(src, tgt), max_len, max_ratio)
    ratio_ok = lambda a, b: max_ratio == 0 or max(a, b) <= max_ratio * min(a, b)  # noqa: E731
    expected = [i for i, (a, b) in enumerate(lens) if 0 < a <= max_len and 0 < b <= max_len and ratio_ok(a, b)]
    assert kept["src_ids"] == [src[i] for i in expected]
    assert report.kept == len(expected) == len(kept)
    assert report.empty == sum(a == 0 or b == 0 for a, b in lens)
    assert report.kept + report.empty + report.too_long + report.bad_ratio == len(lens)


def test_filter_pairs_drops_extreme_length_ratios():
    kept, report = filter_pairs(ids_dataset([[5] * 10, [5] * 3, [5]], [[6], [6, 6], [6] * 9]), max_len=20, max_ratio=9)
    assert report == FilterReport(kept=2, empty=0, too_long=0, bad_ratio=1)
    assert kept["tgt_ids"] == [[6, 6], [6] * 9]


# --- batching ----------------------------------------------------------------------------------


def check_partition(batches: list[np.ndarray], n: int) -> None:
    assert all(len(b) > 0 for b in batches)
    everything = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert len(everything) == n
    assert sorted(everything.tolist()) == list(range(n))


def check_budget(batches: list[np.ndarray], sizes: np.ndarray, max_tokens: int) -> None:
    for b in batches:
        if len(b) >= 2:
            assert len(b) * int(sizes[b].max()) <= max_tokens


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 80), max_size=120),
    max_tokens=st.integers(1, 400),
    sort=st.booleans(),
)
def test_chunk_by_budget_properties(sizes, max_tokens, sort):
    sizes = np.array(sizes, dtype=np.int64)
    order = np.argsort(sizes, kind="stable") if sort else np.random.default_rng(0).permutation(len(sizes))
    batches = chunk_by_budget(order, sizes, max_tokens)
    check_partition(batches, len(sizes))
    check_budget(batches, sizes, max_tokens)
    # Consecutive runs of `order`, in order.
    assert np.array_equal(np.concatenate(batches) if batches else order, order)
    # Greedy: a batch is cut only when the next example would break the budget.
    for b, nxt in zip(batches, batches[1:]):
        assert (len(b) + 1) * max(int(sizes[b].max()), int(sizes[nxt[0]])) > max_tokens


def test_chunk_by_budget_fills_batches_exactly_to_the_budget():
    batches = chunk_by_budget(np.arange(9), np.full(9, 10), max_tokens=40)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert chunk_by_budget(np.arange(0), np.zeros(0, dtype=np.int64), max_tokens=40) == []


def test_chunk_by_budget_oversized_example_gets_its_own_batch():
    sizes = np.array([5, 100, 5, 6])
    batches = chunk_by_budget(np.array([0, 2, 3, 1]), sizes, max_tokens=50)
    assert [b.tolist() for b in batches] == [[0, 2, 3], [1]]


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), max_size=150),
    max_tokens=st.integers(1, 300),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    pool_size=st.sampled_from([1, 7, 32, 100_000]),
)
def test_bucketed_batches_properties(sizes, max_tokens, seed, epoch, pool_size):
    sizes = np.array(sizes, dtype=np.int64)
    batches = bucketed_batches(sizes, max_tokens, seed, epoch, pool_size=pool_size)
    check_partition(batches, len(sizes))
    check_budget(batches, sizes, max_tokens)
    again = bucketed_batches(sizes, max_tokens, seed, epoch, pool_size=pool_size)
    assert len(again) == len(batches)
    assert all(np.array_equal(a, b) for a, b in zip(again, batches))


def test_bucketed_batches_differ_across_epochs_and_seeds():
    sizes = np.random.default_rng(0).integers(1, 40, size=500)

    def flat(seed, epoch):
        return np.concatenate(bucketed_batches(sizes, 200, seed, epoch)).tolist()

    orders = [flat(1234, e) for e in range(5)]
    assert all(a != b for a, b in itertools.combinations(orders, 2))
    assert flat(1234, 0) != flat(4321, 0)
    assert flat(1234, 3) == flat(1234, 3)


def test_bucketed_batches_group_similar_lengths():
    # Sorting inside the pool keeps padding low: far less than with random batches of the same count.
    sizes = np.random.default_rng(1).integers(1, 60, size=2000)
    batches = bucketed_batches(sizes, 600, seed=0, epoch=0)
    padded = sum(len(b) * sizes[b].max() for b in batches)
    assert padded < 1.2 * sizes.sum()


def test_pad_and_specials():
    t = pad([[7, 8], [9]], prefix=[BOS_ID], suffix=[EOS_ID])
    assert t.dtype == torch.int64
    assert t.tolist() == [[BOS_ID, 7, 8, EOS_ID], [BOS_ID, 9, EOS_ID, PAD_ID]]
    assert source_tensor([[7], [8, 9]]).tolist() == [[7, EOS_ID, PAD_ID], [8, 9, EOS_ID]]
    tgt_in, tgt_out = target_tensors([[7, 8], [9]])
    assert tgt_in.tolist() == [[BOS_ID, 7, 8], [BOS_ID, 9, EOS_ID]]
    assert tgt_out.tolist() == [[7, 8, EOS_ID], [9, EOS_ID, PAD_ID]]


@pytest.fixture(scope="module")
def train_batches() -> tuple[TrainBatches, list[list[int]], list[list[int]]]:
    rng = random.Random(3)
    src = [[rng.randrange(4, 100) for _ in range(rng.randrange(1, 20))] for _ in range(300)]
    tgt = [[rng.randrange(4, 100) for _ in range(rng.randrange(1, 20))] for _ in range(300)]
    return TrainBatches(ids_dataset(src, tgt), max_tokens=64, seed=5), src, tgt


def test_train_batches_collate(train_batches):
    batches, src, tgt = train_batches
    for indices in batches.epoch(0)[:20]:
        batch = batches.collate(indices)
        B = len(indices)
        assert batch.src.shape[0] == batch.tgt_in.shape[0] == batch.tgt_out.shape[0] == B
        assert batch.tgt_in.shape == batch.tgt_out.shape
        assert batch.src.shape[1] == max(len(src[i]) for i in indices) + 1
        assert batch.tgt_in.shape[1] == max(len(tgt[i]) for i in indices) + 1
        # Shifted by one: the decoder reads position t and predicts position t + 1.
        assert torch.equal(batch.tgt_out[:, :-1], batch.tgt_in[:, 1:])
        for row, i in enumerate(indices):
            s, t = src[i], tgt[i]
            assert batch.src[row].tolist() == s + [EOS_ID] + [PAD_ID] * (batch.src.shape[1] - len(s) - 1)
            assert batch.tgt_in[row, 0] == BOS_ID
            assert batch.tgt_in[row, 1 : len(t) + 1].tolist() == t
            assert batch.tgt_out[row].tolist() == t + [EOS_ID] + [PAD_ID] * (batch.tgt_out.shape[1] - len(t) - 1)
        assert batch.n_tgt_tokens == sum(len(tgt[i]) + 1 for i in indices)


def test_train_batches_respect_the_budget_in_tensors(train_batches):
    batches, src, tgt = train_batches
    for epoch in (0, 1):
        indices_per_batch = batches.epoch(epoch)
        check_partition(indices_per_batch, len(src))
        for indices in indices_per_batch:
            batch = batches.collate(indices)
            if len(indices) >= 2:
                assert batch.src.numel() <= batches.max_tokens
                assert batch.tgt_in.numel() <= batches.max_tokens


def test_train_batches_iterate_epoch_after_epoch(train_batches):
    batches, _, _ = train_batches
    epoch0, epoch1 = batches.epoch(0), batches.epoch(1)
    stream = list(itertools.islice(batches.from_position({}), len(epoch0) + 2))
    positions = [(0, i + 1) for i in range(len(epoch0))] + [(1, 1), (1, 2)]  # where to resume after each batch
    for indices, position, (after, batch) in zip(epoch0 + epoch1[:2], positions, stream):
        assert (after["epoch"], after["batch_in_epoch"]) == position
        expected = batches.collate(indices)
        assert torch.equal(batch.src, expected.src) and torch.equal(batch.tgt_out, expected.tgt_out)


def test_train_batches_resume_mid_epoch(train_batches):
    batches, _, _ = train_batches
    epoch1 = batches.epoch(1)
    after, batch = next(batches.from_position({"epoch": 1, "batch_in_epoch": 2}))  # a checkpoint after 2 batches of epoch 1
    assert after == {"epoch": 1, "batch_in_epoch": 3}
    assert torch.equal(batch.src, batches.collate(epoch1[2]).src)


def test_batch_padding_counts_padded_positions_of_both_sides(train_batches):
    batches, src, tgt = train_batches
    for indices in batches.epoch(3):
        pads, positions = batches.collate(indices).padding
        longest_src, longest_tgt = max(len(src[i]) for i in indices) + 1, max(len(tgt[i]) for i in indices) + 1
        assert positions == len(indices) * (longest_src + longest_tgt)
        assert pads == positions - sum(len(src[i]) + len(tgt[i]) + 2 for i in indices)


def test_tokenizing_in_several_processes_gives_the_same_ids():
    data = rows(300)
    pairs = to_pairs(datasets.Dataset.from_list(data), "de", "en")  # in memory: no cache to answer for the workers
    tokenizer = Tokenizer.train([r[k] for r in data for k in ("de", "en")], vocab_size=60)
    one = tokenize(pairs, tokenizer)
    two = tokenize(pairs, tokenizer, num_proc=2)
    assert two["src_ids"] == one["src_ids"] and two["tgt_ids"] == one["tgt_ids"]


# --- streaming -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A 300-pair jsonl split read as a stream, with pools of 70 pairs (five pools, the last short)."""
    folder = tmp_path_factory.mktemp("stream")
    data = rows(300, seed=7) + [{"de": "", "en": "Nothing on the other side."}]  # one pair for the filter to drop
    write_split(folder, "train", "jsonl", data)
    pairs = load_split(DataConfig(path=str(folder), src_lang="de", tgt_lang="en"), "train", streaming=True)
    assert isinstance(pairs, datasets.IterableDataset)
    tokenizer = Tokenizer.train([r[k] for r in data for k in ("de", "en")], vocab_size=80)
    return StreamBatches(pairs, tokenizer, max_tokens=96, seed=3, max_len=64, max_ratio=0, pool_size=70, shuffle_buffer=32), data, tokenizer


@pytest.mark.parametrize("late, broken, problem", [
    (True, '{"de": "Ein Hund.", "en": \n', "not valid JSON"),
    (False, '{"de": "Ein Hund.", "en": "A dog."\n', "not valid JSON"),  # in the first rows, read to learn the stream's columns
    (True, '{"de": "Ein Hund.", "en": "A dog.", "id": 5}\n', r"its keys \(de, en, id\) differ from the first line's \(de, en\)"),
], ids=["late", "early", "other-keys-late"])
def test_a_broken_line_in_a_stream_names_the_file_and_line(tmp_path, late, broken, problem):
    # datasets reads the first 10 MB block to start the stream; a broken line past it fails only as it is read
    row = json.dumps({"de": "Ein Hund läuft über die Wiese.", "en": "A dog runs across the meadow."}) + "\n"
    n = 11_000_000 // len(row.encode()) + 1 if late else 300
    (tmp_path / "train.jsonl").write_text(row * n + broken + row * 10, encoding="utf-8")
    cfg = DataConfig(path=str(tmp_path), streaming=True)
    message = rf"^{re.escape(str(tmp_path))}/train\.jsonl, line {n + 1}: {problem}"
    with pytest.raises(DataError, match=message):  # a split read whole through a stream (validation, test)
        load_split(cfg, "train")
    tokenizer = Tokenizer.train(["Ein Hund läuft über die Wiese.", "A dog runs across the meadow."] * 50, vocab_size=40)
    with pytest.raises(DataError, match=message):  # the training stream: early, as it starts; late, as it is read
        batches = StreamBatches(load_split(cfg, "train", streaming=True), tokenizer, max_tokens=4096, seed=1, max_len=64, max_ratio=0,
                                pool_size=1_000_000, source=str(tmp_path / "train.jsonl"))
        next(batches.from_position({}))
    with pytest.raises(DataError, match=message):  # the tokenizer's sample of the training stream
        Tokenizer.train(sentences(load_split(cfg, "train", streaming=True), str(tmp_path / "train.jsonl")), vocab_size=40)


def epoch_of(stream: StreamBatches, epoch: int) -> list[tuple[dict, Batch]]:
    return list(itertools.takewhile(lambda item: item[0]["epoch"] == epoch, stream.from_position({"epoch": epoch})))


def pairs_in(batch: Batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (source ids, target ids) of each row, specials and padding stripped."""
    strip = lambda row: tuple(t for t in row if t not in (PAD_ID, EOS_ID, BOS_ID))  # noqa: E731
    return [(strip(s), strip(t)) for s, t in zip(batch.src.tolist(), batch.tgt_out.tolist())]


def test_streamed_epoch_holds_every_kept_pair_once_within_the_budget(streamed):
    stream, data, tokenizer = streamed
    epoch = epoch_of(stream, 0)
    seen = [pair for _, batch in epoch for pair in pairs_in(batch)]
    kept = [r for r in data if r["de"]]
    assert sorted(seen) == sorted(zip(map(tuple, tokenizer.encode([r["de"] for r in kept])), map(tuple, tokenizer.encode([r["en"] for r in kept]))))
    for _, batch in epoch:
        if batch.src.size(0) > 1:
            assert batch.src.numel() <= 96 and batch.tgt_in.numel() <= 96
    assert epoch[-1][0] == {"epoch": 0, "pairs_read": len(data), "batch_in_pool": 0}


def test_streamed_epochs_differ_and_the_same_seed_repeats(streamed):
    stream, _, _ = streamed
    first = [pairs_in(b) for _, b in epoch_of(stream, 0)]
    again = [pairs_in(b) for _, b in epoch_of(stream, 0)]
    second = [pairs_in(b) for _, b in epoch_of(stream, 1)]
    assert first == again and first != second
    assert sorted(first) != sorted(second), "epochs differ in batch order only: the stream's shuffle ignored the epoch"


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_streamed_batches_resume_from_any_position(streamed, cut):
    stream, _, _ = streamed
    straight = list(itertools.islice(stream.from_position({}), 30))
    resumed = list(itertools.islice(stream.from_position(straight[cut - 1][0]), 30 - cut))
    for (pos_a, a), (pos_b, b) in zip(straight[cut:], resumed):
        assert pos_a == pos_b and torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out)


def test_streamed_batches_resume_inside_a_later_epoch(streamed):
    stream, _, _ = streamed
    second = epoch_of(stream, 1)
    for cut in (1, len(second) // 2):
        resumed = list(itertools.takewhile(lambda item: item[0]["epoch"] == 1, stream.from_position(second[cut - 1][0])))
        assert [(pos, pairs_in(b)) for pos, b in resumed] == [(pos, pairs_in(b)) for pos, b in second[cut:]]


def test_a_streaming_recipe_reads_whole_splits_through_a_stream(tmp_path):
    data = rows(30, seed=2)
    write_split(tmp_path, "validation", "jsonl", data)
    cfg = DataConfig(path=str(tmp_path), src_lang="de", tgt_lang="en", streaming=True)
    whole = load_split(cfg, "validation")
    assert isinstance(whole, datasets.Dataset)
    assert whole["src"] == [r["de"] for r in data] and whole["tgt"] == [r["en"] for r in data]
    assert isinstance(load_split(cfg, "validation", streaming=True), datasets.IterableDataset)


def test_subword_sampling_draws_other_pieces_each_epoch_of_the_same_pairs_reproducibly(toy_corpus):
    from translator.trainset import SampledTrainBatches

    pairs = load_split(DataConfig(path=str(toy_corpus)), "train")
    tokenizer = Tokenizer.train((x for p in zip(pairs["src"], pairs["tgt"]) for x in p), 60, seed=0)
    tokenized = tokenize(pairs, tokenizer)
    sampled = SampledTrainBatches(tokenized, 400, seed=3, tokenizer=tokenizer, sampling=0.1, max_len=40)
    best = TrainBatches(tokenized, 400, seed=3)

    def epoch_rows(batches, epoch):
        return {int(i): (batch.src[row].tolist(), batch.tgt_out[row].tolist())
                for indices in batches.epoch(epoch) for batch in [batches.collate(indices)] for row, i in enumerate(indices)}

    first, second, plain = epoch_rows(sampled, 0), epoch_rows(sampled, 1), epoch_rows(best, 0)
    assert first.keys() == second.keys() == plain.keys()  # every pair, every epoch
    strip = lambda ids: [t for t in ids if t > EOS_ID]  # noqa: E731
    decoded = lambda rows: {i: tuple(tokenizer.decode([strip(s), strip(t)])) for i, (s, t) in rows.items()}  # noqa: E731
    assert decoded(first) == decoded(second) == decoded(plain)  # the same text...
    assert sum(first[i] != plain[i] for i in first) > len(first) // 4  # ...in other pieces
    assert sum(first[i] != second[i] for i in first) > len(first) // 4  # drawn anew each epoch
    again = SampledTrainBatches(tokenized, 400, seed=3, tokenizer=tokenizer, sampling=0.1, max_len=40)
    assert epoch_rows(again, 1) == second  # seeded by (seed, epoch): the same pieces, within one process
    assert all(len(strip(s)) <= 40 and len(strip(t)) <= 40 for s, t in first.values())


def test_under_torchrun_every_rank_cuts_its_batches_from_rank_0s_sampled_pieces(toy_corpus):
    """SentencePiece's seeded draws differ from process to process: each rank drawing its own
    pieces would cut other batches, and their shares would overlap and miss pairs."""
    from translator.trainset import SampledTrainBatches

    pairs = load_split(DataConfig(path=str(toy_corpus)), "train")
    tokenizer = Tokenizer.train((x for p in zip(pairs["src"], pairs["tgt"]) for x in p), 60, seed=0)
    tokenized = tokenize(pairs, tokenizer)
    broadcast = []
    rank0 = SampledTrainBatches(tokenized, 400, 3, tokenizer, 0.1, 40, agree=lambda draw: broadcast.append(draw()) or broadcast[-1])
    alone = SampledTrainBatches(tokenized, 400, 3, OtherProcess(tokenizer), 0.1, 40)
    rank1_tokenizer = OtherProcess(tokenizer)
    rank1 = SampledTrainBatches(tokenized, 400, 3, rank1_tokenizer, 0.1, 40, agree=lambda draw: broadcast.pop(0))
    batches = [indices.tolist() for indices in rank0.epoch(0)]
    assert [indices.tolist() for indices in alone.epoch(0)] != batches  # the premise: other pieces, other batches
    assert [indices.tolist() for indices in rank1.epoch(0)] == batches
    assert all(torch.equal(rank0.collate(i).src, rank1.collate(i).src) for i in rank0.epoch(0))
    assert rank1_tokenizer.draws == 0  # only rank 0 segments the corpus


class OtherProcess:
    """A tokenizer whose seeded draws come out as another process's do: other pieces for the same seed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.draws = tokenizer, 0

    def encode(self, texts, sampling, seed):
        self.draws += 1
        return self.tokenizer.encode(texts, sampling, seed + 1)


def test_a_checkpoint_keeps_the_sampled_epoch_so_a_resumed_process_finishes_it_on_the_same_batches(toy_corpus, tmp_path):
    """SentencePiece cannot draw an epoch's pieces again in another process: the checkpoint keeps
    them. Without them, a run resumed mid-epoch cuts other batches, and the rest of the epoch skips
    some pairs and repeats others."""
    from translator.checkpoint import load_data_arrays, save_training_checkpoint
    from translator.config import ModelConfig
    from translator.model import Transformer
    from translator.trainset import SampledTrainBatches

    pairs = load_split(DataConfig(path=str(toy_corpus)), "train")
    tokenizer = Tokenizer.train((x for p in zip(pairs["src"], pairs["tgt"]) for x in p), 60, seed=0)
    tokenized = tokenize(pairs, tokenizer)
    before = SampledTrainBatches(tokenized, 400, 3, tokenizer, 0.1, 40)
    stream = before.from_position({})
    position = [next(stream) for _ in range(5)][-1][0]
    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1), 60)
    saved = save_training_checkpoint(tmp_path, 5, model, torch.optim.AdamW(model.parameters()), {"step": 5}, keep=2, data=before.drawn())
    rest = [batch for p, batch in itertools.islice(stream, 1000) if p["epoch"] == 0]
    assert len(rest) > 3

    def left_over(batches):  # the pairs the rest of epoch 0 trains on
        return sorted(int(i) for indices in batches.epoch(0)[position["batch_in_epoch"]:] for i in indices)

    after = SampledTrainBatches(tokenized, 400, 3, OtherProcess(tokenizer), 0.1, 40)
    assert left_over(after) != left_over(before)  # the premise: drawn again, other pairs are left over
    after.restore(load_data_arrays(saved))
    assert left_over(after) == left_over(before)
    again = [batch for _, batch in itertools.islice(after.from_position(position), len(rest))]
    assert all(torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out) for a, b in zip(again, rest))
