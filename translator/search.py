"""Greedy search, sampling and beam search over `encode / start / decode / select`, batched over sentences,
and the score of given targets (teacher forcing).

The searches decode incrementally: each step feeds only the newest token and the `DecoderState`
carries the K/V of everything before it. Sentences that are done leave the batch (`state.select`):
in beam search at once, in greedy search and sampling once a quarter of the batch is done.
Shapes: B sentences still decoding, K beam size, V vocabulary.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import padding_mask
from .batching import sorted_batches
from .model import Transformer
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without bos and eos
    score: float  # log-probability, divided by the length penalty in beam search; NaN from greedy search without scores


def max_output_lengths(src: Tensor, pad_id: int, a: float, b: int, limit: int) -> list[int]:
    """Per sentence: a * source_length + b tokens (eos included), capped by the position table; at least 2,
    since the searches end a hypothesis after its first token at the earliest (room for one token and eos)."""
    src_len = (src != pad_id).sum(dim=1).tolist()
    return [max(2, int(min(a * n + b, limit))) for n in src_len]  # min first: a huge a would overflow int()


def room_for_more(tokens: list[int], max_len: int) -> bool:
    """Whether a hypothesis of these tokens may take another: one more and eos fit the limit. A finished
    hypothesis without that room was cut at the limit, and wrote no eos."""
    return len(tokens) + 1 < max_len


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al., 2016, eq. 14): ((5 + |Y|) / 6) ** alpha."""
    return ((5 + length) / 6) ** alpha


@dataclass(frozen=True)
class Sampling:
    """Draw each token from the model's distribution instead of taking the best one."""

    temperature: float = 1.0  # < 1 sharpens, > 1 flattens
    top_k: int = 0  # draw only among the k likeliest tokens (0: all)
    top_p: float = 1.0  # draw only among the likeliest tokens whose probabilities add up to p (nucleus)
    seed: int | None = None  # a sentence's samples depend only on the seed and the sentence (not on its batch); None: fresh draws

    def __post_init__(self):
        for name, kind, expected in (("temperature", numbers.Real, "a number"), ("top_k", numbers.Integral, "an integer"),
                                     ("top_p", numbers.Real, "a number"), ("seed", (numbers.Integral, type(None)), "an integer or None")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):  # "3" < 0 would fail later, and obscurely
                raise TypeError(f"Sampling.{name}: got {value!r} ({type(value).__name__}), expected {expected}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"Sampling.temperature: got {self.temperature}, expected > 0 and finite")
        if self.top_k < 0:
            raise ValueError(f"Sampling.top_k: got {self.top_k}, expected 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p: got {self.top_p}, expected in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"Sampling.seed: got {self.seed}, expected 0 or more, or None")

    def draw(self, logp: Tensor, uniforms: Tensor) -> Tensor:
        """(B, V) next-token log-probabilities and (B,) uniforms in [0, 1) -> (B,) sampled token ids.

        Inverse transform sampling: each row's token is where its uniform falls in the cumulative
        distribution, so a row's draw depends on its own uniform alone. <pad> and <s> are never drawn:
        no target holds them, yet label smoothing leaves them mass, and their text would be nothing."""
        logp = logp.index_fill(-1, torch.tensor([PAD_ID, BOS_ID], device=logp.device), float("-inf"))
        shifted = logp - logp.amax(dim=-1, keepdim=True)
        # The likeliest stay at 0 exactly: a temperature that rounds to 0 in float32 gives the others -inf, not every logit NaN.
        logits = torch.where(shifted == 0, 0.0, shifted / self.temperature)
        if self.top_k:  # by the top k's indices, not "at least the k-th value": tied logits (common in bf16) would let more in
            top = logits.topk(min(self.top_k, logits.size(-1)), dim=-1)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            outside = probs.cumsum(dim=-1) - probs >= self.top_p  # the mass before this token already reached p
            outside[:, 0] = False  # the likeliest always stays: a top_p that rounds to 0 in float32 would leave none
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
        cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
        # right=True: a uniform on a step of the cdf goes past tokens of probability 0
        tokens = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True)
        return tokens.squeeze(-1).clamp_(max=logp.size(-1) - 1)


def sentence_generators(src: Tensor, pad_id: int, seed: int, n_samples: int) -> list[np.random.Generator]:
    """A generator per (sentence, sample), seeded from the seed, the sample's index and the sentence's
    token ids alone: the same sentence gets the same samples alone or in any batch, under any max_tokens."""
    generators = []
    for ids in src.tolist():
        ids = [token for token in ids if token != pad_id]
        generators += [np.random.default_rng([seed, index, len(ids), *ids]) for index in range(n_samples)]
    return generators


ROWS_PER_BLOCK = 512  # (512, 8k) fp32 logits are 16 MB: in cache on this CPU, and 512 measured fastest of 128-1024


def top_log_probs(model: Transformer, outputs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Decoder outputs (B, D) -> each row's k likeliest next tokens: log-probabilities (B, k), fp32, and ids (B, k).

    Projected a block of rows at a time, so a block's logits stay in cache from the matmul
    through the softmax to the top k; the whole batch's (B, V) would go out to memory and back.
    """
    blocks = [F.log_softmax(model.logits(block).float(), dim=-1).topk(k, dim=-1) for block in outputs.split(ROWS_PER_BLOCK)]
    return torch.cat([b.values for b in blocks]), torch.cat([b.indices for b in blocks])


ENCODER_GROUP_TOKENS = 1024  # padded source tokens a group (512 to 4,096 measured alike: docs/deployment.md)


def encode_in_groups(model: Transformer, src: Tensor) -> tuple[Tensor, Tensor]:
    """`model.encode(src)`, on the CPU a group of rows of similar length at a time, each group cut to its own
    longest row -> memory (B, S, D), zeros where a group was cut (masked), and src_mask (B, 1, 1, S).

    A decoding batch holds many sentences so that each decoder step multiplies many rows, and pads its
    short sentences to its longest: the encoder would spend about a third of its time on padding
    (Multi30k test set). A row's encoding does not depend on its padding, so fp32 outputs stay the same
    (docs/deployment.md, "Session 35"). On a GPU, where it is not measured, the batch stays one call.
    An ensemble's memory is one per member."""
    if src.device.type != "cpu":
        return model.encode(src)
    lengths = (src != PAD_ID).sum(dim=1).numpy()
    groups = sorted_batches(np.arange(len(lengths)), lengths, ENCODER_GROUP_TOKENS)
    if len(groups) == 1:
        return model.encode(src)
    memories = [model.encode(src[torch.from_numpy(rows), : lengths[rows].max()])[0] for rows in groups]
    inverse = torch.from_numpy(np.concatenate(groups)).argsort()  # the rows back in src's order

    def merged(*parts: Tensor) -> Tensor:
        return torch.cat([F.pad(part, (0, 0, 0, src.size(1) - part.size(1))) for part in parts]).index_select(0, inverse)

    memory = merged(*memories) if isinstance(memories[0], Tensor) else tuple(map(merged, *memories))
    return memory, padding_mask(src, PAD_ID)


@torch.inference_mode()
def forced_log_probs(model: Transformer, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
    """Teacher forcing: the decoder reads tgt_in (B, T: bos, the pieces) and is scored on tgt_out (B, T: the
    pieces, eos, then padding) -> each row's log-probability of its real tokens, summed (B,), fp32.

    What a search's score would be had it chosen these tokens (without the length penalty), in one
    pass over the whole target instead of a step per token."""
    memory, src_mask = encode_in_groups(model, src)
    outputs, _ = model.decode(tgt_in, model.start(memory, src_mask))  # (B, T, D)
    targets = tgt_out.flatten()
    chosen = [F.log_softmax(model.logits(rows).float(), dim=-1).gather(-1, ids[:, None])  # a block of rows at a time, as top_log_probs
              for rows, ids in zip(outputs.flatten(0, 1).split(ROWS_PER_BLOCK), targets.split(ROWS_PER_BLOCK))]
    log_probs = torch.cat(chosen).view_as(tgt_out)
    return torch.where(tgt_out != PAD_ID, log_probs, 0.0).sum(dim=-1)


def greedy_search(model: Transformer, src: Tensor, max_lens: list[int], scores: bool = True) -> list[Hypothesis]:
    """The likeliest token at each step. Without `scores` each hypothesis' score is NaN and the step skips the
    log-softmax: the likeliest token is the largest logit (as CTranslate2 does when not asked for scores)."""
    def best(outputs: Tensor, alive: list[int]) -> tuple[Tensor, Tensor]:
        tokens, logp = [], []
        for block in outputs.split(ROWS_PER_BLOCK):  # a block of rows at a time, as top_log_probs
            logits = model.logits(block).float()
            if scores:
                logits = F.log_softmax(logits, dim=-1)
            tokens.append(argmax_rows(logits))
            logp.append(logits.gather(1, tokens[-1][:, None])[:, 0] if scores else torch.full_like(logits[:, 0], math.nan))
        return torch.cat(tokens), torch.cat(logp)

    return _token_by_token(model, src, max_lens, best)


ARGMAX_BLOCK = 128  # columns a block: 64-256 measured alike, 3-4x faster than topk(1) over 5k-32k columns


def argmax_rows(scores: Tensor) -> Tensor:
    """(B, V) -> (B,) each row's index of its largest value, the first of equals (as `argmax`).

    In two passes: each block's maximum, then the best block's columns. Torch's CPU argmax and topk(1) over
    a long row run 3-4x slower than this, and than the reduction `amax` (docs/deployment.md, "Session 36").
    A GPU, where that was not measured, keeps its own argmax kernel."""
    if not scores.is_cpu:
        return scores.argmax(dim=-1)
    B, V = scores.shape
    size = min(ARGMAX_BLOCK, V)
    rows = torch.arange(B, device=scores.device)
    blocks = scores.unfold(-1, size, size)  # (B, V // size, size), a view: the last V % size columns apart
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # each row's first block that holds its largest value
    index = best_block * size + blocks[rows, best_block].argmax(dim=-1)
    covered = blocks.size(1) * size
    if covered < V:  # the last columns: only a larger value wins, so the first of equals stays
        tail_value, tail_index = scores[:, covered:].max(dim=-1)
        index = torch.where(tail_value > scores[rows, index], tail_index + covered, index)
    return index


def sample(model: Transformer, src: Tensor, max_lens: list[int], sampling: Sampling, n_samples: int = 1) -> list[list[Hypothesis]]:
    """`n_samples` draws per sentence, best first."""
    if sampling.seed is None:  # unseeded: every row a fresh generator, so a repeated sentence draws apart
        generators = [np.random.default_rng() for _ in range(src.size(0) * n_samples)]
    else:
        generators = sentence_generators(src, PAD_ID, sampling.seed, n_samples)  # one per row of src[rows]
    rows = torch.arange(src.size(0), device=src.device).repeat_interleave(n_samples)

    def draw(outputs: Tensor, alive: list[int]) -> tuple[Tensor, Tensor]:
        logp = F.log_softmax(model.logits(outputs).float(), dim=-1)  # (B, V)
        uniforms = torch.tensor([generators[row].random() for row in alive], dtype=torch.float64, device=logp.device)
        tokens = sampling.draw(logp, uniforms)
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)

    drawn = _token_by_token(model, src[rows], [max_lens[r] for r in rows.tolist()], draw)
    return [sorted(drawn[i * n_samples:(i + 1) * n_samples], key=lambda h: -h.score) for i in range(src.size(0))]


# Finished rows stay in the batch (computed, ignored) until more than this share of it has finished: each removal
# copies every layer's cache and memory, and rows finish nearly every step of a large batch. A quarter measured fastest
# of 0 to 1 (a greedy worker's share, one thread, Intel Xeon with AMX: int8 8%, fp32 4% faster than removing them at once).
FINISHED_ROWS_KEPT = 0.25


@torch.inference_mode()
def _token_by_token(model: Transformer, src: Tensor, max_lens: list[int], choose) -> list[Hypothesis]:
    """One hypothesis per sentence, extended by `choose(decoder outputs (B, D), the rows' indices in src) -> tokens (B,),
    their log-probabilities (B,)` until eos or the length limit. `choose` sees the unfinished rows only."""
    memory, src_mask = encode_in_groups(model, src)
    state = model.start(memory, src_mask)
    sentence = list(range(src.size(0)))  # the sentence of each row of the state, finished ones included until compacted
    live = list(range(src.size(0)))  # the rows still decoding
    tokens: list[list[int]] = [[] for _ in sentence]
    scores = [0.0 for _ in sentence]
    last = torch.full((len(sentence), 1), BOS_ID, dtype=torch.long, device=src.device)
    while live:
        outputs, state = model.decode(last, state)
        live_rows = torch.tensor(live, dtype=torch.long, device=src.device) if len(live) < len(sentence) else None
        outputs = outputs[:, -1] if live_rows is None else outputs[:, -1].index_select(0, live_rows)
        chosen, chosen_logp = choose(outputs, [sentence[row] for row in live])
        still = []
        for row, token, token_logp in zip(live, chosen.tolist(), chosen_logp.tolist()):
            i = sentence[row]
            scores[i] += token_logp
            if token == EOS_ID:
                continue
            tokens[i].append(token)
            if room_for_more(tokens[i], max_lens[i]):
                still.append(row)
        last = chosen[:, None] if live_rows is None else last.index_put((live_rows,), chosen[:, None])
        if still and len(sentence) - len(still) > FINISHED_ROWS_KEPT * len(sentence):
            index = torch.tensor(still, dtype=torch.long, device=src.device)
            state, last = state.select(index, index), last.index_select(0, index)
            sentence, still = [sentence[row] for row in still], list(range(len(still)))
        live = still
    return [Hypothesis(t, s) for t, s in zip(tokens, scores)]


@torch.inference_mode()
def beam_search(model: Transformer, src: Tensor, max_lens: list[int], beam_size: int, alpha: float, n_best: int = 1,
                stop: str = "exact") -> list[list[Hypothesis]]:
    """Returns per sentence the n_best finished hypotheses, best first.

    A sentence is done at its length limit, or when `_done` says so by the `stop` rule (DecodeConfig.beam_stop).
    Only eos among the top K candidates finishes a hypothesis, so beam_size=1 with alpha=0 is exactly greedy search.
    """
    K, device = beam_size, src.device
    memory, src_mask = encode_in_groups(model, src)
    n = src.size(0)
    state = model.start(memory, src_mask)  # K hypotheses per sentence share its memory (see MultiHeadAttention)
    alive = list(range(n))
    finished: list[list[Hypothesis]] = [[] for _ in alive]
    prefixes = torch.zeros((n * K, 0), dtype=torch.long, device=device)  # (B*K, t) tokens so far
    scores = torch.full((n, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all K beams start as the same empty prefix: let only one of them expand
    last = torch.full((n * K, 1), BOS_ID, dtype=torch.long, device=device)
    step = 0
    while alive:
        step += 1
        outputs, state = model.decode(last, state)
        cand_scores, cand_beam, cand_token = _best_continuations(model, outputs[:, -1], scores)
        cand_is_eos = cand_token == EOS_ID

        # Continue with the best K candidates that do not end in eos.
        open_scores, pick = cand_scores.masked_fill(cand_is_eos, float("-inf")).topk(K, dim=1)  # (B, K)
        rows = (torch.arange(len(alive), device=device)[:, None] * K + cand_beam.gather(1, pick)).view(-1)
        next_tokens = cand_token.gather(1, pick).view(-1, 1)

        keep = []
        ended = (cand_is_eos[:, :K]).nonzero().tolist()
        prefix_rows = (torch.arange(len(alive), device=device)[:, None] * K + cand_beam).tolist()
        cand_scores_list = cand_scores.tolist()
        for b, j in ended:
            i = alive[b]
            tokens = prefixes[prefix_rows[b][j]].tolist()
            finished[i].append(Hypothesis(tokens, cand_scores_list[b][j] / length_penalty(step, alpha)))
        best_open = open_scores[:, 0].tolist()
        for b, i in enumerate(alive):
            if step + 1 >= max_lens[i]:  # no room for another token: the open beams end as they are (as in greedy)
                open_tokens = torch.cat([prefixes[rows[b * K:(b + 1) * K]], next_tokens[b * K:(b + 1) * K]], dim=1).tolist()
                for tokens, score in zip(open_tokens, open_scores[b].tolist()):
                    finished[i].append(Hypothesis(tokens, score / length_penalty(step, alpha)))
                continue
            if not _done(finished[i], best_open[b], K, max_lens[i], alpha, stop):
                keep.append(b)

        sources = None  # the same sentences go on: their memory stays as it is
        if len(keep) < len(alive):  # finished sentences leave: pick the rest's rows and memory in the same step
            sources = torch.tensor(keep, dtype=torch.long, device=device)
            rows = rows.view(-1, K).index_select(0, sources).view(-1)
            next_tokens = next_tokens.view(-1, K).index_select(0, sources).view(-1, 1)
            open_scores = open_scores.index_select(0, sources)
            alive = [alive[b] for b in keep]
        prefixes = torch.cat([prefixes.index_select(0, rows), next_tokens], dim=1)
        state, scores, last = state.select(rows, sources), open_scores, next_tokens
    return [sorted(hyps, key=lambda h: -h.score)[:n_best] for hyps in finished]


def _best_continuations(model: Transformer, outputs: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder outputs (B*K, D) of K beams per sentence with scores (B, K) -> each sentence's best 2K
    continuations: their scores, beams and tokens, (B, 2K) each. At least K of them do not end in eos."""
    B, K = scores.shape
    # A sentence's best 2K continuations are among the best 2K of each of its beams: rank those alone.
    top_logp, top_tokens = top_log_probs(model, outputs, 2 * K)  # (B*K, 2K)
    cand_scores, cand_index = (scores.view(-1, 1) + top_logp).view(B, K * 2 * K).topk(2 * K, dim=1)
    return cand_scores, cand_index // (2 * K), top_tokens.view(B, -1).gather(1, cand_index)


def _done(finished: list[Hypothesis], best_open_score: float, K: int, max_len: int, alpha: float, stop: str) -> bool:
    """"first_k": whether K hypotheses have finished. "exact": whether K finished hypotheses score at
    least what the best open one can still reach: an open hypothesis only loses log-probability, so at
    best it keeps its score over the largest length penalty it can still reach (that of `max_len`)."""
    if len(finished) < K:
        return False
    if stop == "first_k":
        return True
    return sorted(h.score for h in finished)[-K] >= best_open_score / length_penalty(max_len, alpha)
