"""Local split files, checked before `datasets` reads them and explained when it cannot.

Each check returns what is wrong, naming the file and line, or None: `datasets` and pandas
say "corresponds to no data" for an empty file, read the CSV cell `NA` as missing, and name
the row of a JSON Lines reader's error but not the line.
"""

from __future__ import annotations

import csv
import json
from itertools import islice

import datasets
import pandas


def nothing_to_read(file: str) -> str | None:
    """An empty (or blank) file; a byte-order mark alone is an empty file as Notepad saves it."""
    with open(file, "rb") as f:
        first = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
        blank = not first.strip() and not any(block.strip() for block in iter(lambda: f.read(1 << 16), b""))
    return f"{file}: the file is empty (no pairs)" if blank else None


def csv_rows_problem(file: str, languages: tuple[str, str]) -> str | None:
    """A CSV file with a header and no rows, a row short of a language's cell, or a quote that swallows the rest
    of the file. pandas reads the cells missing from a short row as empty text, and a line break inside an
    unquoted cell cuts a pair in two: both halves would be lost without a word (a row of more cells pandas
    refuses itself, naming its line). utf-8-sig: the byte-order mark that Excel's "CSV UTF-8" writes is not
    part of the first column's name (pandas drops it too). A cell may be as long as a document: pandas has no limit."""
    limit = csv.field_size_limit(2**31 - 1)
    try:
        return _csv_rows_problem(file, languages)
    finally:
        csv.field_size_limit(limit)


def _csv_rows_problem(file: str, languages: tuple[str, str]) -> str | None:
    with open(file, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        needed = [(header.index(language), language) for language in languages if language in header]
        any_row, first_line = False, rows.line_num + 1  # the line where the next row begins
        try:
            for row in rows:
                if any(cell.strip() for cell in row):  # pandas skips blank lines
                    any_row = True
                    if missing := next((language for index, language in needed if index >= len(row)), None):
                        return (f"{file}, line {first_line}: no {missing!r} cell ({len(row)} cell(s) where the header has "
                                f"{len(header)}: a line break inside an unquoted cell, or a quote never closed?)")
                first_line = rows.line_num + 1
        except csv.Error as e:  # a cell past 2 GiB: a quote opened there and never closed, over a whole corpus
            return f"{file}: cannot be read as csv from line {first_line} ({e}: a quote opened there and never closed?)"
    return None if any_row else f"{file}: a header and no pairs"


def csv_as_text(file: str) -> dict:
    """`load_dataset("csv", ...)` options that read every cell as text: pandas would read NA, null,
    None, n/a and the like as missing (and the pair would be dropped), and 007 as the number 7.
    The columns are named as pandas names them: an empty header cell (`df.to_csv()`'s index
    column, a trailing comma) is "Unnamed: 0", a repeated name "en.1"."""
    header = pandas.read_csv(file, nrows=0, encoding="utf-8-sig").columns
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_filter": False}


def first_unreadable_json_line(file: str, languages: tuple[str, str]) -> str | None:
    """The first line of a JSON Lines file that is not one JSON object, or whose text for one of
    `languages` (flat, or in a translation dict) is neither a string nor missing. A byte-order mark is not JSON: utf-8-sig."""
    with open(file, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # a line cut short fails at its end, not after the newline
            except json.JSONDecodeError as e:
                return f"{file}, line {number}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"{file}, line {number}: expected a JSON object of {{language: text}}, got {type(row).__name__}"
            try:  # an escaped half of a surrogate pair ("\\ud83d", left by a cut in scraped text): JSON, but no text
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{file}, line {number}: {e.object[e.start:e.end]!r} is half of a surrogate pair, not a character"
            texts = row["translation"] if isinstance(row.get("translation"), dict) else row
            for language in languages:
                if (problem := not_text(texts.get(language), language)):
                    return f"{file}, line {number}: {problem}"
    return None


def first_line_of_other_keys(file: str) -> str | None:
    """The first line of a JSON Lines file (of valid lines) whose keys differ from the first line's: `datasets` reads
    such a file in blocks of 10 MB, and refuses a block whose columns differ from the first block's."""
    with open(file, encoding="utf-8-sig") as f:
        rows = ((number, json.loads(line)) for number, line in enumerate(f, start=1) if line.strip())
        first = sorted(next(rows, (0, {}))[1])
        for number, row in rows:
            if sorted(row) != first:
                return (f"{file}, line {number}: its keys ({', '.join(sorted(row))}) differ from the first line's ({', '.join(first)}); "
                        "a file this large is read in blocks that must share their keys: give every line the same keys (a missing text can be null)")
    return None


def not_text(value, language: str) -> str | None:
    """A cell that is neither text nor missing (missing is an empty side, which the filter drops)."""
    if value is None or isinstance(value, str):
        return None
    return f"{language!r} is {type(value).__name__} {value!r:.40}, expected text"


def line_of_row(file: str, row: int) -> int:
    """The line of a JSON Lines file that holds row `row` (0-based; blank lines hold none)."""
    with open(file, encoding="utf-8") as f:
        rows = (number for number, line in enumerate(f, start=1) if line.strip())
        return next(islice(rows, row, None))
