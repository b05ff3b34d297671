"""SentencePiece wrapper: fixed special ids, exact round trips, bytes in = bytes out."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import toy_pair
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, interleave

GERMAN = [
    "Zwei junge Männer spielen Fußball auf der Straße.",
    "Ein älterer Herr läuft über die Brücke.",
    "Die Kinder öffnen fröhlich ihre Geschenke.",
    "Eine Frau trägt einen grünen Hut und große Schuhe.",
    "Der Bär schläft müde unter einem Baum.",
    "Drei Mädchen hören Musik im Büro.",
    "Ein Hund springt über den Zaun, während es regnet.",
    "Über 20 Jahre alte Häuser stehen am Fluss.",
    "Ältere Leute essen Äpfel im Garten.",
]
ENGLISH = [
    "Two young men play football on the street.",
    "An older gentleman walks across the bridge.",
    "The children happily open their presents.",
    "A woman wears a green hat and big shoes.",
    "The bear sleeps tired under a tree.",
    "Three girls listen to music in the office.",
    "A dog jumps over the fence while it rains.",
    "Houses over 20 years old stand by the river.",
    "Older people eat apples in the garden.",
]


def corpus() -> list[str]:
    """A few hundred German and English sentences: the toy language plus real sentences with umlauts and ß."""
    rng = random.Random(7)
    sentences = []
    for _ in range(150):
        pair = toy_pair(rng)
        sentences += [pair["de"], pair["en"]]
    for de, en in zip(GERMAN, ENGLISH):
        for _ in range(10):
            sentences += [de, en]
    # Recombined real sentences so that words appear in several contexts.
    for a, b in itertools.product(GERMAN[:5], GERMAN[5:8]):
        sentences.append(a[:-1] + " und " + b[0].lower() + b[1:])
    return sentences


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def tokenizer(sentences) -> Tokenizer:
    return Tokenizer.train(sentences, vocab_size=300)


def alphabet(sentences: list[str]) -> str:
    return "".join(sorted(set("".join(sentences)) - {" "}))


def test_corpus_is_big_enough(sentences):
    assert len(sentences) >= 300
    assert {"ä", "ö", "ü", "ß", "Ü", "Ä"} <= set("".join(sentences))


def test_special_ids(tokenizer):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    sp = tokenizer.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.is_unknown(UNK_ID)
    for i in (PAD_ID, BOS_ID, EOS_ID):
        assert sp.is_control(i)


def test_vocab_size_is_bounded_by_the_request(tokenizer, sentences):
    assert 4 + len(alphabet(sentences)) <= tokenizer.vocab_size <= 300


def test_encode_adds_no_specials(tokenizer, sentences):
    for ids in tokenizer.encode(sentences):
        assert ids, "a non-empty sentence encodes to at least one piece"
        assert not {PAD_ID, UNK_ID, BOS_ID, EOS_ID} & set(ids)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_encode_empty_string(tokenizer):
    assert tokenizer.encode([""]) == [[]]
    assert tokenizer.decode([[]]) == [""]


def test_unseen_character_is_unk(tokenizer):
    (ids,) = tokenizer.encode(["Ein Hund Ω"])
    assert UNK_ID in ids
    assert ids.count(UNK_ID) == 1


def test_round_trip_on_training_sentences(tokenizer, sentences):
    assert tokenizer.decode(tokenizer.encode(sentences)) == sentences


def test_round_trip_on_new_sentences(tokenizer):
    new = [
        "Die Männer öffnen die Brücke über dem Büro.",
        "Große Häuser, grüne Bäume und müde Mädchen.",
        "A woman walks over the big bridge while the dog sleeps.",
        "Zwei Hunde laufen 20 Jahre.",
    ]
    assert tokenizer.decode(tokenizer.encode(new)) == new


def test_pieces_cover_the_text(tokenizer):
    text = "Der Bär läuft über die Straße."
    pieces = tokenizer.pieces(text)
    assert "".join(pieces).replace("\u2581", " ").strip() == text
    assert len(pieces) == len(tokenizer.encode([text])[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_property(tokenizer, sentences, data):
    """Any text made of seen characters with single spaces between words survives encode -> decode."""
    word = st.text(alphabet=alphabet(sentences), min_size=1, max_size=12)
    text = " ".join(data.draw(st.lists(word, min_size=1, max_size=8)))
    (ids,) = tokenizer.encode([text])
    assert UNK_ID not in ids
    assert tokenizer.decode([ids]) == [text]


def test_save_and_load_give_identical_encodings(tokenizer, sentences, tmp_path):
    path = tmp_path / "spm.model"
    tokenizer.save(path)
    assert path.read_bytes() == tokenizer.model_proto
    loaded = Tokenizer.load(path)
    assert loaded.model_proto == tokenizer.model_proto
    assert loaded.vocab_size == tokenizer.vocab_size
    probe = sentences[:50] + ["Ein Hund Ω", ""]
    assert loaded.encode(probe) == tokenizer.encode(probe)
    from_bytes = Tokenizer(tokenizer.model_proto)
    assert from_bytes.encode(probe) == tokenizer.encode(probe)
    assert from_bytes.decode(from_bytes.encode(probe)) == tokenizer.decode(tokenizer.encode(probe))


def test_train_accepts_a_generator_and_bpe(sentences):
    bpe = Tokenizer.train((s for s in sentences), vocab_size=200, model_type="bpe")
    assert bpe.sp.pad_id() == PAD_ID and bpe.sp.eos_id() == EOS_ID
    assert bpe.decode(bpe.encode(sentences[:40])) == sentences[:40]


def test_small_corpus_gets_a_smaller_vocabulary():
    # hard_vocab_limit=False: asking for more pieces than the corpus supports is not an error.
    tok = Tokenizer.train(["ein Hund", "a dog"] * 20, vocab_size=500)
    assert tok.vocab_size < 500
    assert tok.decode(tok.encode(["ein Hund"])) == ["ein Hund"]


def test_interleave():
    assert list(interleave(["d1", "d2"], ["e1", "e2"])) == ["d1", "e1", "d2", "e2"]
    assert list(interleave([], [])) == []
