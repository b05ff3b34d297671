"""CTranslate2 export: the exported model decodes to exactly our greedy token ids; the command changes nothing when it fails."""

import json
import os
import stat

import pytest

from conftest import train_tiny
from test_errors import assert_usage_error, cli
from test_search import SENTENCES, encode
from translator import Translator
from translator.checkpoint import CheckpointError
from translator.export import export_ctranslate2
from translator.search import greedy_search

ctranslate2 = pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def sources(toy_corpus):
    test = [json.loads(line)["de"] for line in (toy_corpus / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    return SENTENCES + test + ["Hund.", "Ein " * 40 + "hund."]  # a one-word source, and one that hits the length limit


def ct2_greedy_ids(model_dir, translator, sentences, max_lens) -> list[list[int]]:
    ct2 = ctranslate2.Translator(str(model_dir), device="cpu", intra_threads=1)
    ids = []
    for sentence, max_len in zip(sentences, max_lens):
        # Our limit counts </s>: at most max_len - 1 tokens; min_decoding_length=0 lets </s> win at the first step, as ours can.
        (result,) = ct2.translate_batch([translator.tokenizer.pieces(sentence)], beam_size=1, min_decoding_length=0,
                                        max_decoding_length=max_len - 1)
        ids.append([translator.tokenizer.sp.piece_to_id(p) for p in result.hypotheses[0]])
    return ids


@pytest.fixture(scope="module")
def post_norm_model_dir(tmp_path_factory, toy_corpus):
    return train_tiny(tmp_path_factory.mktemp("post_norm"), toy_corpus, 100, "model.norm=post")


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_ctranslate2_greedy_ids_equal_ours_exactly(norm, tiny_model_dir, request, sources, tmp_path):
    model_dir = tiny_model_dir if norm == "pre" else request.getfixturevalue("post_norm_model_dir")
    translator = Translator.from_pretrained(model_dir)
    out = export_ctranslate2(model_dir, tmp_path / "ct2")
    assert {"model.bin", "sentencepiece.model", "shared_vocabulary.json", "config.json"} <= {p.name for p in out.iterdir()}
    src, max_lens = encode(translator, sources)
    ours = [h.tokens for h in greedy_search(translator.model, src, max_lens)]
    assert any(len(tokens) == n - 1 for tokens, n in zip(ours, max_lens))  # the length limit is exercised
    assert len({tuple(tokens) for tokens in ours}) > len(ours) // 2  # a trained model: the outputs differ by source
    assert ct2_greedy_ids(out, translator, sources, max_lens) == ours


def test_ctranslate2_int8_export_translates_close_to_ours(tiny_model_dir, tiny_translator, sources, tmp_path):
    out = export_ctranslate2(tiny_model_dir, tmp_path / "ct2_int8", quantization="int8")
    assert json.loads((out / "config.json").read_text()).get("layer_norm_epsilon") == pytest.approx(1e-5)
    fp32 = export_ctranslate2(tiny_model_dir, tmp_path / "ct2_fp32")
    assert (out / "model.bin").stat().st_size < 0.8 * (fp32 / "model.bin").stat().st_size  # int8 weights (the position table stays fp32)
    src, max_lens = encode(tiny_translator, sources)
    ours = [h.tokens for h in greedy_search(tiny_translator.model, src, max_lens)]
    int8 = ct2_greedy_ids(out, tiny_translator, sources, max_lens)
    assert sum(a == b for a, b in zip(int8, ours)) >= 0.8 * len(ours)


def test_export_command_writes_once_and_a_failure_changes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "ct2"
    result = cli("export", tiny_model_dir, "--to", "ctranslate2", out, "--quantization", "int8_float32")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # a directory a server's user can open, not mkdtemp's 0700
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_usage_error(cli("export", tiny_model_dir, "--to", "ctranslate2", out), "export", str(out), "exists")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert_usage_error(cli("export", tiny_model_dir, "--to", "ctranslate2", tmp_path / "other", "--quantization", "int3"), "export", "int3")
    assert_usage_error(cli("export", tmp_path / "no_model", "--to", "ctranslate2", tmp_path / "other"), "export", "no_model")
    assert_usage_error(cli("export", tiny_model_dir, tiny_model_dir, "--to", "ctranslate2", tmp_path / "other"),
                       "export", "takes one model directory", "got 3 paths", "not an ensemble")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]  # no staging directory left behind


def test_export_refuses_an_existing_directory_before_reading_the_model(tmp_path):
    (tmp_path / "ct2").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_ctranslate2(tmp_path / "whatever", tmp_path / "ct2")
