"""Scoring is sacreBLEU's, with its signatures; evaluate() translates a split with the recipe's settings."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import sacrebleu

from conftest import TINY_RECIPE
from translator import Translator, train
from translator.config import DataConfig, RecipeError, load_recipe
from translator.evaluate import evaluate, score

HYPS = [
    "A man in an orange hat starring at something.",
    "A Boston Terrier is running on lush green grass in front of a white fence.",
    "A girl in karate uniform breaking a stick with a front kick.",
    "Five people wearing winter jackets and helmets stand in the snow, with snowmobiles in the background.",
    "People are fixing the roof of a house.",
    "a man in light colored clothing photographs a group of men.",
]
REFS = [
    "A man with an orange hat staring at something.",
    "A Boston Terrier is running on lush green grass in front of a white fence.",
    "A girl in a karate uniform breaking a board with a kick.",
    "Five people in winter jackets and helmets stand in the snow with snowmobiles behind them.",
    "Several men fix the roof of a house.",
    "A man in light-colored clothes photographs a group of men wearing dark suits.",
]


def write_test_split(folder, sources, references):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"de": s, "en": r}, ensure_ascii=False) + "\n" for s, r in zip(sources, references)]
    (folder / "test.jsonl").write_text("".join(lines), encoding="utf-8")
    return DataConfig(path=str(folder), src_lang="de", tgt_lang="en")


def test_evaluate_scores_its_detokenized_output_against_the_references_as_written(tiny_translator, toy_corpus, tmp_path):
    sources = [r["de"] for r in read_split(toy_corpus, "test")]
    output = tiny_translator.translate(sources, beam_size=1)
    # References that are the model's own output: a pipeline that scores what it writes against the file gets 100.
    own = evaluate(tiny_translator, "test", data=write_test_split(tmp_path / "own", sources, output), beam_size=1)
    assert (own.bleu, own.chrf) == (pytest.approx(100.0), pytest.approx(100.0))
    # the premise: scoring SentencePiece pieces instead of detokenized text would not
    pieces = [" ".join(tiny_translator.tokenizer.pieces(text)) for text in output]
    assert sacrebleu.corpus_bleu(pieces, [output]).score < 90 and sacrebleu.corpus_chrf(pieces, [output]).score < 90
    # References in another case and with other spacing: scored as written (cased BLEU, 13a), as sacreBLEU scores them.
    shouted = [text.upper().replace(".", " .") for text in output]
    scores = evaluate(tiny_translator, "test", data=write_test_split(tmp_path / "shouted", sources, shouted), beam_size=1)
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(output, [shouted]).score, abs=1e-9)
    assert scores.chrf == pytest.approx(sacrebleu.corpus_chrf(output, [shouted]).score, abs=1e-9)
    assert scores.bleu < 50  # case:mixed: the upper-cased references do not match


def test_signatures():
    scores = score(HYPS, REFS)
    assert "tok:13a" in scores.bleu_signature
    assert "case:mixed" in scores.bleu_signature
    assert "nrefs:1" in scores.bleu_signature
    assert "case:mixed" in scores.chrf_signature
    assert f"version:{sacrebleu.__version__}" in scores.bleu_signature
    assert scores.bleu_detail.startswith("BLEU = ")
    text = str(scores)
    assert scores.bleu_signature in text and scores.chrf_signature in text
    assert set(scores.to_dict()) == {"bleu", "chrf", "bleu_signature", "chrf_signature", "bleu_detail"}
    json.dumps(scores.to_dict())  # plain values, for metrics.jsonl


# Chinese is written without spaces: 13a would see each sentence as one or two "words".
ZH_REFS = ["一个男人在骑自行车。", "两只狗在雪地里玩耍。", "街道是湿的。"]
ZH_HYPS = ["一个男人骑自行车。", "两只狗在雪里玩。", "这条街道是湿的。"]


def test_bleu_tokenizer_follows_the_target_language():
    zh = score(ZH_HYPS, ZH_REFS, tgt_lang="zh")
    assert "tok:zh" in zh.bleu_signature
    assert zh.bleu == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score, abs=1e-9)
    assert zh.bleu != pytest.approx(score(ZH_HYPS, ZH_REFS, tgt_lang="en").bleu, abs=1)  # 13a scores Chinese near 0
    assert "tok:13a" in score(HYPS, REFS, tgt_lang="de").bleu_signature
    assert zh.chrf == score(ZH_HYPS, ZH_REFS).chrf  # chrF has no tokenizer


@pytest.mark.parametrize("code", ["zh-CN", "zh_Hans", "ZH", "zho", "cmn"])
def test_bleu_tokenizer_follows_the_language_of_a_code_with_a_region_or_script(code):
    assert score(ZH_HYPS, ZH_REFS, tgt_lang=code) == score(ZH_HYPS, ZH_REFS, tgt_lang="zh")
    assert "tok:13a" in score(HYPS, REFS, tgt_lang="de-AT").bleu_signature


def test_a_bleu_tokenizer_that_cannot_be_downloaded_is_a_recipe_error_naming_it(monkeypatch, tmp_path):
    import urllib.error

    from sacrebleu.tokenizers import tokenizer_spm

    def offline(url, path):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))  # nothing cached
    monkeypatch.setattr(tokenizer_spm, "download_file", offline)
    with pytest.raises(RecipeError, match=r"evaluate.tokenize='flores200' downloads .* Name or service not known"):
        score(ZH_HYPS, ZH_REFS, tokenize="flores200")


def test_bleu_tokenizer_override_wins_over_the_language():
    char = score(ZH_HYPS, ZH_REFS, tgt_lang="zh", tokenize="char")
    assert "tok:char" in char.bleu_signature
    assert char.bleu == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="char").score, abs=1e-9)


def test_bleu_tokenizer_that_needs_an_extra_says_which():
    try:
        import MeCab  # noqa: F401
        pytest.skip("sacreBLEU's Japanese tokenizer is installed")
    except ImportError:
        pass
    with pytest.raises(RecipeError, match=r"data.tgt_lang='ja'.*pip install sacrebleu\[ja\].*evaluate.tokenize"):
        score(ZH_HYPS, ZH_REFS, tgt_lang="ja")


def test_recipe_evaluate_tokenize_is_validated():
    assert load_recipe(TINY_RECIPE, ["evaluate.tokenize=zh"]).evaluate.tokenize == "zh"
    with pytest.raises(RecipeError, match=r"evaluate.tokenize: got 'mecab'"):
        load_recipe(TINY_RECIPE, ["evaluate.tokenize=mecab"])


def test_evaluate_scores_with_the_recipes_tokenizer(tiny_translator, toy_corpus):
    recipe = tiny_translator.recipe
    charred = Translator(tiny_translator.model, tiny_translator.tokenizer, replace(recipe, evaluate=replace(recipe.evaluate, tokenize="char")))
    scores = evaluate(charred, "validation", beam_size=1)
    greedy = tiny_translator.translate([r["de"] for r in read_split(toy_corpus, "validation")], beam_size=1)
    assert "tok:char" in scores.bleu_signature
    assert scores.bleu == score(greedy, [r["en"] for r in read_split(toy_corpus, "validation")], tokenize="char").bleu


def test_lowercased_scores_are_sacrebleus_and_say_so(tiny_translator, toy_corpus):
    shouted = [h.upper() for h in HYPS]
    lowered = score(shouted, REFS, lowercase=True)
    assert lowered.bleu == pytest.approx(sacrebleu.corpus_bleu(shouted, [REFS], lowercase=True).score, abs=1e-9)
    assert lowered.bleu == pytest.approx(score(HYPS, REFS, lowercase=True).bleu, abs=1e-9)
    assert lowered.bleu > score(shouted, REFS).bleu + 20  # cased, the shouted words match almost nothing
    assert lowered.chrf == pytest.approx(sacrebleu.metrics.CHRF(lowercase=True).corpus_score(shouted, [REFS]).score, abs=1e-9)
    assert "case:lc" in lowered.bleu_signature and "case:lc" in lowered.chrf_signature
    recipe = replace(tiny_translator.recipe, evaluate=replace(tiny_translator.recipe.evaluate, lowercase=True))
    scores = evaluate(Translator(tiny_translator.model, tiny_translator.tokenizer, recipe), "validation", beam_size=1)
    greedy = tiny_translator.translate([r["de"] for r in read_split(toy_corpus, "validation")], beam_size=1)
    assert scores == score(greedy, [r["en"] for r in read_split(toy_corpus, "validation")], lowercase=True)
    assert load_recipe(TINY_RECIPE, ["evaluate.lowercase=true"]).evaluate.lowercase is True


@pytest.mark.parametrize("n_hyps, n_refs", [(2, 3), (3, 2), (0, 1)])
def test_length_mismatch_raises(n_hyps, n_refs):
    with pytest.raises(ValueError, match=rf"{n_hyps} hypotheses for {n_refs} references"):
        score(HYPS[:n_hyps], REFS[:n_refs])


def read_split(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_evaluate_tiny_translator(tiny_translator, toy_corpus, tmp_path):
    test = read_split(toy_corpus, "test")
    assert len(test) == 60
    sources, references = [r["de"] for r in test], [r["en"] for r in test]
    output = tmp_path / "out" / "hyps.txt"
    output.parent.mkdir()

    scores = evaluate(tiny_translator, "test", output=output)

    assert 0 <= scores.bleu <= 100 and 0 <= scores.chrf <= 100
    expected = tiny_translator.translate(sources, beam_size=tiny_translator.recipe.decode.beam_size)
    text = output.read_text(encoding="utf-8")
    assert text.count("\n") == 60
    assert text == "".join(h + "\n" for h in expected)
    assert text.split("\n")[:-1] == expected
    # The scores are those of the written hypotheses against the split's references.
    again = score(expected, references)
    assert (scores.bleu, scores.chrf) == (again.bleu, again.chrf)


def test_evaluate_with_explicit_data_and_greedy(tiny_translator, toy_corpus):
    validation = read_split(toy_corpus, "validation")
    data = DataConfig(path=str(toy_corpus), src_lang="de", tgt_lang="en")
    scores = evaluate(tiny_translator, "validation", data=data, beam_size=1)
    greedy = tiny_translator.translate([r["de"] for r in validation], beam_size=1)
    assert scores.bleu == score(greedy, [r["en"] for r in validation]).bleu


def test_missing_cells_train_validate_and_score_as_empty_sentences(tmp_path, toy_corpus):
    """A JSON null in any split is an empty sentence: the tokenizer trains past it, validation and the test
    score translate it to "" and score it against "" (it used to crash each of them)."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        rows = read_split(toy_corpus, split)[:300] + [{"de": None, "en": "A dog."}, {"de": "Ein Hund.", "en": None}]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = load_recipe(TINY_RECIPE, [f"data.path={data}", f"out_dir={tmp_path / 'run'}", "train.max_steps=4", "train.valid_every=2"])
    scores = train(recipe, progress=False)["greedy"]

    translator = Translator.from_pretrained(tmp_path / "run")
    test = read_split(data, "test")
    hypotheses = translator.translate([r["de"] or "" for r in test], beam_size=1)
    assert hypotheses[-2] == ""
    assert scores.bleu == score(hypotheses, [r["en"] or "" for r in test]).bleu
    assert evaluate(translator, "test", beam_size=1).bleu == scores.bleu


def test_evaluate_output_that_cannot_be_written_fails_before_translating_and_a_failure_leaves_no_file(tiny_translator, tmp_path,
                                                                                                     monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_translator, "translate", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    with pytest.raises(FileNotFoundError):
        evaluate(tiny_translator, "test", output=tmp_path / "missing" / "hyps.txt")
    assert calls == []  # the path failed first: no split decoded for nothing
    (tmp_path / "hyps.txt").write_text("the last good output\n", encoding="utf-8")
    with pytest.raises(ZeroDivisionError):
        evaluate(tiny_translator, "test", output=tmp_path / "hyps.txt")
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == ["hyps.txt"]  # no staging file left
    assert (tmp_path / "hyps.txt").read_text(encoding="utf-8") == "the last good output\n"
