"""Sequence-level knowledge distillation (Kim and Rush, 2016): a trained model, the teacher,
translates the training sources, and a new model, the student, trains on the original pairs and
the teacher's (source, translation) pairs together.

    translator distill runs/multi30k_en_de runs/multi30k_en_de_distilled_data [--rerank-with runs/multi30k_de_en]
    translator train recipes/multi30k_en_de_distilled.yaml

The output is a folder of line-aligned text that `data.path` reads (`{split}.{lang}`): the training
split holds the original pairs, then the teacher's; validation and test are copied as they are,
so the student is validated and tested against the references, never against the teacher.
"""

from __future__ import annotations

from pathlib import Path

from .api import Translator
from .checkpoint import staged_directory
from .config import DataConfig
from .data import DataError, load_split, texts


def distill(teacher: Translator, out_dir: str | Path, data: DataConfig | None = None, progress: bool = False,
            rerank: Translator | None = None, rerank_weight: float | None = None) -> int:
    """Write the distilled folder for `data` (default: the teacher's own recipe's) to `out_dir`; return
    the number of training sentences translated. The files are written into a folder beside `out_dir`
    and renamed onto it at the end: a failure leaves `out_dir` as it was, and a path that cannot be
    written fails at once, not after hours of translating. The splits are held in memory meanwhile.
    `rerank`, `rerank_weight`: the teacher's beam reranked by a model of the reverse pair, as in translate()."""
    data = data or teacher.recipe.data
    splits = dict.fromkeys(s for s in (data.train_split, data.valid_split, data.test_split) if s)
    with staged_directory(Path(out_dir)) as staging:
        for split in splits:
            pairs = load_split(data, split)
            splits[split] = texts(pairs["src"]), texts(pairs["tgt"])
            _refuse_line_breaks(split, *splits[split])
        sources, references = splits[data.train_split]
        translations = teacher.translate(sources, progress=progress, rerank=rerank, rerank_weight=rerank_weight)
        splits[data.train_split] = sources + sources, references + translations
        for split, (src, tgt) in splits.items():
            for lang, lines in ((data.src_lang, src), (data.tgt_lang, tgt)):
                (staging / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(sources)


def _refuse_line_breaks(split: str, sources: list[str], targets: list[str]) -> None:
    """A sentence holding a line break would shift every line after it in line-aligned files."""
    for side, sentences in (("source", sources), ("target", targets)):
        for number, sentence in enumerate(sentences, start=1):
            if "\n" in sentence or "\r" in sentence:
                raise DataError(f"split {split!r}, pair {number}: the {side} sentence holds a line break, "
                                "which one line of a line-aligned file cannot; remove it from the data first")
