"""Scoring given translations (teacher forcing): the score a search gives the tokens it chose, the same alone
and in any batch, CTranslate2's score_batch, and the command that reads two files line for line; and
reranking the beam with a model of the reverse pair."""

import json

import pytest

from test_errors import assert_usage_error, cli
from test_search import SENTENCES, encode
from translator import PairTooLong, Sampling, Translator
from translator.batching import target_tensors
from translator.config import RecipeError
from translator.search import beam_search, forced_log_probs, greedy_search


def split_pairs(corpus, split: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (corpus / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["de"] for r in rows], [r["en"] for r in rows]


@pytest.fixture(scope="module")
def pairs(toy_corpus):
    return split_pairs(toy_corpus, "test")


def forced(translator, src, rows, hypotheses):
    tgt_in, tgt_out = target_tensors([h.tokens for h in hypotheses])
    return forced_log_probs(translator.model, src[rows], tgt_in, tgt_out).tolist()


def test_forced_scores_equal_the_scores_the_searches_gave_their_own_tokens(tiny_translator):
    src, max_lens = encode(tiny_translator, SENTENCES)
    greedy = greedy_search(tiny_translator.model, src, max_lens)
    ended = [i for i, (h, n) in enumerate(zip(greedy, max_lens)) if len(h.tokens) + 1 < n]  # by eos, which the score counts
    assert len(ended) >= 3
    assert forced(tiny_translator, src, ended, [greedy[i] for i in ended]) == pytest.approx([greedy[i].score for i in ended], abs=1e-4)
    beams = beam_search(tiny_translator.model, src, max_lens, beam_size=4, alpha=0.0, n_best=3)  # alpha 0: raw log-probabilities
    rows = [i for i, hyps in enumerate(beams) for h in hyps if len(h.tokens) + 1 < max_lens[i]]
    finished = [h for i, hyps in enumerate(beams) for h in hyps if len(h.tokens) + 1 < max_lens[i]]
    assert len({tuple(h.tokens) for h in finished}) > len(SENTENCES)  # several hypotheses a sentence, not one
    assert forced(tiny_translator, src, rows, finished) == pytest.approx([h.score for h in finished], abs=1e-4)


def test_translator_score_is_the_greedy_score_of_its_own_translation(tiny_translator):
    src, max_lens = encode(tiny_translator, SENTENCES)
    greedy = greedy_search(tiny_translator.model, src, max_lens)
    texts = tiny_translator.tokenizer.decode([h.tokens for h in greedy])
    # Text that SentencePiece encodes back to the same pieces, ended by eos rather than the length limit.
    same = [i for i, (h, ids) in enumerate(zip(greedy, tiny_translator.tokenizer.encode(texts))) if ids == h.tokens and len(h.tokens) + 1 < max_lens[i]]
    assert len(same) >= 3
    scores = tiny_translator.score([SENTENCES[i] for i in same], [texts[i] for i in same])
    assert scores == pytest.approx([greedy[i].score for i in same], abs=1e-4)


def test_a_pair_scores_the_same_alone_and_in_batches_of_any_size(tiny_translator, pairs):
    sources, targets = pairs
    together = tiny_translator.score(sources, targets)
    small_batches = tiny_translator.score(sources, targets, max_tokens=64)
    alone = [tiny_translator.score([s], [t])[0] for s, t in zip(sources[:8], targets[:8])]
    assert small_batches == pytest.approx(together, abs=1e-4)
    assert alone == pytest.approx(together[:8], abs=1e-4)
    assert len(set(round(s, 3) for s in together)) > len(together) // 2  # real scores, not one value


def test_normalize_gives_the_mean_over_the_target_pieces_and_eos(tiny_translator, pairs):
    sources, targets = pairs[0][:10], pairs[1][:10]
    total, mean = tiny_translator.score(sources, targets), tiny_translator.score(sources, targets, normalize=True)
    lengths = [len(ids) + 1 for ids in tiny_translator.tokenizer.encode(targets)]
    assert mean == pytest.approx([t / n for t, n in zip(total, lengths)], rel=1e-5)


def test_scores_equal_ctranslate2_score_batch(tiny_model_dir, tiny_translator, pairs, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from translator.export import export_ctranslate2

    sources, targets = pairs[0][:20], pairs[1][:20]
    ct2 = ctranslate2.Translator(str(export_ctranslate2(tiny_model_dir, tmp_path / "ct2")), device="cpu", intra_threads=1)
    pieces = tiny_translator.tokenizer.pieces
    results = ct2.score_batch([pieces(s) for s in sources], [pieces(t) for t in targets])  # its log_probs end with </s>'s
    assert [r.tokens[-1] for r in results] == ["</s>"] * len(results)
    assert tiny_translator.score(sources, targets) == pytest.approx([sum(r.log_probs) for r in results], abs=1e-3)


def test_score_refuses_what_it_cannot_score(tiny_translator):
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        tiny_translator.score(["Ein hund.", "Frau."], ["A dog."])
    with pytest.raises(TypeError, match="targets must be a list of str"):
        tiny_translator.score(["Ein hund."], "A dog.")
    limit = tiny_translator.recipe.model.max_positions
    with pytest.raises(PairTooLong, match=f"target 1: .* longer than model.max_positions={limit}") as error:
        tiny_translator.score(["Ein hund.", "Frau."], ["A dog.", "dog " * limit])
    assert (error.value.side, error.value.index, error.value.limit) == ("target", 1, limit)


def test_score_command_writes_a_line_a_pair_and_refuses_bad_files(tiny_model_dir, tiny_translator, pairs, tmp_path):
    sources, targets = pairs[0][:12], pairs[1][:12]
    source, target, out = tmp_path / "in.de", tmp_path / "in.en", tmp_path / "scores.txt"
    source.write_text("\n".join(sources) + "\n", encoding="utf-8")
    target.write_text("\r\n".join(targets) + "\r\n", encoding="utf-8")  # CR LF line ends are line ends
    result = cli("score", tiny_model_dir, "--source", source, "--target", target, "-o", out, "--chunk-lines", 5, "--quiet")
    assert result.returncode == 0, result.stderr
    written = [float(line) for line in out.read_text().splitlines()]
    assert written == pytest.approx(tiny_translator.score(sources, targets), abs=1e-4)

    short = tmp_path / "short.en"
    short.write_text("\n".join(targets[:11]) + "\n", encoding="utf-8")
    refused = tmp_path / "refused.txt"
    result = cli("score", tiny_model_dir, "--source", source, "--target", short, "-o", refused, "--quiet")
    assert_usage_error(result, "score", f"{source} has 12 lines and {short} 11")
    assert not refused.exists()  # a failed command writes nothing

    bad = tmp_path / "bad.en"
    bad.write_bytes("\n".join(targets[:3]).encode() + b"\nA \xff dog.\n" + "\n".join(targets[4:12]).encode() + b"\n")
    assert_usage_error(cli("score", tiny_model_dir, "--source", source, "--target", bad, "--quiet"), "score", f"{bad}, line 4: not valid UTF-8")
    assert_usage_error(cli("score", tiny_model_dir, "--source", tmp_path / "none.de", "--target", target), "score", "--source", "no such file")


def test_reranking_sorts_the_beam_by_its_score_plus_the_weighted_reverse_score(tiny_translator, reverse):
    beams = tiny_translator.translate(SENTENCES, beam_size=4, n_best=4)
    for weight in (0.5, 2.0):
        reranked = tiny_translator.translate(SENTENCES, beam_size=4, n_best=4, rerank=reverse, rerank_weight=weight)
        for source, beam, ranked in zip(SENTENCES, beams, reranked):
            back = reverse.score([h.text for h in beam], [source] * len(beam), normalize=True)
            expected = sorted(((h.score + weight * b, h.text) for h, b in zip(beam, back)), reverse=True)
            assert [h.text for h in ranked] == [text for _, text in expected]
            assert [h.score for h in ranked] == pytest.approx([score for score, _ in expected], abs=1e-5)
    changed = tiny_translator.translate(SENTENCES, beam_size=4, rerank=reverse, rerank_weight=50.0)
    assert changed != [beam[0].text for beam in beams]  # a large weight lets the reverse model choose
    assert tiny_translator.translate(SENTENCES, beam_size=4, rerank=reverse, rerank_weight=0.0) == [beam[0].text for beam in beams]
    assert tiny_translator.translate(["", SENTENCES[0]], beam_size=4, rerank=reverse)[0] == ""


def test_reranking_refuses_a_model_of_another_pair_sampling_and_a_weight_alone(tiny_translator, reverse):
    with pytest.raises(ValueError, match="must translate en to de, and it translates de to en"):
        tiny_translator.translate(SENTENCES, rerank=tiny_translator)
    with pytest.raises(ValueError, match="does not apply to sampling"):
        tiny_translator.translate(SENTENCES, rerank=reverse, sampling=Sampling(seed=1))
    with pytest.raises(TypeError, match="expected a Translator of the reverse pair"):
        tiny_translator.translate(SENTENCES, rerank="runs/en_de")
    with pytest.raises(RecipeError, match=r"does not apply to greedy search \(beam_size=1\)"):  # one hypothesis: nothing to re-sort
        tiny_translator.translate(SENTENCES, beam_size=1, rerank=reverse)
    with pytest.raises(ValueError, match="rerank_weight: given without rerank="):  # not ignored in silence
        tiny_translator.translate(SENTENCES, rerank_weight=1.0)


def test_the_command_line_refuses_reranking_greedy_search_and_gives_the_reverse_model_the_forward_precision_and_budget(
        tiny_model_dir, reverse_model_dir):
    from translator.cli import build_parser, load_translator, reverse_translator

    result = cli("translate", tiny_model_dir, "--beam-size", "1", "--rerank-with", reverse_model_dir, "--quiet", stdin="Ein hund.\n")
    assert_usage_error(result, "translate", "does not apply to greedy search")
    for flags in (["--precision", "bf16"], ["--set", "decode.precision=bf16"]):  # a flag, or the recipe's key
        args = build_parser().parse_args(["translate", str(tiny_model_dir), "--rerank-with", str(reverse_model_dir), *flags])
        forward = load_translator(args.model_dir, args.set, args.device, args.precision)
        assert forward.recipe.decode.precision == reverse_translator(args, forward).recipe.decode.precision == "bf16"
    args = build_parser().parse_args(["evaluate", str(tiny_model_dir), "--rerank-with", str(reverse_model_dir), "--set", "decode.max_tokens=999"])
    forward = load_translator(args.model_dir, args.set, args.device)
    assert reverse_translator(args, forward).recipe.decode.max_tokens == 999  # the memory the user sized the command to


def test_text_that_is_not_unicode_is_refused_naming_it(tiny_translator):
    with pytest.raises(ValueError, match=r"translate\(\): item 1 holds '\\ud800' at character 3, a lone surrogate"):
        tiny_translator.translate(["Ein hund.", "Ein\ud800"])
    with pytest.raises(ValueError, match=r"score\(\): targets: item 0 holds '\\udcff'"):
        tiny_translator.score(["Ein hund."], ["A dog.\udcff"])


def test_reranking_keeps_the_beams_order_where_the_reverse_model_cannot_read_a_text_whole(tiny_translator, reverse):
    long = " ".join(SENTENCES[:4] * 12)  # over both models' positions: cut to fit forward, refused by the reverse model's score
    assert len(reverse.tokenizer.encode([long])[0]) + 1 > reverse.recipe.model.max_positions
    batch = [long, SENTENCES[1]]
    with pytest.warns(UserWarning, match="longer than model.max_positions"):
        plain = tiny_translator.translate(batch, beam_size=4, n_best=4)
        ranked = tiny_translator.translate(batch, beam_size=4, n_best=4, rerank=reverse, rerank_weight=2.0)
    assert ranked[0] == plain[0]  # the beam as searched, its scores unchanged
    alone = tiny_translator.translate(SENTENCES[1:2], beam_size=4, n_best=4, rerank=reverse, rerank_weight=2.0)[0]
    assert [h.text for h in ranked[1]] == [h.text for h in alone]  # the sentence beside it still reranked
    assert [h.score for h in ranked[1]] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_translate_and_evaluate_commands_rerank_with_a_model_directory(tiny_model_dir, tiny_translator, reverse, toy_corpus, tmp_path):
    reverse_dir = str(reverse.recipe.out_dir)
    result = cli("translate", tiny_model_dir, "--rerank-with", reverse_dir, "--rerank-weight", "2", "--beam-size", 4, "--quiet",
                 stdin="\n".join(SENTENCES) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == tiny_translator.translate(SENTENCES, beam_size=4, rerank=reverse, rerank_weight=2.0)
    output = tmp_path / "reranked.en"
    result = cli("evaluate", tiny_model_dir, "--rerank-with", reverse_dir, "--split", "validation", "--json", "--quiet",
                 "--output", output, "--set", f"data.path={toy_corpus}")
    assert result.returncode == 0, result.stderr
    assert 0 < json.loads(result.stdout)["bleu"] <= 100
    sources, _ = split_pairs(toy_corpus, "validation")
    assert output.read_text(encoding="utf-8").splitlines() == tiny_translator.translate(sources, rerank=reverse)
    assert_usage_error(cli("translate", tiny_model_dir, "--rerank-with", reverse_dir, "--sample", "--quiet", stdin="Frau.\n"),
                       "translate", "--rerank-with", "--sample")
    assert_usage_error(cli("translate", tiny_model_dir, "--rerank-with", tiny_model_dir, "--quiet", stdin="Frau.\n"),
                       "translate", "must translate en to de")
    assert_usage_error(cli("evaluate", tiny_model_dir, "--rerank-weight", "2", "--quiet", "--set", f"data.path={toy_corpus}"),
                       "evaluate", "--rerank-weight 2.0: given without --rerank-with")
