"""BLEU and chrF with sacreBLEU, on detokenized text: the one scoring path for validation and test."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from .api import Translator
from .checkpoint import staged_text_file
from .config import DataConfig, RecipeError
from .data import DataError, load_split, texts


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_detail: str  # sacreBLEU's line: n-gram precisions, brevity penalty, lengths

    def __str__(self) -> str:
        return (
            f"BLEU = {self.bleu:.2f}  chrF = {self.chrf:.2f}\n"
            f"  {self.bleu_detail}\n  BLEU signature: {self.bleu_signature}\n  chrF signature: {self.chrf_signature}"
        )

    def to_dict(self) -> dict[str, float | str]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ISO 639-2/3 codes of the languages sacreBLEU tokenizes apart, which it knows by their two-letter codes only
THREE_LETTER_CODES = {"zho": "zh", "chi": "zh", "cmn": "zh", "jpn": "ja", "kor": "ko"}


def language_of(code: str) -> str:
    """The language of a code, as sacreBLEU's tokenizer choice reads it: zh-CN, zh_Hans, ZH and cmn are zh."""
    language = code.lower().replace("_", "-").split("-")[0]
    return THREE_LETTER_CODES.get(language, language)


def bleu_metric(tgt_lang: str = "", tokenize: str | None = None, lowercase: bool = False) -> BLEU:
    """sacreBLEU's BLEU with `tokenize`, or with the tokenizer sacreBLEU picks for the target language
    (zh for Chinese, ja-mecab for Japanese, ko-mecab for Korean, 13a for the rest); cased unless `lowercase`.
    Given a region or script (zh-CN, zh_Hans, ja-JP), sacreBLEU would take 13a: the language alone decides."""
    try:
        return BLEU(tokenize=tokenize, trg_lang=language_of(tgt_lang), lowercase=lowercase)
    except RuntimeError as e:  # mecab's dictionaries are extras of sacreBLEU
        extra = "sacrebleu[ko]" if "Korean" in str(e) else "sacrebleu[ja]"
        raise RecipeError(f"BLEU for data.tgt_lang={tgt_lang!r} (evaluate.tokenize={tokenize!r}) needs `pip install {extra}`, "
                          "or another tokenizer, e.g. --set evaluate.tokenize=char") from None
    except OSError as e:  # flores101, flores200: a SentencePiece model fetched on first use, into sacreBLEU's cache
        raise RecipeError(f"BLEU with evaluate.tokenize={tokenize!r} downloads its SentencePiece model into sacreBLEU's cache "
                          f"(~/.sacrebleu, or $SACREBLEU) the first time, and that failed ({e}): run it once with network "
                          "access, or choose another tokenizer") from None


def score(hypotheses: list[str], references: list[str], tgt_lang: str = "", tokenize: str | None = None, lowercase: bool = False) -> Scores:
    """Corpus BLEU (tokenized as `bleu_metric` says) and chrF of detokenized hypotheses against one reference
    each, both cased unless `lowercase`. chrF compares character n-grams and needs no tokenizer, in any language."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu, chrf = bleu_metric(tgt_lang, tokenize, lowercase), CHRF(lowercase=lowercase)
    bleu_result = bleu.corpus_score(hypotheses, [references])
    chrf_result = chrf.corpus_score(hypotheses, [references])
    return Scores(bleu_result.score, chrf_result.score, str(bleu.get_signature()), str(chrf.get_signature()), str(bleu_result))


def evaluate(
    translator: Translator,
    split: str | None = None,
    data: DataConfig | None = None,
    beam_size: int | None = None,
    output: str | Path | None = None,
    progress: bool = False,
    rerank: Translator | None = None,
    rerank_weight: float | None = None,
) -> Scores:
    """Translate a dataset split and score it.

    Args:
        translator: the model to evaluate.
        split: the split name in the dataset; default `data.test_split`.
        data: where the data is and which languages; default the model's own recipe.
        beam_size: 1 for greedy; default the recipe's `decode.beam_size`.
        output: if given, write the hypotheses there, one a line.
        rerank, rerank_weight: a model of the reverse pair to rerank the beam with (`Translator.translate`).
    """
    data = data or translator.recipe.data
    split = split or data.test_split
    if not split:
        raise DataError("no split to evaluate: data.test_split is null; name the split (--split on the command line)")
    bleu_metric(data.tgt_lang, translator.recipe.evaluate.tokenize)  # a missing tokenizer fails before translating
    pairs = load_split(data, split)
    with staged_text_file(Path(output)) if output is not None else nullcontext() as file:  # a bad path fails now
        hypotheses = translator.translate(texts(pairs["src"]), beam_size=beam_size, progress=progress, rerank=rerank, rerank_weight=rerank_weight)
        if file is not None:
            file.write("".join(h + "\n" for h in hypotheses))
    settings = translator.recipe.evaluate
    return score(hypotheses, texts(pairs["tgt"]), data.tgt_lang, settings.tokenize, settings.lowercase)
