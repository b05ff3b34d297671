"""Every bad input gets a clear answer: the message names the key, file, column or split, and the
command line exits with the right status (0 ok, 1 runtime failure, 2 usage error) without a traceback.

Complements test_config.py, test_data.py, test_checkpoint.py and test_cli.py, which cover the
API-level recipe errors, the layouts and most broken model directories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import translator
from conftest import TINY_RECIPE, toy_pair, write_toy_corpus
from translator.checkpoint import CONFIG, SPM, WEIGHTS, CheckpointError
from translator.config import DataConfig
from translator.data import DataError, load_split
from translator.trainset import FilterReport, filter_pairs, tokenize
from translator.tokenizer import Tokenizer


def cli(*args, stdin: str | bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m translator ARGS`; stdout and stderr as str (decoded without newline translation)."""
    environment = {k: v for k, v in os.environ.items() if k != "TRANSLATOR_DEBUG"}
    environment.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", **(env or {}))
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    result = subprocess.run(
        [sys.executable, "-m", "translator", *map(str, args)], input=data, capture_output=True, env=environment, timeout=600
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8"))


def assert_usage_error(result: subprocess.CompletedProcess, verb: str, *named: str) -> str:
    """Exit status 2, one line on stderr naming everything in `named`, no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"translator {verb}: error: "), lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])
    assert result.stdout == ""
    return lines[0]


def write_recipe(folder: Path, **changes) -> Path:
    """The tiny recipe with `section.key` changes (dotted names as `section__key`)."""
    values = yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        *sections, key = dotted.split("__")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


TOY_SENTENCES = ["Ein mann sieht der hut.", "Der alte hund trägt ein ball.", "Eine frau fährt ein fahrrad.", "Ein kind sieht der rote ball."]


# --- command line: usage errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"model__d_modle": 64}, "model.d_modle"),
        ({"model__n_heads": "four"}, "model.n_heads"),
        ({"model__dropout": 1.5}, "model.dropout"),
        ({"train__precision": "fp8"}, "train.precision"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "not-a-choice"],
)
def test_cli_bad_recipe_file_exits_2_naming_the_key(tmp_path, changes, key):
    recipe = write_recipe(tmp_path, **changes)
    assert_usage_error(cli("train", recipe, "--quiet"), "train", key)


@pytest.mark.parametrize(
    "override, key",
    [("model.d_modle=64", "model.d_modle"), ("model.n_heads=four", "model.n_heads"), ("model.dropout=1.5", "model.dropout")],
    ids=["unknown-key", "wrong-type", "out-of-range"],
)
def test_cli_bad_override_value_exits_2_naming_the_key(override, key):
    assert_usage_error(cli("train", TINY_RECIPE, "--set", override, "--quiet"), "train", key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_device_without_a_gpu_exits_2_naming_the_key(tmp_path):
    line = assert_usage_error(cli("train", TINY_RECIPE, "--set", "train.device=cuda", "--set", f"out_dir={tmp_path / 'run'}", "--quiet"),
                              "train", "train.device")
    assert "no CUDA device" in line


def test_cli_tokenizer_settings_sentencepiece_refuses_exit_2_naming_them_and_leave_nothing(tmp_path):
    data = write_toy_corpus(tmp_path / "data", sizes=(("train", 50), ("validation", 5), ("test", 5)))
    result = cli("train", TINY_RECIPE, "--set", f"data.path={data}", "--set", f"out_dir={tmp_path / 'run'}",
                 "--set", "tokenizer.vocab_size=8", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("translator train: error: tokenizer: SentencePiece") and "vocab_size" in last, last
    assert not (tmp_path / "run").exists()


def test_cli_override_without_equals_exits_2_naming_it():
    line = assert_usage_error(cli("train", TINY_RECIPE, "--set", "model.d_model", "--quiet"), "train", "model.d_model")
    assert "KEY=VALUE" in line


def test_cli_missing_recipe_file_exits_2_naming_the_file(tmp_path):
    missing = tmp_path / "no_such_recipe.yaml"
    assert_usage_error(cli("train", missing, "--quiet"), "train", str(missing))


def test_cli_invalid_yaml_recipe_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [1, 2\n", encoding="utf-8")
    assert_usage_error(cli("train", path, "--quiet"), "train", str(path))


@pytest.mark.parametrize("verb", ["translate", "evaluate", "plot"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_beam_size_is_checked_as_the_flag_it_is(tiny_model_dir, verb, value):
    # Not as the recipe key decode.beam_size, and before --n-best is compared with it.
    result = cli(verb, tiny_model_dir, "--beam-size", value, *(["--n-best", "3"] if verb == "translate" else []))
    assert result.returncode == 2 and f"argument --beam-size: expected a positive integer, got '{value}'" in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["before the verb", "after the verb"])
def test_cli_debug_flag_shows_the_traceback(where):
    args = ["train", TINY_RECIPE, "--set", "model.d_modle=64", "--quiet"]
    result = cli(*(["--debug", *args] if where == "before the verb" else [*args, "--debug"]))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "RecipeError" in result.stderr and "model.d_modle" in result.stderr


def test_cli_debug_environment_variable_shows_the_traceback():
    result = cli("train", TINY_RECIPE, "--set", "model.d_modle=64", "--quiet", env={"TRANSLATOR_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "RecipeError" in result.stderr and "model.d_modle" in result.stderr


# --- command line: help, version, stdout ------------------------------------------------------


@pytest.mark.parametrize("verb", [None, "train", "translate", "evaluate"])
def test_cli_help_exits_0_with_an_example(verb):
    result = cli(*([verb] if verb else []), "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^examples?:", result.stdout, re.MULTILINE), result.stdout
    assert "usage: translator" in result.stdout
    assert result.stderr == ""


def test_cli_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"translator {translator.__version__}"


def test_cli_translate_writes_results_alone_on_stdout_and_progress_on_stderr(tiny_model_dir, tiny_translator):
    lines = [*TOY_SENTENCES[:2], "", "   ", *TOY_SENTENCES[2:]]
    result = cli("translate", tiny_model_dir, stdin="\n".join(lines) + "\n")  # no --quiet: a progress bar
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    assert result.stdout.split("\n")[:-1] == tiny_translator.translate(lines)
    assert "translating" in result.stderr and "translating" not in result.stdout


def test_cli_translate_last_line_without_newline(tiny_model_dir, tiny_translator):
    result = cli("translate", tiny_model_dir, "--quiet", stdin="\n".join(TOY_SENTENCES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == tiny_translator.translate(TOY_SENTENCES)
    assert result.stderr == ""


def test_cli_translate_one_output_line_per_newline_even_with_a_stray_carriage_return(tiny_model_dir):
    # Windows line ends (\r\n) are one line end; a lone \r inside a line is not, as for `wc -l`, paste and sacrebleu.
    stdin = "Ein mann\rsieht der hut.\nDer alte hund.\r\nEin kind.\n"
    result = cli("translate", tiny_model_dir, "--quiet", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("\n")[:-1]) == 3


# --- command line: model directories, splits, columns ------------------------------------------


@pytest.mark.parametrize("verb", ["translate", "evaluate"])
def test_cli_missing_model_directory_exits_2_naming_the_path(tmp_path, verb):
    missing = tmp_path / "no_such_model"
    assert_usage_error(cli(verb, missing, "--quiet", stdin="Ein hund.\n"), verb, str(missing))


def test_cli_evaluate_data_path_without_the_split_names_it_and_the_splits_there(tiny_model_dir, tmp_path):
    data = write_toy_corpus(tmp_path / "data", sizes=(("train", 5), ("validation", 5)))
    line = assert_usage_error(cli("evaluate", tiny_model_dir, "--set", f"data.path={data}", "--quiet"), "evaluate", "'test'", str(data))
    assert "splits there: train, validation" in line


def test_cli_evaluate_unknown_split_names_it_and_the_splits_there(tiny_model_dir):
    line = assert_usage_error(cli("evaluate", tiny_model_dir, "--split", "nope", "--quiet"), "evaluate", "'nope'")
    assert "splits there: test, train, validation" in line


def test_cli_evaluate_missing_language_column_names_the_columns_found(tiny_model_dir, tmp_path):
    data = toy_data(tmp_path, test_jsonl=b'{"de": "Ein hund.", "fr": "Un chien."}\n')
    line = assert_usage_error(cli("evaluate", tiny_model_dir, "--set", f"data.path={data}", "--quiet"), "evaluate", "'en'")
    assert "columns: de, fr" in line


def test_cli_evaluate_bad_override_exits_2_naming_the_key(tiny_model_dir):
    assert_usage_error(cli("evaluate", tiny_model_dir, "--set", "decode.beam_sise=2", "--quiet"), "evaluate", "decode.beam_sise", "decode.beam_size")


def test_cli_evaluate_missing_data_path_exits_2_naming_it(tiny_model_dir, tmp_path):
    missing = tmp_path / "no_such_data"
    assert_usage_error(cli("evaluate", tiny_model_dir, "--set", f"data.path={missing}", "--quiet"), "evaluate", str(missing))


def test_cli_translate_no_truncate_on_an_overlong_line_fails_naming_its_line(tiny_model_dir):
    stdin = "Ein kind sieht der hut.\n" * 3 + ("Ein mann sieht der hut. " * 200 + "\n") * 2
    # Chunks of 3 lines: the lines are counted in the input, not in the chunk handed to translate().
    result = cli("translate", tiny_model_dir, "--no-truncate", "--chunk-lines", "3", "--quiet", stdin=stdin)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(r"translator translate: error: stdin, line 4 and 1 more \(5\): longer than model\.max_positions=256 tokens "
                        r"\(\d+ with its end-of-sentence token\); without --no-truncate it is cut to fit", result.stderr.strip()), result.stderr
    assert len(result.stdout.splitlines()) == 3  # stdout streams: the first chunk's lines went out before the second failed


def test_cli_translate_overlong_line_is_truncated_by_default_with_one_line_naming_it(tiny_model_dir, tmp_path):
    source = tmp_path / "in.de"
    source.write_text("Ein kind sieht der hut.\n" * 2 + "Ein mann sieht der hut. " * 200 + "\n", encoding="utf-8")
    result = cli("translate", tiny_model_dir, "-i", source, "--chunk-lines", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("\n")[:-1]) == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"translator translate: warning: {source}, line 3: longer than model.max_positions=256")
    assert lines[0].endswith(": truncated"), lines[0]


# --- datasets ----------------------------------------------------------------------------------


def test_relative_data_path_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data\.path.*\./nope"):
        load_split(DataConfig(path="./nope"), "train")


def test_absolute_data_path_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_split(DataConfig(path=str(missing)), "train")


def test_neither_layout_recognised_names_the_columns(tmp_path):
    rows = [{"source": "Ein Hund.", "target": "A dog."}, {"source": "Eine Katze.", "target": "A cat."}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_split(DataConfig(path=str(tmp_path)), "train")
    message = str(info.value)
    assert "'de'" in message and "'en'" in message and "columns: source, target" in message
    assert "translation" in message  # says which layouts it understands


INVALID_UTF8_LINES = {
    # line 3 holds the byte 0xff (for CSV, line 1 is the header)
    "jsonl": [
        b'{"de": "Ein Hund.", "en": "A dog."}',
        b'{"de": "Eine Katze.", "en": "A cat."}',
        b'{"de": "Ein \xff Hut.", "en": "A hat."}',
        b'{"de": "Ein Ball.", "en": "A ball."}',
    ],
    "csv": [b"de,en", b"Ein Hund.,A dog.", b"Ein \xff Hut.,A hat.", b"Ein Ball.,A ball."],
}


@pytest.mark.parametrize(
    "fmt",
    [
        "jsonl",
        "csv",
    ],
)
def test_invalid_utf8_names_the_file_and_line(tmp_path, fmt):
    path = tmp_path / f"train.{fmt}"
    path.write_bytes(b"\n".join(INVALID_UTF8_LINES[fmt]) + b"\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 3: not valid UTF-8"):
        pairs = load_split(DataConfig(path=str(tmp_path)), "train")
        pairs["src"][:]  # what the trainer does next: here a jsonl file fails with a bare UnicodeDecodeError


def test_unreachable_hub_dataset_says_to_use_a_local_folder(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_split(DataConfig(path="x/y"), "train")
    message = str(info.value)
    assert "'x/y'" in message and "data.path" in message and "local folder" in message


@pytest.fixture(scope="module")
def toy_tokenizer() -> Tokenizer:
    rng = random.Random(0)
    return Tokenizer.train([text for _ in range(300) for text in toy_pair(rng).values()], vocab_size=60)


def test_filter_counts_each_rule(tmp_path, toy_tokenizer):
    rng = random.Random(1)
    normal = [toy_pair(rng) for _ in range(20)]
    bad = [
        {"de": "", "en": "A dog."},  # empty
        {"de": "Ein hund.", "en": "   \t "},  # whitespace only: counts as empty
        {"de": "Ein mann sieht der hut. " * 20, "en": "A man sees the hat. " * 20},  # past max_len
        {"de": "Ein alte mann sieht der rote hut und ein kleine kind trägt der ball.", "en": "A."},  # extreme ratio
    ]
    rows = normal[:7] + bad[:2] + normal[7:13] + bad[2:] + normal[13:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    max_len, max_ratio = 64, 9.0
    # The premises: the long pair is past max_len, the ratio pair within it but past max_ratio.
    long_src, long_tgt = toy_tokenizer.encode([bad[2]["de"], bad[2]["en"]])
    assert max(len(long_src), len(long_tgt)) > max_len
    ratio_src, ratio_tgt = toy_tokenizer.encode([bad[3]["de"], bad[3]["en"]])
    assert len(ratio_src) <= max_len and len(ratio_src) > max_ratio * len(ratio_tgt) > 0

    tokenized = tokenize(load_split(DataConfig(path=str(tmp_path)), "train"), toy_tokenizer)
    kept, report = filter_pairs(tokenized, max_len, max_ratio)
    assert report == FilterReport(kept=20, empty=2, too_long=1, bad_ratio=1)
    assert kept["src"] == [r["de"] for r in normal]
    assert "dropped 2 with an empty or blank side" in str(report)


@pytest.mark.parametrize("blank", ["", " ", "   \t ", "\t\t", " \n ", "\u3000", "\u00a0"], ids=repr)
def test_whitespace_only_side_counts_as_empty(tmp_path, toy_tokenizer, blank):
    rows = [{"de": "Ein hund.", "en": "A dog."}, {"de": blank, "en": "A dog."}, {"de": "Ein hund.", "en": blank}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokenized = tokenize(load_split(DataConfig(path=str(tmp_path)), "train"), toy_tokenizer)
    _, report = filter_pairs(tokenized, max_len=64, max_ratio=9.0)
    assert report == FilterReport(kept=1, empty=2, too_long=0, bad_ratio=0)


# --- sentences ---------------------------------------------------------------------------------

LONG = "Ein mann sieht der hut. " * 300  # ~7200 characters, far past max_positions=256 tokens

UNUSUAL = {
    "control": "Ein\x00 mann\x07 sieht\x1b der\x7f hut.\x0c",
    "zero-width": "Ein\u200b mann\u200d sieht der\u200b hut.",
    "zero-width-only": "\u200b\u200d",
    "bidi": "\u202eEin mann sieht\u200f der hut.\u202c",
    "emoji": "Ein 🐶 sieht 👨\u200d👩\u200d👧 der 🚲.",
    "cyrillic": "Ein мужчина sieht der шляпа.",
    "cjk": "一个男人 sieht der 帽子.",
    "arabic": "رجل fährt ein fahrrad.",
    "newlines": "Ein mann\nsieht\r\nder hut.\u2028",
    "combining": "Ein ma\u0301nn\u0308 sieht der hu\u0303t.",
    "long": LONG,
}


def translate_quietly(t: translator.Translator, sentences, **kwargs):
    """Translate, allowing only the truncation warning (and requiring it for LONG)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = t.translate(sentences, **kwargs)
    messages = [str(w.message) for w in caught]
    assert all("max_positions" in m and "truncated" in m for m in messages), messages
    return result, messages


@pytest.mark.parametrize("blank", ["", "   \t ", "\n", " \r\n ", "\u200b", "\ufeff", " \u200b\ufeff "], ids=repr)
def test_blank_input_translates_to_empty(tiny_translator, blank):
    assert tiny_translator.tokenizer.encode([blank]) == [[]]  # no pieces: zero-width characters are dropped like spaces
    assert tiny_translator.translate(blank) == ""
    assert tiny_translator.translate([blank, blank]) == ["", ""]


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_input_translates_without_raising(tiny_translator, name):
    text = UNUSUAL[name]
    single, warned = translate_quietly(tiny_translator, text)
    assert isinstance(single, str)
    assert bool(warned) == (name == "long")
    batch, _ = translate_quietly(tiny_translator, [text])
    assert batch == [single]


def test_overlong_input_warns_about_truncation(tiny_translator):
    with pytest.warns(UserWarning, match=r"1 sentence\(s\) longer than model\.max_positions=256.*truncated"):
        tiny_translator.translate(LONG, beam_size=1)


def test_overlong_input_without_truncation_raises_naming_the_limit_and_the_sentences(tiny_translator):
    with pytest.raises(translator.SourceTooLong, match=r"model\.max_positions=256 tokens \(first: index 1,") as refused:
        tiny_translator.translate(["Ein hund.", LONG, "Ein kind.", LONG], truncate=False)
    assert refused.value.indices == [1, 3] and refused.value.limit == 256
    assert refused.value.lengths == [len(tiny_translator.tokenizer.encode([LONG])[0]) + 1] * 2  # as the model counts: with eos


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_input_does_not_change_the_other_sentences_in_its_batch(tiny_translator, name):
    alone = tiny_translator.translate(TOY_SENTENCES, beam_size=1)
    mixed, _ = translate_quietly(tiny_translator, TOY_SENTENCES[:2] + [UNUSUAL[name]] + TOY_SENTENCES[2:], beam_size=1)
    assert len(mixed) == len(TOY_SENTENCES) + 1
    assert mixed[:2] + mixed[3:] == alone


@pytest.mark.parametrize(
    "value, type_name",
    [
        (None, "NoneType"),
        (3, "int"),
        pytest.param(b"bytes", "bytes"),
    ],
    ids=["None", "int", "bytes"],
)
def test_non_str_argument_raises_type_error_naming_its_type(tiny_translator, value, type_name):
    with pytest.raises(TypeError) as info:
        tiny_translator.translate(value)
    assert re.search(rf"\b{type_name}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        3,
        pytest.param(b"bytes"),
    ],
    ids=["None", "int", "bytes"],
)
def test_non_str_argument_message_says_what_translate_takes(tiny_translator, value):
    with pytest.raises(TypeError) as info:
        tiny_translator.translate(value)
    message = str(info.value)
    assert "translate() takes a str or a list of str" in message and type(value).__name__ in message, message


@pytest.mark.parametrize("value, type_name", [(None, "NoneType"), (3, "int"), (b"bytes", "bytes")], ids=["None", "int", "bytes"])
def test_non_str_list_item_raises_type_error_naming_its_type_and_index(tiny_translator, value, type_name):
    with pytest.raises(TypeError, match=rf"item 1 is {type_name}\b"):
        tiny_translator.translate(["Ein hund.", value, "Ein kind."])


# --- model directories -------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    edit(config)
    (directory / CONFIG).write_text(json.dumps(config), encoding="utf-8")


def test_weights_that_do_not_match_d_ff_name_the_weights_file(model_copy):
    edit_config(model_copy, lambda c: c["recipe"]["model"].update(d_ff=c["recipe"]["model"]["d_ff"] * 2))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(model_copy / WEIGHTS))}: weights do not match config\.json"):
        translator.Translator.from_pretrained(model_copy)


def test_weights_with_fewer_layers_than_the_config_name_the_weights_file(model_copy):
    edit_config(model_copy, lambda c: c["recipe"]["model"].update(encoder_layers=2))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: weights do not match"):
        translator.Translator.from_pretrained(model_copy)


def test_newer_format_version_says_newer(model_copy):
    edit_config(model_copy, lambda c: c.update(format_version=2))
    with pytest.raises(CheckpointError, match=rf"{CONFIG}: format_version 2 was written by a newer translator.*upgrade"):
        translator.Translator.from_pretrained(model_copy)


def test_cli_newer_format_version_exits_2(model_copy):
    edit_config(model_copy, lambda c: c.update(format_version=2))
    assert_usage_error(cli("translate", model_copy, "--quiet", stdin="Ein hund.\n"), "translate", str(model_copy / CONFIG), "newer")


# --- the battery: bad input through the real command line, one line, the right status, nothing changed ---


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: (size, modification time), to show a failed command changed nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def toy_data(folder: Path, **files: bytes) -> Path:
    """A copy of a small toy corpus in `folder`/data, with files replaced (`validation_jsonl=b"..."`)."""
    data = write_toy_corpus(folder / "data", sizes=(("train", 200), ("validation", 10), ("test", 10)))
    for name, content in files.items():
        stem, ext = name.rsplit("_", 1)
        for old in data.glob(f"{stem}.*"):
            old.unlink()
        (data / f"{stem}.{ext}").write_bytes(content)
    return data


def model_copy_with(tiny_model_dir: Path, folder: Path, edit) -> Path:
    model = Path(shutil.copytree(tiny_model_dir, folder / "model", ignore=shutil.ignore_patterns("tensorboard")))
    edit(model)
    return model


def with_model_config(**changes):
    return lambda model: edit_config(model, lambda c: c["recipe"]["model"].update(changes))


TRAIN = ["train", TINY_RECIPE, "--quiet", "--set", "train.max_steps=2"]
TOY_LINES = b"".join(json.dumps(toy_pair(random.Random(i)), ensure_ascii=False).encode() + b"\n" for i in range(3))


def train_on(tmp: Path, *overrides: str, **files: bytes) -> list:
    return [*TRAIN, "--set", f"data.path={toy_data(tmp, **files)}", "--set", f"out_dir={tmp}/run", *overrides]


def evaluate_on(tmp: Path, model: Path, **files: bytes) -> list:
    return ["evaluate", model, "--quiet", "--set", f"data.path={toy_data(tmp, **files)}"]


# (id, arguments given the case's folder and the tiny model, fragments the one line must hold ({tmp}: the case's folder))
BATTERY = [
    ("recipe-empty", lambda tmp, m: ["train", write_bytes(tmp / "r.yaml", b"# nothing yet\n"), "--quiet"], ["{tmp}/r.yaml", "the recipe is empty"]),
    ("recipe-latin-1", lambda tmp, m: ["train", write_bytes(tmp / "r.yaml", b"name: tiny\nout_dir: caf\xe9\n"), "--quiet"],
     ["{tmp}/r.yaml, line 2: not valid UTF-8"]),
    ("recipe-inf", lambda tmp, m: [*TRAIN, "--set", f"out_dir={tmp}/run", "--set", "train.clip_norm=.inf"], ["train.clip_norm", "finite"]),
    ("recipe-nan-in-file", lambda tmp, m: ["train", write_recipe(tmp, train__lr=float("nan"), out_dir=str(tmp / "run")), "--quiet"],
     ["train.lr: got nan", "finite"]),
    ("recipe-empty-out-dir", lambda tmp, m: [*TRAIN, "--set", "out_dir="], ["out_dir", "non-empty"]),
    ("recipe-empty-data-path", lambda tmp, m: [*TRAIN, "--set", "data.path=''", "--set", f"out_dir={tmp}/run"], ["data.path", "non-empty"]),
    ("data-train-empty", lambda tmp, m: train_on(tmp, train_jsonl=b""), ["{tmp}/data/train.jsonl: the file is empty"]),
    ("data-validation-malformed-line", lambda tmp, m: train_on(tmp, validation_jsonl=TOY_LINES + b'{"de": "Ein hund.", "en": \n'),
     ["{tmp}/data/validation.jsonl, line 4: not valid JSON"]),
    ("data-validation-nothing-for-the-loss", lambda tmp, m: train_on(tmp, validation_jsonl=b'{"de": "Ein hund.", "en": ""}\n' * 2),
     ["{tmp}/data/validation.jsonl: no pair to compute the validation loss on, of 2 (0 longer than model.max_positions, 2 with an empty side)"]),
    ("data-train-number-cell", lambda tmp, m: train_on(tmp, train_jsonl=TOY_LINES + b'{"de": 3, "en": "Three."}\n'),
     ["{tmp}/data/train.jsonl, line 4: 'de' is int 3, expected text"]),
    ("data-train-not-an-object", lambda tmp, m: train_on(tmp, train_jsonl=TOY_LINES + b'["Ein hund.", "A dog."]\n'),
     ["{tmp}/data/train.jsonl, line 4: expected a JSON object"]),
    ("data-validation-column-missing", lambda tmp, m: train_on(tmp, validation_jsonl=b'{"de": "Ein hund.", "fr": "Un chien."}\n'),
     ["{tmp}/data/validation.jsonl: language column(s) 'en' not found"]),
    ("data-test-split-missing", lambda tmp, m: train_on(tmp, "--set", "data.test_split=dev"),
     ["split 'dev' not found", "splits there: test, train, validation"]),  # found before training, not after it
    ("data-test-malformed-line", lambda tmp, m: train_on(tmp, test_jsonl=TOY_LINES + b'{"de": "Ein hund.", "en": \n'),
     ["{tmp}/data/test.jsonl, line 4: not valid JSON"]),
    ("data-nothing-left-after-filtering", lambda tmp, m: train_on(tmp, "--set", "data.max_len=1"),
     ["{tmp}/data/train.jsonl: no pair left to train on", "longer than data.max_len"]),
    ("data-stream-nothing-left-after-filtering", lambda tmp, m: train_on(tmp, "--set", "data.max_len=1", "--set", "data.streaming=true"),
     ["{tmp}/data/train.jsonl: the training stream holds no pair that passes the filters"]),  # found before the run folder is written
    ("data-stream-number-cell", lambda tmp, m: train_on(tmp, "--set", "data.streaming=true",
                                                       train_jsonl=TOY_LINES + b'{"de": "Drei.", "en": 3}\n'),
     ["{tmp}/data/train.jsonl, line 4: 'en' is int 3, expected text"]),
    ("data-stream-validation-number-cell", lambda tmp, m: train_on(tmp, "--set", "data.streaming=true",
                                                                  validation_jsonl=TOY_LINES + b'{"de": 0, "en": "Zero."}\n'),
     ["{tmp}/data/validation.jsonl, line 4: 'de' is int 0, expected text"]),
    ("data-csv-header-only", lambda tmp, m: evaluate_on(tmp, m, train_csv=b"de,en\n", validation_csv=b"de,en\n", test_csv=b"de,en\n"),
     ["{tmp}/data/test.csv: a header and no pairs"]),
    ("data-test-list-cell", lambda tmp, m: evaluate_on(tmp, m, test_jsonl=TOY_LINES + b'{"de": ["Ein"], "en": "A."}\n'),
     ["{tmp}/data/test.jsonl, line 4: 'de' is list"]),
    ("model-weights-of-another-shape", lambda tmp, m: ["translate", model_copy_with(m, tmp, with_model_config(d_ff=128)), "--quiet"],
     ["{tmp}/model/model.safetensors: weights do not match config.json", "encoder.0.ffn.0.weight", "(64, 32)", "(128, 32)"]),
    ("model-weights-missing-layers", lambda tmp, m: ["evaluate", model_copy_with(m, tmp, with_model_config(decoder_layers=2)), "--quiet"],
     ["{tmp}/model/model.safetensors: weights do not match config.json", "missing (first: decoder.1."]),
    ("model-directory-is-a-file", lambda tmp, m: ["translate", write_bytes(tmp / "model.txt", b"x"), "--quiet"],
     ["model directory not found: {tmp}/model.txt (that is a file)"]),
    ("recipe-is-a-directory", lambda tmp, m: ["train", tmp, "--quiet"], ["recipe file not found: {tmp} (that is a directory)"]),
    ("beam-wider-than-the-vocabulary", lambda tmp, m: ["evaluate", m, "--quiet", "--beam-size", "1000"],
     ["evaluate: error: --beam-size: got 1000, expected at most", "half of this model's"]),  # named by the flag given
    ("length-penalty-out-of-range", lambda tmp, m: ["translate", m, "--quiet", "--alpha", "20"], ["translate: error: --alpha: got 20.0"]),
    ("train-beam-wider-than-the-vocabulary", lambda tmp, m: train_on(tmp, "--set", "decode.beam_size=1000"),  # before training, not after
     ["decode.beam_size: got 1000, expected at most", "half of this model's"]),
    ("average-missing-sentencepiece", lambda tmp, m: [
        "average", model_copy_with(m, tmp, lambda d: (d / SPM).unlink()), m, "-o", tmp / "averaged"], ["{tmp}/model/sentencepiece.model"]),
    ("average-into-a-model", lambda tmp, m: ["average", m, m, "-o", model_copy_with(m, tmp, lambda d: None)], ["{tmp}/model already holds a model"]),
    ("average-across-vocabularies", lambda tmp, m: ["average", m, model_copy_with(m, tmp, with_another_sentencepiece), "-o", tmp / "out"],
     ["{tmp}/model: its run's SentencePiece model differs from", "only one run's checkpoints"]),
    ("average-across-runs", lambda tmp, m: ["average", m, model_copy_with(m, tmp, lambda d: edit_config(d, lambda c: c["recipe"].update(seed=99))),
                                            "-o", tmp / "out"], ["{tmp}/model: its run started from seed 99's initial weights", "only one run's"]),
    ("average-across-language-pairs", lambda tmp, m: [  # the same seed and joint vocabulary: only the direction differs
        "average", m, model_copy_with(m, tmp, lambda d: edit_config(d, lambda c: c["recipe"]["data"].update(src_lang="en", tgt_lang="de"))),
        "-o", tmp / "out"], ["{tmp}/model: its run translates en to de,", "'s de to en", "only one run's"]),
    ("average-into-a-file", lambda tmp, m: ["average", m, "-o", write_bytes(tmp / "notes.txt", b"x")], ["{tmp}/notes.txt is a file"]),
    ("average-under-a-file", lambda tmp, m: ["average", m, "-o", write_bytes(tmp / "notes.txt", b"x") / "out"],
     ["{tmp}/notes.txt/out: {tmp}/notes.txt is a file"]),
    ("train-out-dir-is-a-file", lambda tmp, m: train_on(tmp, "--set", f"out_dir={write_bytes(tmp / 'notes.txt', b'x')}"),
     ["out_dir: {tmp}/notes.txt is a file"]),
    ("average-not-a-checkpoint", lambda tmp, m: ["average", write_bytes(tmp / "step_1" / "x", b"").parent, "-o", tmp / "out"],
     ["{tmp}/step_1: neither a model directory nor a training checkpoint"]),
    ("plot-no-metrics", lambda tmp, m: ["plot", tmp / "run"], ["{tmp}/run/metrics.jsonl: no metrics to plot"]),
    ("plot-metrics-empty", lambda tmp, m: ["plot", write_bytes(tmp / "metrics.jsonl", b"").parent], ["{tmp}/metrics.jsonl: no training or validation"]),
    ("plot-metrics-malformed-line", lambda tmp, m: ["plot", write_bytes(tmp / "metrics.jsonl", b'{"step": 0}\n{"step": 1, "lo\n').parent],
     ["{tmp}/metrics.jsonl, line 2: not valid JSON"]),
]


def with_another_sentencepiece(model: Path) -> None:
    """The same vocabulary size (so the same weight shapes), learnt from other text: other ids."""
    size = Tokenizer.load(model / SPM).vocab_size
    Tokenizer.train((f"zebra {i} quokka {i * 7} {chr(0x41 + i % 26) * 3}" for i in range(500)), size).save(model / SPM)
    assert Tokenizer.load(model / SPM).vocab_size == size


def write_bytes(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("arguments, fragments", [case[1:] for case in BATTERY], ids=[case[0] for case in BATTERY])
def test_battery_bad_input_is_one_line_exit_2_and_changes_nothing(tiny_model_dir, tmp_path, arguments, fragments):
    folder = tmp_path / "case"
    folder.mkdir()
    args = arguments(folder, tiny_model_dir)
    before, model_before = snapshot(tmp_path), snapshot(tiny_model_dir)
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == "", (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    # one line says what is wrong; train may have logged what it loaded before it
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"translator {args[0]}: ")]
    assert len(errors) == 1 and result.stderr.endswith(errors[0] + "\n"), result.stderr
    assert all(f.replace("{tmp}", str(folder)) in errors[0] for f in fragments), (fragments, errors[0])
    assert snapshot(tmp_path) == before and snapshot(tiny_model_dir) == model_before  # no run folder, no half-written output


def test_quiet_shows_no_progress_bars_from_datasets(tiny_model_dir, tmp_path):
    data = toy_data(tmp_path)  # a folder datasets has not seen: "Generating test split" would show
    result = cli("evaluate", tiny_model_dir, "--quiet", "--beam-size", "1", "--set", f"data.path={data}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    noisy = cli("evaluate", tiny_model_dir, "--beam-size", "1", "--set", f"data.path={toy_data(tmp_path / 'again')}")
    assert "split" in noisy.stderr  # the premise: without --quiet, datasets does show its bars


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_ends_a_command_with_128_plus_its_number(tiny_model_dir, signum, status, word):
    environment = {k: v for k, v in os.environ.items() if k != "TRANSLATOR_DEBUG"}
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored: give the command the default.
    process = subprocess.Popen([sys.executable, "-m", "translator", "translate", str(tiny_model_dir), "--quiet", "--chunk-lines", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    process.stdin.write("Ein hund.\n")
    process.stdin.flush()
    assert process.stdout.readline()  # translated: the model is loaded and the command waits for more input
    process.send_signal(signum)
    process.wait(timeout=60)  # stdin stays open until then: closing it first races the signal with an end of input (exit 0)
    stderr = process.stderr.read()
    process.stdin.close()
    assert process.returncode == status, stderr
    assert stderr.strip().splitlines() == [f"translator translate: {word}"]


# --- properties --------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)))  # a str with lone surrogates cannot be encoded


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
@example(text="Ein 0 hund")  # '0' is not in the toy vocabulary: decode gives "Ein ⁇ hund", with spaces around the unk surface
def test_tokenizer_round_trip_is_idempotent(tiny_translator, text):
    tokenizer = tiny_translator.tokenizer
    (ids,) = tokenizer.encode([text])
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    (once,) = tokenizer.decode([ids])
    (twice,) = tokenizer.decode(tokenizer.encode([once]))
    assert twice == once


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_translate_arbitrary_text_is_one_output_per_input_in_order(tiny_translator, texts):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*max_positions.*truncated")
        outputs = tiny_translator.translate(texts)
        assert isinstance(outputs, list) and len(outputs) == len(texts)
        assert all(isinstance(o, str) for o in outputs)
        assert outputs == [tiny_translator.translate(text) for text in texts]
