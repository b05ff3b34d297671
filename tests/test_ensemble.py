"""Ensembles: every step decodes the log of the members' mean distribution, through every search and precision,
computed by each member's own cache; models that cannot decode together are refused."""

import json
import shutil

import pytest
import torch
from sentencepiece import sentencepiece_model_pb2

from conftest import TINY_RECIPE
from test_cli import run
from test_search import SENTENCES, assert_batched_beam_equals_reference, assert_grouped_encoding_equals_one_call, encode
from translator import Translator, evaluate, load_recipe, train
from translator.batching import source_tensor, target_tensors
from translator.checkpoint import CheckpointError
from translator.ensemble import Ensemble
from translator.search import forced_log_probs, greedy_search
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, toy_corpus):
    """Another tiny model of the same data and tokenizer settings (so the same SentencePiece model): another seed."""
    out = tmp_path_factory.mktemp("tiny_seed2")
    recipe = load_recipe(TINY_RECIPE, [f"data.path={toy_corpus}", f"out_dir={out}", "seed=2", "train.max_steps=100", "train.valid_every=100"])
    train(recipe, progress=False)
    return out


@pytest.fixture(scope="module")
def ensemble(tiny_model_dir, second_model_dir) -> Translator:
    return Translator.from_pretrained([tiny_model_dir, second_model_dir], device="cpu")


def mean_log_probs(members, src, tgt_in):
    """The reference: each member's own forward pass over the whole prefix (no cache), their distributions averaged."""
    return torch.stack([member(src, tgt_in).float().softmax(dim=-1) for member in members]).mean(dim=0).log()


def test_each_step_is_the_log_of_the_members_mean_distribution(ensemble):
    model = ensemble.model
    src = source_tensor(ensemble.tokenizer.encode(SENTENCES))
    torch.manual_seed(0)
    tokens = torch.randint(4, ensemble.tokenizer.vocab_size, (len(SENTENCES), 6))
    tgt_in = torch.cat([torch.full((len(SENTENCES), 1), BOS_ID), tokens], dim=1)
    with torch.inference_mode():
        state = model.start(*model.encode(src))
        steps = []
        for t in range(tgt_in.size(1)):  # one token a step, each member through its own cache
            outputs, state = model.decode(tgt_in[:, t : t + 1], state)
            steps.append(model.logits(outputs[:, -1]))
        expected = mean_log_probs(model.members, src, tgt_in)
        members = [member(src, tgt_in).float().log_softmax(dim=-1) for member in model.members]
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert all((member - expected).abs().max() > 1e-2 for member in members)  # the mean is neither member's


def test_an_ensemble_scores_a_target_by_the_log_of_the_members_mean_distribution(ensemble):
    model = ensemble.model
    src = source_tensor(ensemble.tokenizer.encode(SENTENCES))
    torch.manual_seed(1)
    tgt_in, tgt_out = target_tensors([torch.randint(4, ensemble.tokenizer.vocab_size, (n,)).tolist() for n in (3, 7, 0, 5, 2)])
    with torch.inference_mode():
        expected = mean_log_probs(model.members, src, tgt_in).gather(-1, tgt_out[..., None]).squeeze(-1)
        scores = forced_log_probs(model, src, tgt_in, tgt_out)
    torch.testing.assert_close(scores, torch.where(tgt_out != PAD_ID, expected, 0.0).sum(-1), atol=1e-4, rtol=1e-5)


def test_greedy_search_takes_the_argmax_of_the_mean_distribution(ensemble):
    model = ensemble.model
    src, max_lens = encode(ensemble, SENTENCES)
    with torch.inference_mode():
        for row, hyp in enumerate(greedy_search(model, src, max_lens)):
            real = src[row : row + 1, : int((src[row] != PAD_ID).sum())]
            tokens, score = [], 0.0
            while len(tokens) + 1 < max_lens[row]:
                logp = mean_log_probs(model.members, real, torch.tensor([[BOS_ID, *tokens]]))[0, -1]
                token = int(logp.argmax())
                score += float(logp[token])
                if token == EOS_ID:
                    break
                tokens.append(token)
            assert hyp.tokens == tokens
            assert abs(hyp.score - score) < 1e-4


def test_batched_beam_search_equals_the_slow_reference_over_the_mean_distribution(ensemble):
    """Beam reordering and sentences leaving the batch move every member's cache together."""
    members = ensemble.model.members
    assert_batched_beam_equals_reference(ensemble.model, lambda s, t: mean_log_probs(members, s, t), ensemble, beam_size=3)


def test_an_ensemble_encodes_in_groups_as_in_one_call(ensemble):
    assert_grouped_encoding_equals_one_call(ensemble.model, ensemble.tokenizer.vocab_size)


def test_an_ensemble_translates_a_sentence_the_same_alone_in_a_batch_and_in_workers(ensemble, tiny_model_dir, second_model_dir):
    batch = ensemble.translate(SENTENCES, beam_size=3, n_best=1)
    alone = [ensemble.translate([s], beam_size=3, n_best=1)[0] for s in SENTENCES]
    assert [hyps[0].text for hyps in batch] == [hyps[0].text for hyps in alone]
    assert all(abs(a[0].score - b[0].score) < 1e-4 for a, b in zip(batch, alone))
    in_workers = Translator.from_pretrained([tiny_model_dir, second_model_dir], device="cpu", workers=2)
    try:
        assert in_workers.translate(SENTENCES, beam_size=3) == [hyps[0].text for hyps in batch]
    finally:
        in_workers.close()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precision_copies_of_an_ensemble_decode_and_mostly_agree(ensemble, precision):
    sentences = SENTENCES * 2
    fp32 = ensemble.translate(sentences, beam_size=3)
    low = ensemble.translate(sentences, beam_size=3, precision=precision)
    assert isinstance(ensemble.decoding_model(ensemble.precision(precision)), Ensemble)
    assert sum(a == b for a, b in zip(fp32, low)) >= len(sentences) // 2


def test_models_that_cannot_decode_together_are_refused_naming_the_directory(tiny_model_dir, tmp_path):
    other_pieces = tmp_path / "other_pieces"  # the same pieces, one score changed: sources would segment differently
    shutil.copytree(tiny_model_dir, other_pieces)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((other_pieces / "sentencepiece.model").read_bytes())
    proto.pieces[10].score += 1.0
    (other_pieces / "sentencepiece.model").write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match="other_pieces: its SentencePiece model differs"):
        Translator.from_pretrained([tiny_model_dir, other_pieces], device="cpu")

    other_pair = tmp_path / "other_pair"
    shutil.copytree(tiny_model_dir, other_pair)
    config = json.loads((other_pair / "config.json").read_text())
    config["recipe"]["data"].update(src_lang="en", tgt_lang="de")
    (other_pair / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="other_pair: translates en to de"):
        Translator.from_pretrained([tiny_model_dir, other_pair], device="cpu")


def test_an_ensemble_refuses_what_only_one_model_has(ensemble, tmp_path):
    with pytest.raises(ValueError, match="empty list"):
        Translator.from_pretrained([], device="cpu")
    with pytest.raises(ValueError, match="return_attention"):
        ensemble.translate("Ein hund.", return_attention=True)
    with pytest.raises(ValueError, match="several model directories"):
        ensemble.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_the_command_line_translates_and_evaluates_with_an_ensemble(ensemble, tiny_model_dir, second_model_dir):
    dirs = [str(tiny_model_dir), str(second_model_dir)]
    result = run("translate", *dirs, "--beam-size", "3", "--quiet", stdin="\n".join(SENTENCES) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ensemble.translate(SENTENCES, beam_size=3)
    result = run("evaluate", *dirs, "--split", "validation", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bleu"] == pytest.approx(evaluate(ensemble, "validation").bleu)
