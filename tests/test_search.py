"""Greedy and beam search: exact against slow references, and batching never changes a translation."""

import pytest
import torch
import torch.nn.functional as F

from translator import Sampling
from translator.batching import source_tensor
from translator.search import Hypothesis, beam_search, greedy_search, length_penalty, max_output_lengths
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID

SENTENCES = [
    "Ein mann sieht der hut.",
    "Der alte hund trägt ein ball und der fahrrad.",
    "Ein kind fährt.",
    "Der kleine hund sieht ein fahrrad und ein hut und der ball.",
    "Frau.",
]


def encode(translator, sentences):
    ids = translator.tokenizer.encode(sentences)
    src = source_tensor(ids)
    return src, max_output_lengths(src, PAD_ID, 1.5, 5, translator.recipe.model.max_positions)


def reference_beam(model, src_row, max_len, beam_size, alpha):
    """One sentence, no cache, no batching: recompute the whole prefix every step (same rules as beam_search)."""
    src = src_row[None, : int((src_row != PAD_ID).sum())]
    beams, finished = [([], 0.0)], []
    for step in range(1, max_len + 1):
        candidates = []
        for tokens, score in beams:
            logits = model(src, torch.tensor([[BOS_ID, *tokens]]))[0, -1]
            logp = F.log_softmax(logits.float(), dim=-1)
            candidates += [(score + lp, tokens, tok) for tok, lp in enumerate(logp.tolist())]
        candidates.sort(key=lambda c: -c[0])
        top = candidates[: 2 * beam_size]
        for score, tokens, tok in top[:beam_size]:
            if tok == EOS_ID:
                finished.append(Hypothesis(tokens, score / length_penalty(step, alpha)))
        beams = [(tokens + [tok], score) for score, tokens, tok in top if tok != EOS_ID][:beam_size]
        if step + 1 >= max_len:
            finished += [Hypothesis(tokens, score / length_penalty(step, alpha)) for tokens, score in beams]
            break
        if len(finished) >= beam_size:
            kth = sorted(h.score for h in finished)[-beam_size]
            if kth >= beams[0][1] / length_penalty(max_len, alpha):
                break
    return sorted(finished, key=lambda h: -h.score)


def test_beam_size_one_is_greedy(tiny_translator):
    src, max_lens = encode(tiny_translator, SENTENCES)
    greedy = greedy_search(tiny_translator.model, src, max_lens)
    beam = beam_search(tiny_translator.model, src, max_lens, beam_size=1, alpha=0.0)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
    for g, (b,) in zip(greedy, beam):
        assert abs(g.score - b.score) < 1e-4


def test_greedy_equals_argmax_of_full_recomputation(tiny_translator):
    model = tiny_translator.model
    src, max_lens = encode(tiny_translator, SENTENCES[:2])
    for row, hyp in zip(range(2), greedy_search(model, src, max_lens)):
        tokens = []
        while len(tokens) + 1 < max_lens[row]:
            real = src[row : row + 1, : int((src[row] != PAD_ID).sum())]
            nxt = int(model(real, torch.tensor([[BOS_ID, *tokens]]))[0, -1].argmax())
            if nxt == EOS_ID:
                break
            tokens.append(nxt)
        assert hyp.tokens == tokens


def test_cached_batched_beam_equals_slow_reference(tiny_translator):
    model = tiny_translator.model
    src, max_lens = encode(tiny_translator, SENTENCES)
    batched = beam_search(model, src, max_lens, beam_size=4, alpha=0.6, n_best=4)
    with torch.inference_mode():
        for row, hyps in enumerate(batched):
            reference = reference_beam(model, src[row], max_lens[row], 4, 0.6)[:4]
            assert [h.tokens for h in hyps] == [h.tokens for h in reference]
            assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(hyps, reference))


def test_beam_finishes_only_when_no_open_hypothesis_can_win(tiny_translator):
    # every returned n-best list is sorted, and the best beats greedy's length-normalised score or equals it
    model = tiny_translator.model
    src, max_lens = encode(tiny_translator, SENTENCES)
    for hyps in beam_search(model, src, max_lens, beam_size=5, alpha=0.0, n_best=5):
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
    greedy = greedy_search(model, src, max_lens)
    beam = beam_search(model, src, max_lens, beam_size=5, alpha=0.0)
    for g, (b,) in zip(greedy, beam):
        assert b.score >= g.score - 1e-4  # beam search never finds worse than greedy under the same objective


def test_a_sentence_translates_the_same_alone_and_in_a_mixed_batch(tiny_translator):
    model = tiny_translator.model
    src, max_lens = encode(tiny_translator, SENTENCES)
    assert (src == PAD_ID).any()  # the batch really mixes lengths
    batched_greedy = greedy_search(model, src, max_lens)
    batched_beam = beam_search(model, src, max_lens, beam_size=5, alpha=0.6)
    for i, sentence in enumerate(SENTENCES):
        alone, alone_lens = encode(tiny_translator, [sentence])
        assert greedy_search(model, alone, alone_lens)[0].tokens == batched_greedy[i].tokens
        assert beam_search(model, alone, alone_lens, beam_size=5, alpha=0.6)[0][0].tokens == batched_beam[i][0].tokens


def test_translate_keeps_input_order_whatever_the_batching(tiny_translator):
    sentences = SENTENCES * 3
    one_batch = tiny_translator.translate(sentences, beam_size=3, max_tokens=100_000)
    tiny_batches = tiny_translator.translate(sentences, beam_size=3, max_tokens=1)  # one sentence a batch
    assert one_batch == tiny_batches
    assert one_batch == [tiny_translator.translate(s, beam_size=3) for s in sentences]


def test_output_length_limit(tiny_translator):
    src, _ = encode(tiny_translator, SENTENCES[:2])
    limits = [3, 2]
    for hyp, limit in zip(greedy_search(tiny_translator.model, src, limits), limits):
        assert len(hyp.tokens) <= limit - 1  # room is kept for eos
    for (hyp,), limit in zip(beam_search(tiny_translator.model, src, limits, 3, 0.6), limits):
        assert len(hyp.tokens) <= limit - 1


def test_n_best_is_sorted_and_its_first_is_the_one_best(tiny_translator):
    for sentence in SENTENCES:
        n_best = tiny_translator.translate(sentence, beam_size=4, n_best=4)
        assert len(n_best) == 4
        scores = [t.score for t in n_best]
        assert scores == sorted(scores, reverse=True)
        assert n_best[0].text == tiny_translator.translate(sentence, beam_size=4)
    batch = tiny_translator.translate(SENTENCES, beam_size=3, n_best=2)
    assert [b[0].text for b in batch] == tiny_translator.translate(SENTENCES, beam_size=3)
    with pytest.raises(ValueError, match="n_best"):
        tiny_translator.translate("Ein hund.", beam_size=2, n_best=3)


def test_sampling_is_reproducible_with_a_seed_and_varies_without_one(tiny_translator):
    hot = Sampling(temperature=1.5, seed=7)
    first = tiny_translator.translate(SENTENCES, sampling=hot, n_best=3)
    assert first == tiny_translator.translate(SENTENCES, sampling=hot, n_best=3)
    texts = {t.text for samples in first for t in samples}
    assert len(texts) > len(SENTENCES)  # hot samples differ from each other
    other_seed = tiny_translator.translate(SENTENCES, sampling=Sampling(temperature=1.5, seed=8), n_best=3)
    assert other_seed != first
    for samples in first:
        assert [t.score for t in samples] == sorted((t.score for t in samples), reverse=True)


def test_top_k_one_sampling_is_greedy(tiny_translator):
    assert tiny_translator.translate(SENTENCES, sampling=Sampling(top_k=1, seed=0)) == tiny_translator.translate(SENTENCES, beam_size=1)
    assert tiny_translator.translate(SENTENCES, sampling=Sampling(top_p=1e-6, seed=0)) == tiny_translator.translate(SENTENCES, beam_size=1)


def test_sampling_settings_are_validated():
    for bad in (dict(temperature=0), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="Sampling"):
            Sampling(**bad)


def test_overlong_source_is_truncated_with_a_warning_or_refused(tiny_translator):
    limit = tiny_translator.recipe.model.max_positions
    long_sentence = " ".join(["ein hund"] * limit)
    with pytest.warns(UserWarning, match="max_positions"):
        out = tiny_translator.translate(["Ein hund.", long_sentence], beam_size=2)
    assert len(out) == 2 and out[0] == tiny_translator.translate("Ein hund.", beam_size=2)
    with pytest.raises(ValueError, match="max_positions"):
        tiny_translator.translate(long_sentence, truncate=False)


def test_bf16_decoding_runs_and_agrees_with_fp32_on_most_sentences(tiny_translator):
    sentences = SENTENCES * 2
    fp32 = tiny_translator.translate(sentences, beam_size=3)
    bf16 = tiny_translator.translate(sentences, beam_size=3, precision="bf16")
    assert len(bf16) == len(sentences) and all(isinstance(t, str) for t in bf16)
    assert sum(a == b for a, b in zip(fp32, bf16)) >= len(sentences) // 2
    with pytest.raises(ValueError, match="decode.precision"):
        tiny_translator.translate("Ein hund.", precision="fp8")
    with pytest.raises(ValueError, match="decode.beam_size"):
        tiny_translator.translate("Ein hund.", beam_size=0)
