"""Greedy and beam search: exact against slow references, and batching never changes a translation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from translator import Sampling
from translator.batching import source_tensor, target_tensors
from translator.config import ModelConfig
from translator import search
from translator.model import Transformer
from translator.quantize import bf16_model
from translator.search import (Hypothesis, argmax_rows, beam_search, encode_in_groups, forced_log_probs, greedy_search, length_penalty,
                               max_output_lengths,
                               max_output_lengths, sample)
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


def reference_beam(model, src_row, max_len, beam_size, alpha, stop_at_k_finished=False):
    """One sentence, no cache, no batching, no early stopping: recompute the whole prefix every step and
    go on until the length limit, so every hypothesis the beam can finish is found and ranked.

    `stop_at_k_finished` stops instead as soon as `beam_size` hypotheses have finished: the rule that
    stops too early, which the tests show their cases tell apart."""
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
        for score, tokens, tok in top[:beam_size]:  # only eos among the best K finishes a hypothesis
            if tok == EOS_ID:
                finished.append(Hypothesis(tokens, score / length_penalty(step, alpha)))
        beams = [(tokens + [tok], score) for score, tokens, tok in top if tok != EOS_ID][:beam_size]
        if step + 1 >= max_len:  # no room for another token: the open beams end as they are
            finished += [Hypothesis(tokens, score / length_penalty(step, alpha)) for tokens, score in beams]
            break
        if stop_at_k_finished and len(finished) >= beam_size:
            break
    return sorted(finished, key=lambda h: -h.score)


def test_beam_size_one_is_greedy(tiny_translator):
    src, max_lens = encode(tiny_translator, SENTENCES)
    greedy = greedy_search(tiny_translator.model, src, max_lens)
    beam = beam_search(tiny_translator.model, src, max_lens, beam_size=1, alpha=0.0)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
    for g, (b,) in zip(greedy, beam):
        assert abs(g.score - b.score) < 1e-4



@pytest.mark.parametrize("columns", [1, 5, 127, 128, 129, 300, 1000])
def test_argmax_rows_is_argmax_with_the_first_of_equals(columns):
    g = torch.Generator().manual_seed(columns)
    # Five values only: ties within a block, across blocks, and between the blocks and the columns after them.
    few_values = torch.randint(-2, 3, (17, columns), generator=g).float()
    spread = torch.randn(17, columns, generator=g)
    late_best = spread.clone()
    late_best[:, -1] = 10.0  # the largest in the last column, past the whole blocks when there is a remainder
    for scores in (few_values, spread, late_best, torch.full((3, columns), -math.inf)):
        assert torch.equal(argmax_rows(scores), scores.argmax(dim=-1))


def test_greedy_without_scores_picks_the_same_tokens(tiny_translator):
    """Text-only translation skips the log-softmax: the same tokens, their score left NaN."""
    src, max_lens = encode(tiny_translator, SENTENCES)
    with_scores = greedy_search(tiny_translator.model, src, max_lens)
    without = greedy_search(tiny_translator.model, src, max_lens, scores=False)
    assert [h.tokens for h in without] == [h.tokens for h in with_scores]
    assert all(math.isnan(h.score) for h in without) and not any(math.isnan(h.score) for h in with_scores)
    texts = tiny_translator.translate(SENTENCES, beam_size=1)  # takes the path without scores
    assert texts == [hyps[0].text for hyps in tiny_translator.translate(SENTENCES, beam_size=1, n_best=1)]

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


def assert_batched_beam_equals_reference(model, reference_model, translator, beam_size):
    """Beam search with `model`, batched and cached, finds per sentence the n-best of `reference_beam` over
    `reference_model` (src, prefix) -> logits, to the same tokens and scores."""
    src, max_lens = encode(translator, SENTENCES)
    batched = beam_search(model, src, max_lens, beam_size=beam_size, alpha=0.6, n_best=beam_size)
    with torch.inference_mode():
        for row, hyps in enumerate(batched):
            reference = reference_beam(reference_model, src[row], max_lens[row], beam_size, 0.6)[:beam_size]
            assert [h.tokens for h in hyps] == [h.tokens for h in reference]
            assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(hyps, reference))


def test_cached_batched_beam_equals_slow_reference(tiny_translator):
    assert_batched_beam_equals_reference(tiny_translator.model, tiny_translator.model, tiny_translator, beam_size=4)


def tiny_vocabulary_model(seed: int) -> Transformer:
    """Random weights over 6 tokens (4 specials, 2 words), scaled up so the next token depends on the
    prefix and the source, and eos likely enough that hypotheses finish at every length."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.0, max_positions=64), 6)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.mul_(2.0)
        direction = F.normalize(torch.randn(16), dim=0)
        model.decoder_norm.bias.copy_(direction)
        model.embedding.weight[EOS_ID] += 8.0 * direction  # a bias towards eos: short hypotheses finish early
    return model.eval()


def test_beam_stopping_rules_match_the_reference_searches():
    """Stopping once no open hypothesis can beat the K finished ones ("exact") must return what searching on
    to the length limit returns: the same n-best, in the same order. "first_k" must return what the
    reference returns when it stops at the first K finished hypotheses."""
    max_len, compared, stops_too_early = 10, 0, 0
    for seed in range(3):
        model = tiny_vocabulary_model(seed)
        rng = torch.Generator().manual_seed(seed)
        src = source_tensor([torch.randint(4, 6, (int(n),), generator=rng).tolist() for n in torch.randint(2, 8, (8,), generator=rng)])
        for beam_size, alpha in [(2, 0.0), (2, 2.0), (3, 1.0)]:  # alpha 2: a long hypothesis can overtake short ones
            with torch.inference_mode():
                batched = beam_search(model, src, [max_len] * len(src), beam_size, alpha, n_best=beam_size)
                first_k = beam_search(model, src, [max_len] * len(src), beam_size, alpha, n_best=beam_size, stop="first_k")
                for row, hyps in enumerate(batched):
                    full = reference_beam(model, src[row], max_len, beam_size, alpha)[:beam_size]
                    assert [h.tokens for h in hyps] == [h.tokens for h in full], (seed, beam_size, alpha, row)
                    assert [h.score for h in hyps] == pytest.approx([h.score for h in full], abs=1e-4)
                    eager = reference_beam(model, src[row], max_len, beam_size, alpha, stop_at_k_finished=True)[:beam_size]
                    assert [h.tokens for h in first_k[row]] == [h.tokens for h in eager], (seed, beam_size, alpha, row)
                    assert [h.score for h in first_k[row]] == pytest.approx([h.score for h in eager], abs=1e-4)
                    compared, stops_too_early = compared + 1, stops_too_early + ([h.tokens for h in eager] != [h.tokens for h in full])
    # the premise: on these cases stopping at the first K finished hypotheses would lose better ones
    assert stops_too_early >= 0.1 * compared, (stops_too_early, compared)


def test_n_best_lists_are_sorted_best_first(tiny_translator):
    src, max_lens = encode(tiny_translator, SENTENCES)
    for hyps in beam_search(tiny_translator.model, src, max_lens, beam_size=5, alpha=0.6, n_best=5):
        scores = [h.score for h in hyps]
        assert len(hyps) == 5 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_sentence_translates_the_same_alone_and_in_a_mixed_batch(tiny_translator, precision):
    # bf16: the copy that decode.precision auto decodes from on a CPU with native bf16
    model = tiny_translator.model if precision == "fp32" else bf16_model(tiny_translator.model)
    src, max_lens = encode(tiny_translator, SENTENCES)
    assert (src == PAD_ID).any()  # the batch really mixes lengths
    batched_greedy = greedy_search(model, src, max_lens)
    batched_beam = beam_search(model, src, max_lens, beam_size=5, alpha=0.6)
    for i, sentence in enumerate(SENTENCES):
        alone, alone_lens = encode(tiny_translator, [sentence])
        assert greedy_search(model, alone, alone_lens)[0].tokens == batched_greedy[i].tokens
        assert beam_search(model, alone, alone_lens, beam_size=5, alpha=0.6)[0][0].tokens == batched_beam[i][0].tokens


@pytest.mark.parametrize("kept", [0.0, 0.5, 1.0])
def test_greedy_and_sampling_are_the_same_however_long_finished_rows_stay_in_the_batch(monkeypatch, kept):
    """Finished rows are computed on until a share of the batch is done (search.FINISHED_ROWS_KEPT): they must
    change no other row's tokens, score or random draws. 0: each leaves at once; 1: none leaves until all are done."""
    model = tiny_vocabulary_model(1)  # greedy search runs to each row's length limit, samples end at eos too
    rng = torch.Generator().manual_seed(0)
    src = source_tensor([torch.randint(4, 6, (int(n),), generator=rng).tolist() for n in torch.randint(2, 8, (24,), generator=rng)])
    max_lens = [int(n) for n in torch.randint(2, 12, (24,), generator=rng)]
    sampling = Sampling(temperature=1.5, seed=7)
    alone = [greedy_search(model, src[i:i + 1], max_lens[i:i + 1])[0] for i in range(len(src))]
    samples = [sample(model, src[i:i + 1], max_lens[i:i + 1], sampling, n_samples=2)[0] for i in range(len(src))]
    for hypotheses in (alone, [hyps[0] for hyps in samples]):  # the premise: rows finish at many different steps
        assert len({len(h.tokens) for h in hypotheses}) > 3
    monkeypatch.setattr(search, "FINISHED_ROWS_KEPT", kept)
    for hyp, reference in zip(greedy_search(model, src, max_lens), alone):
        assert hyp.tokens == reference.tokens and hyp.score == pytest.approx(reference.score, abs=1e-5)
    for hyps, reference in zip(sample(model, src, max_lens, sampling, n_samples=2), samples):
        assert [h.tokens for h in hyps] == [h.tokens for h in reference]


def random_sources(rows: int, longest: int, vocab_size: int, seed: int = 0):
    """A batch of random sentences of random lengths from 1 to `longest` pieces, in no order."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest + 1, size=rows)
    return source_tensor([rng.integers(EOS_ID + 1, vocab_size, size=n).tolist() for n in lengths])


def assert_grouped_encoding_equals_one_call(model, vocab_size: int):
    src = random_sources(300, 60, vocab_size)  # about 9,000 real and 18,000 padded positions: many groups
    real = (src != PAD_ID)[:, :, None]
    memory, mask = encode_in_groups(model, src)
    one_memory, one_mask = model.encode(src)
    assert torch.equal(mask, one_mask)
    members = zip(memory, one_memory) if isinstance(memory, tuple) else [(memory, one_memory)]  # an ensemble: one per member
    for grouped, whole in members:
        assert grouped.shape == whole.shape
        torch.testing.assert_close(torch.where(real, grouped, 0), torch.where(real, whole, 0), atol=1e-5, rtol=1e-5)
        assert (grouped.abs().sum(dim=-1) == 0).any() and (whole.abs().sum(dim=-1) != 0).all()  # groups were cut short


def test_encoding_in_groups_equals_one_call_at_every_real_position(tiny_translator):
    assert_grouped_encoding_equals_one_call(tiny_translator.model, tiny_translator.tokenizer.vocab_size)


def test_encoding_in_groups_never_changes_a_translation_or_a_score(tiny_translator, monkeypatch):
    src, max_lens = encode(tiny_translator, SENTENCES * 4)
    model = tiny_translator.model
    targets = target_tensors(tiny_translator.tokenizer.encode(["A man sees a hat."] * len(src)))

    def searched():
        hypotheses = (greedy_search(model, src, max_lens) + [h for n_best in beam_search(model, src, max_lens, beam_size=5, alpha=0.6, n_best=5) for h in n_best]
                      + [h for drawn in sample(model, src, max_lens, Sampling(seed=3), n_samples=2) for h in drawn])
        return [h.tokens for h in hypotheses], [h.score for h in hypotheses] + forced_log_probs(model, src, *targets).tolist()

    tokens, scores = searched()
    monkeypatch.setattr("translator.search.ENCODER_GROUP_TOKENS", 1)  # every sentence a group of its own, the groups in length order
    grouped_tokens, grouped_scores = searched()
    assert grouped_tokens == tokens and grouped_scores == pytest.approx(scores, abs=1e-4)  # scores: up to float rounding


def test_translate_keeps_input_order_whatever_the_batching(tiny_translator):
    sentences = SENTENCES * 3
    one_batch = tiny_translator.translate(sentences, beam_size=3, max_tokens=100_000)
    tiny_batches = tiny_translator.translate(sentences, beam_size=3, max_tokens=1)  # one sentence a batch
    assert one_batch == tiny_batches
    assert one_batch == [tiny_translator.translate(s, beam_size=3) for s in sentences]


def test_output_length_limit(tiny_translator):
    src, _ = encode(tiny_translator, SENTENCES[:2])
    assert max_output_lengths(src, PAD_ID, a=0.0, b=1, limit=256) == [2, 2]  # a limit of 1 would leave no room for a token
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


def test_unseeded_sampling_draws_a_repeated_sentence_apart(tiny_translator):
    drawn = tiny_translator.translate([SENTENCES[1]] * 8, sampling=Sampling(temperature=2.0))
    assert len(set(drawn)) > 1  # one batch, eight rows: a generator each, not one per sentence's text
    seeded = tiny_translator.translate([SENTENCES[1]] * 8, sampling=Sampling(temperature=2.0, seed=5))
    assert len(set(seeded)) == 1  # a seed makes a sentence's sample depend on the sentence alone


def test_top_k_one_sampling_is_greedy(tiny_translator):
    assert tiny_translator.translate(SENTENCES, sampling=Sampling(top_k=1, seed=0)) == tiny_translator.translate(SENTENCES, beam_size=1)
    assert tiny_translator.translate(SENTENCES, sampling=Sampling(top_p=1e-6, seed=0)) == tiny_translator.translate(SENTENCES, beam_size=1)


@pytest.mark.parametrize("sampling", [Sampling(temperature=1e-46, seed=0), Sampling(top_p=1e-46, seed=0)], ids=["temperature", "top_p"])
def test_a_temperature_or_top_p_too_small_for_float32_samples_the_likeliest_token(tiny_translator, sampling):
    # 1e-46 is 0 in float32: every logit over it was -inf, and top_p kept no token; the draw was the vocabulary's last piece
    assert tiny_translator.translate(SENTENCES, sampling=sampling) == tiny_translator.translate(SENTENCES, beam_size=1)


def test_an_output_length_limit_is_capped_by_the_positions_however_large_max_len_a():
    src = torch.tensor([[5, 6, 7, PAD_ID], [5, PAD_ID, PAD_ID, PAD_ID]])
    assert max_output_lengths(src, PAD_ID, 1e308, 10, 64) == [64, 64]  # int(inf) would raise


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_draws_among_k_tokens_even_when_probabilities_tie(k):
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.3, 0.3, 0.2, 0.2, 0.0]]).log().expand(50, -1)  # ties at the 1st, 2nd, 3rd and 4th place
    drawn = Sampling(top_k=k).draw(logp, torch.linspace(0, 0.999, 50, dtype=torch.float64))
    assert len(set(drawn.tolist())) == k and set(drawn.tolist()) <= {3, 4, 5, 6}


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=3.0), Sampling(top_k=1), Sampling(top_p=0.5)])
def test_pad_and_bos_are_never_drawn_however_likely(sampling):
    # Label smoothing gives them mass, an undertrained model more: drawn, they vanish from the text but not from the score
    logp = torch.tensor([[0.5, 0.05, 0.3, 0.05, 0.1]]).log().expand(200, -1)
    drawn = sampling.draw(logp, torch.linspace(0, 0.9999, 200, dtype=torch.float64))
    assert not set(drawn.tolist()) & {PAD_ID, BOS_ID}
    assert sampling.top_k != 1 or set(drawn.tolist()) == {4}  # the likeliest of the rest


def test_a_sentences_samples_depend_only_on_the_seed_and_the_sentence(tiny_translator):
    hot = Sampling(temperature=1.5, seed=11)

    def texts(samples_per_sentence):  # the scores differ in the last bits with the batch's padding; the texts may not
        return [[t.text for t in samples] for samples in samples_per_sentence]

    alone = texts([tiny_translator.translate(s, sampling=hot, n_best=3) for s in SENTENCES])
    for max_tokens in (1, 40, 100_000):  # a batch per sentence, a few batches, one batch
        assert texts(tiny_translator.translate(SENTENCES, sampling=hot, n_best=3, max_tokens=max_tokens)) == alone
    # other batch-mates, another order, the sentence twice: still the same samples for it
    others = SENTENCES[:2] + SENTENCES[3:]
    mixed = texts(tiny_translator.translate([SENTENCES[2], *others[::-1], SENTENCES[2]], sampling=hot, n_best=3, max_tokens=60))
    assert mixed[0] == mixed[-1] == alone[2]
    assert len({text for samples in alone for text in samples}) > len(SENTENCES)  # the premise: the samples do vary


def test_sampled_tokens_follow_the_model_distribution(tiny_translator):
    """The first token of 4,000 draws against the model's probabilities (with temperature and top-k)."""
    model = tiny_translator.model
    src, _ = encode(tiny_translator, SENTENCES[:1])
    n = 4000
    for sampling in (Sampling(temperature=2.0, seed=3), Sampling(temperature=1.5, top_k=4, seed=4)):
        drawn = sample(model, src, [2], sampling, n_samples=n)[0]  # length limit 2: one token, then eos
        counts = torch.bincount(torch.tensor([h.tokens[0] if h.tokens else EOS_ID for h in drawn]), minlength=tiny_translator.tokenizer.vocab_size)
        with torch.inference_mode():
            logits = model(src, torch.tensor([[BOS_ID]]))[0, -1].float() / sampling.temperature
        logits = logits.index_fill(0, torch.tensor([PAD_ID, BOS_ID]), float("-inf"))  # never drawn
        if sampling.top_k:
            logits = logits.masked_fill(logits < logits.topk(sampling.top_k).values[-1], float("-inf"))
        expected = logits.softmax(-1) * n
        assert counts[expected == 0].sum() == 0  # nothing outside the top k
        likely = expected > 50
        assert likely.sum() >= 3  # the premise: a spread-out distribution
        # within 5 standard deviations of a binomial count, for every likely token
        assert ((counts[likely] - expected[likely]).abs() <= 5 * expected[likely].sqrt()).all(), (counts[likely], expected[likely])


@pytest.mark.parametrize("bad, error", [
    (dict(temperature=0), ValueError), (dict(temperature=float("inf")), ValueError), (dict(temperature=float("nan")), ValueError),
    (dict(top_k=-1), ValueError), (dict(top_p=0), ValueError), (dict(top_p=1.5), ValueError), (dict(top_p=float("nan")), ValueError),
    (dict(seed=-1), ValueError),
    (dict(top_k="3"), TypeError), (dict(top_k=2.5), TypeError), (dict(top_k=True), TypeError), (dict(temperature="1"), TypeError),
    (dict(temperature=None), TypeError), (dict(top_p="0.9"), TypeError), (dict(seed="1"), TypeError), (dict(seed=1.0), TypeError),
], ids=repr)
def test_sampling_settings_are_validated_naming_the_field(bad, error):
    (name,) = bad
    with pytest.raises(error, match=rf"^Sampling\.{name}: got "):
        Sampling(**bad)


@pytest.mark.parametrize("arguments, message", [
    (dict(n_best="2"), r"^n_best: got '2' \(str\), expected an integer"),
    (dict(n_best=2.0, beam_size=3), r"^n_best: got 2\.0 \(float\)"),
    (dict(sampling={"temperature": 0.5}), r"^sampling: got dict, expected Sampling\("),
    (dict(sampling=0.5), r"^sampling: got float"),
], ids=["n_best-str", "n_best-float", "sampling-dict", "sampling-float"])
def test_translate_arguments_of_the_wrong_type_say_what_is_expected(tiny_translator, arguments, message):
    with pytest.raises(TypeError, match=message):
        tiny_translator.translate("Ein hund.", **arguments)


def test_sampling_accepts_numpy_numbers():
    assert Sampling(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.int64(1)).top_k == 3


def test_decode_settings_accept_numpy_numbers(tiny_translator):  # a setting read from an array, as Sampling's are
    numpy = tiny_translator.translate(SENTENCES, beam_size=np.int64(3), alpha=np.float32(0.5), max_tokens=np.int32(100))
    assert numpy == tiny_translator.translate(SENTENCES, beam_size=3, alpha=0.5, max_tokens=100)


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
