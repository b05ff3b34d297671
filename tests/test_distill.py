"""Sequence-level knowledge distillation: the teacher's translations of the training sources, beside the original pairs."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from translator.data import DataError, load_split, texts
from translator.distill import distill


def read_split(recipe_data, folder, split):
    pairs = load_split(replace(recipe_data, path=str(folder)), split)
    return texts(pairs["src"]), texts(pairs["tgt"])


def test_the_folder_holds_the_original_pairs_then_the_teachers_and_trains_as_data_path(tiny_translator, toy_corpus, tmp_path):
    data = replace(tiny_translator.recipe.data, path=str(toy_corpus))
    out = tmp_path / "distilled"
    assert distill(tiny_translator, out, data) == 1200
    sources, references = read_split(data, toy_corpus, "train")
    src, tgt = read_split(data, out, "train")  # read back the way training reads data.path
    assert src == sources + sources
    assert tgt[:1200] == references
    assert tgt[1200:] == tiny_translator.translate(sources)  # the teacher's own decoding settings (its recipe's beam)
    assert tgt[1200:] != references  # a 150-update model is not perfect: the test would not see a copy
    for split in ("validation", "test"):  # the student is scored against the references, never the teacher
        assert read_split(data, out, split) == read_split(data, toy_corpus, split)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{lang}" for s in ("train", "validation", "test") for lang in ("de", "en"))


def test_a_sentence_with_a_line_break_is_named_and_nothing_is_written(tiny_translator, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"de": "Ein hund.", "en": "A dog."}, {"de": "Ein\nmann.", "en": "A man."}]
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "made" / "distilled"
    with pytest.raises(DataError, match=r"split 'train', pair 2: the source sentence holds a line break"):
        distill(tiny_translator, out, replace(tiny_translator.recipe.data, path=str(corpus)))
    assert not (tmp_path / "made").exists()


def test_a_folder_that_cannot_be_made_fails_before_the_teacher_translates(tiny_translator, toy_corpus, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("kept\n")
    translated = []
    monkeypatch.setattr(tiny_translator, "translate", lambda sources, **options: translated.append(sources) or list(sources))
    with pytest.raises(FileExistsError, match="a_file"):  # its parent is a file: hours of translating would be lost at the end
        distill(tiny_translator, tmp_path / "a_file" / "distilled", replace(tiny_translator.recipe.data, path=str(toy_corpus)))
    assert translated == [] and (tmp_path / "a_file").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_the_command_refuses_an_existing_folder_before_translating(tiny_model_dir, toy_corpus, tmp_path):
    out = tmp_path / "distilled"
    out.mkdir()
    (out / "train.de").write_text("kept\n")
    result = subprocess.run([sys.executable, "-m", "translator", "distill", str(tiny_model_dir), str(out), "--set", f"data.path={toy_corpus}"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert [p.name for p in out.iterdir()] == ["train.de"] and (out / "train.de").read_text() == "kept\n"


def test_the_command_writes_the_folder_with_an_ensemble_as_the_teacher(tiny_model_dir, tiny_translator, toy_corpus, tmp_path):
    out = tmp_path / "new" / "distilled"
    result = subprocess.run([sys.executable, "-m", "translator", "distill", str(tiny_model_dir), str(tiny_model_dir), str(out),
                             "--set", f"data.path={toy_corpus}", "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"distilled 1200 training sentences into {out}" in result.stdout
    data = replace(tiny_translator.recipe.data, path=str(toy_corpus))
    src, tgt = read_split(data, out, "train")
    assert len(src) == len(tgt) == 2400 and src[:1200] == src[1200:] and tgt[:1200] == read_split(data, toy_corpus, "train")[1]


def test_the_teacher_reranked_by_a_reverse_model_writes_its_reranked_translations(tiny_model_dir, tiny_translator, reverse, toy_corpus, tmp_path):
    data = replace(tiny_translator.recipe.data, path=str(toy_corpus))
    sources = read_split(data, toy_corpus, "train")[0]
    out = tmp_path / "reranked"
    result = subprocess.run([sys.executable, "-m", "translator", "distill", str(tiny_model_dir), str(out), "--rerank-with",
                             str(reverse.recipe.out_dir), "--rerank-weight", "2", "--set", f"data.path={toy_corpus}", "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    expected = tiny_translator.translate(sources, rerank=reverse, rerank_weight=2.0)
    assert read_split(data, out, "train")[1][1200:] == expected
    assert expected != tiny_translator.translate(sources)  # the reranking changed what the student learns from
