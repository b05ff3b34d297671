"""train.init_from: fine-tuning, a run that starts from a trained model's weights and SentencePiece model
(a new optimizer, schedule and step count)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RECIPE, train_tiny
from test_errors import assert_usage_error, cli
from translator import load_recipe
from translator.checkpoint import SPM, WEIGHTS
from translator.config import RecipeError
from translator.distributed import World

training = importlib.import_module("translator.train")


def fine_tuning(corpus: Path, out: Path, init: Path, *overrides: str):
    return load_recipe(TINY_RECIPE, [f"data.path={corpus}", f"out_dir={out}", f"train.init_from={init}", *overrides])


def valid_bleu(out: Path) -> float:
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["valid_bleu"] for e in entries if "valid_bleu" in e][-1]


def test_a_fine_tuned_run_starts_from_the_models_weights_and_sentencepiece_model(tmp_path, toy_corpus, tiny_model_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a fine-tuned run trains no SentencePiece model")

    monkeypatch.setattr(training.Tokenizer, "train", no_training)
    monkeypatch.chdir(tiny_model_dir.parent)  # init_from relative to the working directory
    recipe = training.resolved(fine_tuning(toy_corpus, tmp_path / "tuned", tiny_model_dir.name, "model.dropout=0.1"))  # dropout may change
    run, state = training.setup(recipe, World(), torch.device("cpu"), resume=False)
    run.log.close()
    trained = load_file(tiny_model_dir / WEIGHTS)
    assert run.model.state_dict().keys() == trained.keys()
    assert all(torch.equal(tensor, trained[name]) for name, tensor in run.model.state_dict().items())
    assert run.tokenizer.model_proto == (tiny_model_dir / SPM).read_bytes()
    assert state.step == 0 and run.scheduler.last_epoch == 0  # a new schedule: warmup starts again
    assert (tmp_path / "tuned" / SPM).read_bytes() == (tiny_model_dir / SPM).read_bytes()
    stored = json.loads((tmp_path / "tuned" / "config.json").read_text())["recipe"]["train"]["init_from"]
    assert stored == str(tiny_model_dir.resolve())  # absolute: the model directory says where it came from, from any folder


@pytest.mark.slow
def test_fine_tuning_keeps_what_the_model_learned_where_training_afresh_has_not_learned_it(tmp_path, toy_corpus, tiny_model_dir):
    """Ten updates at a low learning rate: from the trained model, validation BLEU stays near its own; from
    fresh weights, the same ten updates translate next to nothing yet."""
    steps = ["train.max_steps=10", "train.valid_every=10", "train.lr=0.0001", "train.warmup_steps=2"]
    training.train(fine_tuning(toy_corpus, tmp_path / "tuned", tiny_model_dir, *steps), progress=False)
    train_tiny(tmp_path / "afresh", toy_corpus, 10, *steps[2:])
    trained = valid_bleu(tiny_model_dir)
    assert valid_bleu(tmp_path / "tuned") > 0.7 * trained and valid_bleu(tmp_path / "afresh") < 0.2 * trained
    assert (tmp_path / "tuned" / SPM).read_bytes() == (tiny_model_dir / SPM).read_bytes()


@pytest.mark.parametrize("overrides, named", [
    (["model.n_heads=1"], ["model.n_heads is 2 there, 1 here"]),  # no tensor's shape shows it
    (["model.d_ff=128", "model.norm=post"], ["model.d_ff is 64 there, 128 here", "model.norm is 'pre' there, 'post' here"]),
    (["tokenizer.vocab_size=300"], ["tokenizer.vocab_size is 200 there, 300 here"]),
])
def test_a_recipe_of_another_shape_or_vocabulary_is_refused_naming_the_keys_and_nothing_is_written(tmp_path, toy_corpus, tiny_model_dir,
                                                                                                  overrides, named):
    with pytest.raises(RecipeError, match="train.init_from") as refused:
        training.setup(fine_tuning(toy_corpus, tmp_path / "tuned", tiny_model_dir, *overrides), World(), torch.device("cpu"), resume=False)
    assert all(key in str(refused.value) for key in named), refused.value
    assert not (tmp_path / "tuned").exists()


def test_cli_init_from_a_folder_that_holds_no_model_exits_2_naming_it(tmp_path, toy_corpus):
    (tmp_path / "empty").mkdir()
    for init in (tmp_path / "missing", tmp_path / "empty"):
        line = assert_usage_error(cli("train", TINY_RECIPE, "--set", f"data.path={toy_corpus}", "--set", f"out_dir={tmp_path / 'tuned'}",
                                      "--set", f"train.init_from={init}", "--quiet"), "train", "train.init_from", str(init))
        assert not (tmp_path / "tuned").exists(), line


def test_a_training_checkpoint_is_refused_with_the_command_that_makes_it_a_model_directory(tmp_path, toy_corpus, tiny_model_dir):
    checkpoint = training.training_checkpoints(tiny_model_dir)[-1]
    with pytest.raises(RecipeError, match=re.escape(f"translator average {checkpoint} -o DIR")):
        training.setup(fine_tuning(toy_corpus, tmp_path / "tuned", checkpoint), World(), torch.device("cpu"), resume=False)
    assert not (tmp_path / "tuned").exists()
    made = cli("average", checkpoint, "-o", tmp_path / "model")
    assert made.returncode == 0, made.stderr
    run, _ = training.setup(fine_tuning(toy_corpus, tmp_path / "tuned", tmp_path / "model"), World(), torch.device("cpu"), resume=False)
    run.log.close()
    weights = load_file(checkpoint / WEIGHTS)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in run.model.state_dict().items())


@pytest.mark.slow
def test_a_fine_tuned_run_resumes_exactly(tmp_path, toy_corpus, tiny_model_dir):
    """Resuming reads the run's own checkpoint, not the model it started from (which may be gone since)."""
    init = tmp_path / "init"
    shutil.copytree(tiny_model_dir, init)
    settings = ["train.valid_every=20", "train.checkpoint_every=10", "model.dropout=0.1"]
    training.train(fine_tuning(toy_corpus, tmp_path / "straight", init, "train.max_steps=20", *settings), progress=False)
    training.train(fine_tuning(toy_corpus, tmp_path / "stopped", init, "train.max_steps=10", *settings), progress=False)
    shutil.rmtree(init)
    training.train(fine_tuning(toy_corpus, tmp_path / "stopped", init, "train.max_steps=20", *settings), progress=False, resume=True)
    straight, resumed = (load_file(training.training_checkpoints(tmp_path / run)[-1] / WEIGHTS) for run in ("straight", "stopped"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
