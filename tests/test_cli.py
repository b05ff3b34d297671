"""The command line end to end: train the tiny recipe, translate a pipe, evaluate a split."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY_RECIPE


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "translator", *args], input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_recipe_trains_end_to_end_and_loss_falls(tmp_path, toy_corpus):
    out = tmp_path / "run"
    result = run("train", str(TINY_RECIPE), "--set", f"data.path={toy_corpus}", "--set", f"out_dir={out}", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "M parameters" in result.stderr
    assert "BLEU" in result.stdout and "nrefs:1|case:mixed|eff:no|tok:13a" in result.stdout
    for name in ("config.json", "model.safetensors", "sentencepiece.model", "metrics.jsonl"):
        assert (out / name).is_file()
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in entries if "loss" in e]
    assert losses[-1] < 0.7 * losses[0]
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["data"]["path"] == str(toy_corpus)  # the resolved recipe


def test_translate_reads_stdin_and_writes_one_line_per_input_in_order(tiny_model_dir, tiny_translator):
    lines = ["Ein mann sieht der hut.", "", "Der alte hund trägt ein ball.", "Ein kind fährt."]
    result = run("translate", str(tiny_model_dir), "--beam-size", "1", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == tiny_translator.translate(lines, beam_size=1)
    assert result.stdout.splitlines()[1] == ""


def test_evaluate_prints_bleu_and_signature_and_writes_hypotheses(tiny_model_dir, tmp_path):
    hyps = tmp_path / "hyps.txt"
    result = run("evaluate", str(tiny_model_dir), "--split", "test", "--beam-size", "1", "--output", str(hyps), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert 0 <= scores["bleu"] <= 100 and "tok:13a" in scores["bleu_signature"]
    assert len(hyps.read_text().splitlines()) == 60


def test_usage_errors_exit_2_and_name_the_key(tmp_path):
    result = run("train", str(TINY_RECIPE), "--set", "model.d_modle=64")
    assert result.returncode == 2
    assert "model.d_modle" in result.stderr and "model.d_model" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("evaluate", str(tmp_path / "nope"))
    assert result.returncode == 2 and "nope" in result.stderr


@pytest.mark.slow
def test_training_is_reproducible_from_the_seed(tmp_path, toy_corpus):
    """Same recipe, same seed, same thread count: identical tokenizer and bitwise identical weights."""
    from safetensors.torch import load_file

    from translator import load_recipe, train

    def run_once(name, seed):
        out = tmp_path / name
        overrides = [f"data.path={toy_corpus}", f"out_dir={out}", "train.max_steps=20", "train.valid_every=20", f"seed={seed}", "train.threads=1"]
        train(load_recipe(TINY_RECIPE, overrides), progress=False)
        return (out / "sentencepiece.model").read_bytes(), load_file(out / "model.safetensors")

    spm_a, weights_a = run_once("a", 7)
    spm_b, weights_b = run_once("b", 7)
    _, weights_c = run_once("c", 8)
    assert spm_a == spm_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)  # the seed matters
