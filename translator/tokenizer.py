"""One joint SentencePiece model for source and target: train, load, encode, decode.

The ids of the special symbols are fixed so that the model and the tokenizer agree
without being told: pad 0, unk 1, bos 2, eos 3.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        specials = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"SentencePiece model has special ids (pad, unk, bos, eos) = {specials}, expected (0, 1, 2, 3)")

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        input_sentence_size: int = 2_000_000,
        seed: int = 0,
    ) -> Tokenizer:
        spm.set_random_generator_seed(seed)  # the sample of input sentences, and their shuffle
        model, failed = io.BytesIO(), []

        def read() -> Iterator[str]:  # SentencePiece reports the reader's own error as its "INTERNAL" RuntimeError: keep it
            try:
                yield from sentences
            except Exception as e:
                failed.append(e)
                raise

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=read(),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                hard_vocab_limit=False,  # small corpora get a smaller vocabulary instead of an error
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                unk_surface="\u2047",  # the default " \u2047 " adds spaces at each decode/encode round trip
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError:
            if failed:
                raise failed[0] from None
            raise
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str], sampling: float = 0.0, seed: int = 0) -> list[list[int]]:
        """Pieces of each text: the best segmentation, or with `sampling` > 0 one drawn at random
        (subword regularisation: unigram smoothing alpha, or the BPE-dropout probability), seeded."""
        if not sampling:
            return self.sp.encode(texts)
        spm.set_random_generator_seed(seed)
        return self.sp.encode(texts, enable_sampling=True, alpha=sampling, nbest_size=-1, num_threads=1)  # one thread: reproducible

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids, num_threads=1)  # a decoding worker runs one thread; the batch takes about a millisecond

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def id_pieces(self, ids: list[int]) -> list[str]:
        """The pieces of token ids, specials included ("<s>", "</s>")."""
        return [self.sp.id_to_piece(i) for i in ids]


def interleave(*columns: Iterable[str]) -> Iterator[str]:
    """Source and target sentences alternately, so that a sample of the stream covers both languages."""
    for row in zip(*columns):
        yield from row
