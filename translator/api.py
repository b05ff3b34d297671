"""`Translator`: load a model directory and translate sentences.

    t = Translator.from_pretrained("runs/multi30k_de_en")
    t.translate("Ein Mann fährt Fahrrad.")                    # -> str
    t.translate(["Zwei Hunde.", "Ein Kind lacht."], beam_size=5)  # -> list[str], input order
    t.translate("Ein Hund.", beam_size=5, n_best=3)          # -> list[Translation], best first
    t.translate("Ein Hund.", sampling=Sampling(top_p=0.9, seed=1), n_best=4)  # 4 samples
    t.translate("Ein Hund.", return_attention=True).attention  # AttentionMaps: the three modes' weights
    t.score(["Ein Hund."], ["A dog."])                       # -> [log p(target | source)]: filtering data, reranking
    t.translate("Ein Hund.", rerank=Translator.from_pretrained("runs/multi30k_en_de"))  # the beam reranked by an en->de model
    Translator.from_pretrained("runs/multi30k_de_en", workers=2)  # 2 decoding processes sharing the threads (CPU)
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention_maps import AttentionMaps, attention_maps
from .batching import sorted_batches, source_tensor, target_tensors
from .checkpoint import load_ensemble, load_model_dir, save_model_dir
from .config import DecodeConfig, Recipe, RecipeError, recipe_from_dict
from .devices import Precision, keep_compiled_kernels, keep_freed_memory, pick_device, resolve_precision
from .ensemble import Ensemble
from .model import Transformer
from .quantize import WeightsVersion, bf16_model, int8_model
from .search import Hypothesis, Sampling, beam_search, forced_log_probs, greedy_search, max_output_lengths, room_for_more, sample
from .tokenizer import PAD_ID, Tokenizer
from .workers import DecodingWorkers


class SourceTooLong(ValueError):
    """Sentences longer than the model's positions, refused (`translate(..., truncate=False)`).
    `indices`: where they are in the list given (from 0); `lengths`: their tokens, the end-of-sentence one included."""

    def __init__(self, indices: list[int], lengths: list[int], limit: int):
        super().__init__(f"{len(indices)} sentence(s) longer than model.max_positions={limit} tokens "
                         f"(first: index {indices[0]}, {lengths[0]} tokens with its end-of-sentence token)")
        self.indices, self.lengths, self.limit = indices, lengths, limit


class PairTooLong(ValueError):
    """A source or target longer than the model's positions, refused by `score` (a cut target would score other text).
    `side`: "source" or "target"; `index`: where the pair is in the lists given (from 0); `length`: its tokens, eos included."""

    def __init__(self, side: str, index: int, length: int, limit: int):
        super().__init__(f"{side} {index}: {length} tokens with its end-of-sentence token, longer than model.max_positions={limit}")
        self.side, self.index, self.length, self.limit = side, index, length, limit


@dataclass(frozen=True)
class Translation:
    text: str
    score: float  # log-probability (beam search: divided by the length penalty)
    attention: AttentionMaps | None = field(default=None, compare=False, repr=False)  # with return_attention=True


def check_reverse_pair(translator: Translator, reverse) -> None:
    """`reverse`, a model to rerank `translator`'s beam with, must be a Translator of its pair reversed (RecipeError otherwise)."""
    if not isinstance(reverse, Translator):
        raise TypeError(f"rerank: got {type(reverse).__name__}, expected a Translator of the reverse pair")
    mine, theirs = translator.recipe.data, reverse.recipe.data
    if (theirs.src_lang, theirs.tgt_lang) != (mine.tgt_lang, mine.src_lang):
        raise RecipeError(f"rerank: this model translates {mine.src_lang} to {mine.tgt_lang}; the reranking model must translate "
                          f"{mine.tgt_lang} to {mine.src_lang}, and it translates {theirs.src_lang} to {theirs.tgt_lang}")


def check_encodable(texts: list[str], name: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate: JSON's "\\ud800", or bytes decoded with surrogateescape) is refused
    here, naming it, rather than deep in the tokenizer."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name}: item {i} holds {text[e.start]!r} at character {e.start}, a lone surrogate, not Unicode text") from None


def check_beam_size(beam_size: int, vocab_size: int) -> None:
    if 2 * beam_size > vocab_size:  # each step ranks the 2K likeliest tokens of every beam
        raise RecipeError(f"decode.beam_size: got {beam_size}, expected at most {vocab_size // 2} (half of this model's {vocab_size} pieces)")


def reranked(sources: list[str], hypotheses: list[list[Translation]], reverse: Translator, weight: float) -> list[list[Translation]]:
    """Each sentence's hypotheses re-sorted by score + weight x the reverse model's mean log-probability of the
    source's pieces (and eos) given the hypothesis, which becomes their score (noisy-channel reranking:
    a translation that leaves out or invents content explains its source badly). Blank sentences keep their order, and
    so do those the reverse model cannot read whole: a source, or a hypothesis cut at the length limit, over its positions."""
    ids = iter(reverse.tokenizer.encode([text for source, hyps in zip(sources, hypotheses) for text in (source, *(h.text for h in hyps))]))
    encoded = [[next(ids) for _ in range(1 + len(hyps))] for hyps in hypotheses]  # the source's ids, then each hypothesis'
    todo = [i for i, texts in enumerate(encoded) if texts[0] and all(map(reverse.fits, texts))]  # a blank source has no pieces
    back = iter(reverse._score_ids([hyp for i in todo for hyp in encoded[i][1:]], [encoded[i][0] for i in todo for _ in hypotheses[i]],
                                   reverse._decode_config(), normalize=True))
    out = [list(hyps) for hyps in hypotheses]
    for i in todo:
        out[i] = sorted((replace(h, score=h.score + weight * next(back)) for h in hypotheses[i]), key=lambda h: -h.score)
    return out


class Translator:
    def __init__(self, model: Transformer | Ensemble, tokenizer: Tokenizer, recipe: Recipe, workers: int = 1):
        self.model, self.tokenizer, self.recipe = model.eval(), tokenizer, recipe
        self.device = next(model.parameters()).device
        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
            raise ValueError(f"workers: got {workers!r}, expected an integer of 1 or more")
        if workers > 1 and self.device.type != "cpu":  # refused now, not at the first call of several sentences
            raise RecipeError(f"workers={workers}: several decoding processes run on the CPU only (CUDA does not survive a fork); "
                              f"use workers=1 on {self.device}")
        self.workers = workers
        self.small_batches = False  # True: decoding sees a few sentences at a time (a service), and "auto" weighs that
        keep_freed_memory()
        keep_compiled_kernels()
        self._copies: dict[str, tuple[WeightsVersion, Transformer]] = {}  # precision -> (weights version, copy), built on first use
        self._workers: tuple[tuple, DecodingWorkers] | None = None  # (what they were forked with, the workers), on first use

    @classmethod
    def from_pretrained(cls, path: str | Path | list[str | Path], device: str | torch.device = "auto", workers: int = 1) -> Translator:
        """Load a model directory written by training or `save_pretrained` (no pickle involved), or a
        list of them: an ensemble (ensemble.py) of models sharing one SentencePiece model and language
        pair, decoding with the first one's recipe.
        device: "auto" (the GPU when torch sees one), "cpu", "cuda" or a torch.device.
        workers: decoding processes on the CPU, sharing torch's threads; forked on the first call of
        several sentences and kept until `close()` (see docs/deployment.md for what they buy)."""
        if isinstance(device, str) and device in ("auto", "cpu", "cuda"):
            device = pick_device(device, key="device")
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        if not paths:
            raise ValueError("from_pretrained: got an empty list, expected a model directory or several")
        recipe, model, tokenizer = load_model_dir(paths[0], device) if len(paths) == 1 else load_ensemble(paths, device)
        return cls(model, tokenizer, recipe, workers)

    def save_pretrained(self, path: str | Path) -> None:
        if isinstance(self.model, Ensemble):
            raise ValueError("an ensemble is several model directories, not one: keep its members' directories")
        save_model_dir(path, self.model, self.recipe, self.tokenizer)

    def translate(
        self,
        sentences: str | list[str],
        *,
        beam_size: int | None = None,
        alpha: float | None = None,
        beam_stop: str | None = None,
        max_tokens: int | None = None,
        precision: str | None = None,
        n_best: int | None = None,
        sampling: Sampling | None = None,
        truncate: bool = True,
        progress: bool = False,
        return_attention: bool = False,
        rerank: Translator | None = None,
        rerank_weight: float | None = None,
    ):
        """Translate one sentence (-> str) or a list (-> list[str], same order).

        Args:
            beam_size: 1 is greedy search; default from the recipe's `decode` section.
            alpha: GNMT length penalty for beam search; default from the recipe.
            beam_stop: when beam search ends a sentence: "exact" (once no open hypothesis can beat the
                best finished ones) or "first_k" (at its first beam_size finished ones, as fairseq and
                CTranslate2 do: fewer steps); default from the recipe.
            max_tokens: source tokens per batch (sentences are sorted by length into batches).
            precision: "auto" (default: bf16 where this CPU or GPU runs it natively, else fp32
                on a CPU and fp16 on a GPU), "fp32", "bf16", "fp16" or "int8" (int8 weights, CPU only).
            n_best: if given, return for each sentence a list of `n_best` `Translation`s
                (text and score), best first, instead of the text alone.
            sampling: draw tokens at random (temperature, top-k, top-p, seed) instead of
                searching; with n_best, that many samples per sentence.
            truncate: cut sources longer than the model's positions (with a warning);
                False raises `SourceTooLong` (a ValueError) instead.
            progress: show a progress bar on stderr.
            return_attention: return `Translation`s (with n_best too) whose `attention` holds the
                pieces and the weights of encoder self-, decoder self- and cross-attention, every
                layer and head (`AttentionMaps`); None for a blank sentence.
            rerank: a model of the reverse pair (here en->de for a de->en model): beam search's
                beam_size hypotheses are re-sorted by their score + rerank_weight x the reverse model's
                mean log-probability of the source's pieces given the hypothesis, and that sum is their score.
            rerank_weight: default from the recipe (decode.rerank_weight).

        Returns:
            str, list[str], Translation, list[Translation] or list[list[Translation]].
        """
        if not isinstance(sentences, (str, list, tuple)):
            raise TypeError(f"translate() takes a str or a list of str, got {type(sentences).__name__}: {sentences!r:.80}")
        single = isinstance(sentences, str)
        batch = [sentences] if single else list(sentences)
        for i, s in enumerate(batch):
            if not isinstance(s, str):
                raise TypeError(f"translate() takes a str or a list of str; item {i} is {type(s).__name__}: {s!r}")
        check_encodable(batch, "translate()")
        if n_best is not None and (isinstance(n_best, bool) or not isinstance(n_best, numbers.Integral)):
            raise TypeError(f"n_best: got {n_best!r} ({type(n_best).__name__}), expected an integer or None")
        if return_attention and isinstance(self.model, Ensemble):
            raise ValueError("return_attention: each model of an ensemble attends in its own way; ask a Translator of one of them")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"sampling: got {type(sampling).__name__}, expected Sampling(temperature=..., top_k=..., top_p=..., seed=...)")
        decode = self._decode_config(beam_size=beam_size, alpha=alpha, beam_stop=beam_stop, max_tokens=max_tokens, precision=precision,
                                     rerank_weight=rerank_weight)
        k = 1 if n_best is None else n_best
        if k < 1 or (sampling is None and k > decode.beam_size):
            raise ValueError(f"n_best={n_best}: expected 1 to beam_size={decode.beam_size} (or any number of samples with sampling)")
        if rerank is None and rerank_weight is not None:
            raise ValueError("rerank_weight: given without rerank=, the reverse model it weighs")
        if rerank is not None:
            check_reverse_pair(self, rerank)
            if sampling is not None or decode.beam_size == 1:  # a RecipeError: on the command line, a usage error
                raise RecipeError(f"rerank: reranks beam search's hypotheses; it does not apply to "
                                 f"{'sampling' if sampling is not None else 'greedy search (beam_size=1)'}")
        searched = decode.beam_size if rerank is not None else k  # reranking sees the whole beam
        scores = n_best is not None or return_attention  # only these return Translations, which carry a score
        sources = self._source_ids(batch, truncate)  # here, so that a warning or error reaches the caller, not a worker
        if self.workers > 1 and sum(ids is not None for ids in sources) > 1:
            hypotheses = self._decoding_workers(decode).translate(
                sources, decode=decode, n_best=searched, sampling=sampling, progress=progress, return_attention=return_attention,
                scores=scores)
        else:
            hypotheses = self._translate(sources, decode, searched, sampling, progress, return_attention, scores)
        if rerank is not None:
            hypotheses = [hyps[:k] for hyps in reranked(batch, hypotheses, rerank, decode.rerank_weight)]
        if n_best is None:
            outputs = [hyps[0] if return_attention else hyps[0].text for hyps in hypotheses]
        else:
            outputs = hypotheses
        return outputs[0] if single else outputs

    def score(self, sources: list[str], targets: list[str], *, normalize: bool = False, max_tokens: int | None = None,
              precision: str | None = None, progress: bool = False) -> list[float]:
        """The model's log-probability of each target given its source: the sum over the target's pieces
        and its end-of-sentence token (as fairseq's --score-reference, Marian's scorer and CTranslate2's
        score_batch give it), or with `normalize` their mean. For filtering parallel data and reranking.

        Raises `PairTooLong` (a ValueError) for a source or target longer than the model's positions."""
        for name, texts in (("sources", sources), ("targets", targets)):
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                raise TypeError(f"score(): {name} must be a list of str, got {type(texts).__name__}: {texts!r:.80}")
            check_encodable(texts, f"score(): {name}")
        if len(sources) != len(targets):
            raise ValueError(f"score(): {len(sources)} sources but {len(targets)} targets, expected one target a source")
        decode = self._decode_config(max_tokens=max_tokens, precision=precision)
        src_ids, tgt_ids = self.tokenizer.encode(list(sources)), self.tokenizer.encode(list(targets))
        limit = self.recipe.model.max_positions
        for side, ids in (("source", src_ids), ("target", tgt_ids)):
            too_long = next((i for i, row in enumerate(ids) if not self.fits(row)), None)
            if too_long is not None:
                raise PairTooLong(side, too_long, len(ids[too_long]) + 1, limit)
        return self._score_ids(src_ids, tgt_ids, decode, normalize, progress)

    def _score_ids(self, src_ids: list[list[int]], tgt_ids: list[list[int]], decode: DecodeConfig, normalize: bool = False,
                   progress: bool = False) -> list[float]:
        """score() of token ids that fit the model's positions."""
        if not src_ids:  # nothing to score: no decoding copy built (the service checks options with no sentences)
            return []
        sizes = np.array([max(len(s), len(t)) + 1 for s, t in zip(src_ids, tgt_ids)], dtype=np.int64)
        model, autocast = self._decoding(self.precision(decode.precision))
        scores = [0.0] * len(src_ids)
        for indices in tqdm(sorted_batches(np.arange(len(src_ids)), sizes, decode.max_tokens), desc="scoring", unit="batch", disable=not progress):
            src = source_tensor([src_ids[i] for i in indices]).to(self.device)
            tgt_in, tgt_out = (t.to(self.device) for t in target_tensors([tgt_ids[i] for i in indices]))
            with autocast:
                totals = forced_log_probs(model, src, tgt_in, tgt_out)
            if normalize:
                totals = totals / (tgt_out != PAD_ID).sum(dim=-1)
            for i, total in zip(indices, totals.tolist()):
                scores[i] = total
        return scores

    def precision(self, requested: str | None = None) -> Precision:
        """The precision decoding runs at on this translator's device, and why ("auto" resolved here)."""
        return resolve_precision(requested or self.recipe.decode.precision, self.device, self.small_batches)

    def decoding_model(self, precision: Precision) -> Transformer:
        """The model itself (run under autocast at bf16 or fp16 on a GPU), or on the CPU its copy at the
        precision, int8 or bf16 (see quantize.py): built once, again only if the weights change."""
        build = {"int8": int8_model, "bf16": bf16_model}.get(precision.name) if self.device.type == "cpu" else None
        if build is None:
            return self.model
        version = WeightsVersion(self.model)
        if self._copies.get(precision.name, (None,))[0] != version:
            self._copies[precision.name] = version, build(self.model)
        return self._copies[precision.name][1]

    def _decoding_workers(self, decode: DecodeConfig) -> DecodingWorkers:
        """The worker processes, forked again when what they hold is stale (the weights moved, or a
        precision's copy was built since) or one has died. The copy is built first, so that the
        workers share it rather than each building its own."""
        self.decoding_model(self.precision(decode.precision))
        holds = WeightsVersion(self.model), sorted((name, version) for name, (version, _) in self._copies.items())
        if self._workers is None or self._workers[0] != holds or not self._workers[1].alive:
            if self._workers is not None:
                self._workers[1].close()
            self._workers = holds, DecodingWorkers(self, self.workers)
        return self._workers[1]

    def close(self) -> None:
        """End the decoding worker processes, if any (they also end with this object, or the program)."""
        if self._workers is not None:
            self._workers[1].close()
            self._workers = None

    def _decode_config(self, **overrides) -> DecodeConfig:
        """The recipe's decode section with the caller's non-None arguments, validated like the recipe."""
        values = asdict(self.recipe.decode) | {k: v for k, v in overrides.items() if v is not None}
        decode = recipe_from_dict({"decode": values}).decode
        check_beam_size(decode.beam_size, self.tokenizer.vocab_size)
        return decode

    def fits(self, ids: list[int]) -> bool:
        """Whether a text of these token ids, with its end-of-sentence token, fits the model's positions."""
        return len(ids) + 1 <= self.recipe.model.max_positions

    def _source_ids(self, sentences: list[str], truncate: bool) -> list[list[int] | None]:
        """Each sentence's token ids, cut to the model's positions (with a warning; truncate=False refuses),
        or None for a blank one (no pieces: spaces, or only characters SentencePiece drops, such as U+200B): it maps
        to "" rather than to whatever the model invents from an empty source."""
        limit = self.recipe.model.max_positions
        src_ids = self.tokenizer.encode(sentences)
        too_long = [i for i, ids in enumerate(src_ids) if not self.fits(ids)]
        if too_long:
            error = SourceTooLong(too_long, [len(src_ids[i]) + 1 for i in too_long], limit)
            if not truncate:
                raise error
            warnings.warn(f"{error}: truncated", stacklevel=3)  # at the caller of translate()
        return [ids[: limit - 1] if ids else None for ids in src_ids]

    def _translate(
        self, src_ids: list[list[int] | None], decode: DecodeConfig, n_best: int, sampling: Sampling | None, progress: bool,
        return_attention: bool = False, scores: bool = True,
    ) -> list[list[Translation]]:
        """Token ids from _source_ids -> each sentence's n_best translations (a blank one's are ""); without
        `scores`, greedy search may leave their scores NaN, which is faster."""
        limit = self.recipe.model.max_positions
        outputs = [[Translation("", 0.0)] * n_best for _ in src_ids]
        todo = np.array([i for i, ids in enumerate(src_ids) if ids is not None], dtype=np.int64)
        sizes = np.array([len(ids or ()) + 1 for ids in src_ids], dtype=np.int64)
        batches = sorted_batches(todo, sizes, decode.max_tokens)
        precision = self.precision(decode.precision)
        if not batches:  # nothing to decode (an option check, blank lines): no precision copy to build
            return outputs
        model, autocast = self._decoding(precision)
        for indices in tqdm(batches, desc="translating", unit="batch", disable=not progress):
            src = source_tensor([src_ids[i] for i in indices]).to(self.device)
            max_lens = max_output_lengths(src, PAD_ID, decode.max_len_a, decode.max_len_b, limit)
            with autocast:
                hypotheses = self._search(model, src, max_lens, decode, n_best, sampling, scores)
            # One SentencePiece call a batch: each of its batch calls starts a thread, which costs more than decoding a sentence.
            texts = iter(self.tokenizer.decode([h.tokens for hyps in hypotheses for h in hyps]))
            for i, hyps, max_len in zip(indices, hypotheses, max_lens):  # the maps in the model's own precision, outside autocast
                maps = [attention_maps(self.model, self.tokenizer, src_ids[i], h.tokens, ended=room_for_more(h.tokens, max_len))
                        if return_attention else None for h in hyps]
                outputs[i] = [Translation(next(texts), h.score, m) for h, m in zip(hyps, maps)]
        return outputs

    def _decoding(self, precision: Precision) -> tuple[Transformer | Ensemble, torch.autocast]:
        """The model to decode with at `precision` and the autocast to run it under (on for a GPU's bf16 or fp16)."""
        model = self.decoding_model(precision)
        return model, torch.autocast(self.device.type, dtype=precision.dtype, enabled=precision.dtype is not None and model is self.model)

    @staticmethod
    def _search(model: Transformer, src, max_lens: list[int], decode: DecodeConfig, n_best: int, sampling: Sampling | None,
                scores: bool) -> list[list[Hypothesis]]:
        if sampling is not None:
            return sample(model, src, max_lens, sampling, n_best)
        if decode.beam_size == 1:
            return [[h] for h in greedy_search(model, src, max_lens, scores)]
        return beam_search(model, src, max_lens, decode.beam_size, decode.alpha, n_best, decode.beam_stop)
