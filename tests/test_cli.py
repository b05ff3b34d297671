"""The command line end to end: train the tiny recipe, translate a pipe, evaluate a split."""

import json
import os
import stat
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


def test_evaluate_scores_the_recipes_test_split_unless_told_another(tiny_model_dir):
    def scores(*flags):
        return run("evaluate", str(tiny_model_dir), "--beam-size", "1", "--json", "--quiet", *flags)

    named, by_recipe = scores("--split", "validation"), scores("--set", "data.test_split=validation")
    assert named.returncode == by_recipe.returncode == 0, named.stderr + by_recipe.stderr
    assert json.loads(by_recipe.stdout) == json.loads(named.stdout)  # not the split named "test"
    none = scores("--set", "data.test_split=null")
    assert none.returncode == 2 and "data.test_split" in none.stderr and "--split" in none.stderr


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


# --- translate: n-best, sampling, length penalty, files, precision, pipes, bad bytes ------------

from test_errors import assert_usage_error, cli  # noqa: E402

from translator import Sampling  # noqa: E402

SOURCES = ["Ein mann sieht der hut.", "", "Der alte hund trägt ein ball und der fahrrad.", "Ein kind fährt."]
STDIN = "\n".join(SOURCES) + "\n"


def test_translate_n_best_writes_index_score_text_best_first(tiny_model_dir, tiny_translator):
    result = cli("translate", tiny_model_dir, "--beam-size", "4", "--n-best", "3", "--alpha", "0.8", "--quiet", stdin=STDIN)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    expected = tiny_translator.translate(SOURCES, beam_size=4, n_best=3, alpha=0.8)
    assert [int(r[0]) for r in rows] == [i for i in range(len(SOURCES)) for _ in range(3)]
    assert [r[2] for r in rows] == [h.text for hyps in expected for h in hyps]
    assert [float(r[1]) for r in rows] == pytest.approx([h.score for hyps in expected for h in hyps], abs=1e-4)
    assert [r[2] for r in rows[::3]] == tiny_translator.translate(SOURCES, beam_size=4, alpha=0.8)  # the first of each is the 1-best


def test_translate_alpha_reaches_the_search(tiny_model_dir, tiny_translator):
    for alpha in ("0", "2.5"):
        result = cli("translate", tiny_model_dir, "--beam-size", "4", "--n-best", "4", "--alpha", alpha, "--quiet", stdin=STDIN)
        scores = [float(line.split("\t")[1]) for line in result.stdout.splitlines()]
        expected = tiny_translator.translate(SOURCES, beam_size=4, n_best=4, alpha=float(alpha))
        assert scores == pytest.approx([h.score for hyps in expected for h in hyps], abs=1e-4)


def test_translate_beam_stop_reaches_the_search(tiny_model_dir, tiny_translator):
    expected = {stop: tiny_translator.translate(SOURCES, beam_size=4, n_best=4, alpha=2.5, beam_stop=stop) for stop in ("exact", "first_k")}
    assert expected["exact"] != expected["first_k"]  # the premise: the two rules tell these sentences apart
    for stop, hypotheses in expected.items():
        result = cli("translate", tiny_model_dir, "--beam-size", "4", "--n-best", "4", "--alpha", "2.5", "--beam-stop", stop, "--quiet", stdin=STDIN)
        assert [line.split("\t")[2] for line in result.stdout.splitlines()] == [h.text for hyps in hypotheses for h in hyps]


def test_translate_samples_with_a_seed_like_the_api(tiny_model_dir, tiny_translator):
    args = ("translate", tiny_model_dir, "--sample", "--temperature", "1.5", "--top-k", "20", "--top-p", "0.95", "--seed", "3", "--n-best", "2", "--quiet")
    first, again = cli(*args, stdin=STDIN), cli(*args, stdin=STDIN)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    expected = tiny_translator.translate(SOURCES, sampling=Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=3), n_best=2)
    assert [line.split("\t")[2] for line in first.stdout.splitlines()] == [h.text for hyps in expected for h in hyps]


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "0.5"], "--temperature"),
    (["--sample", "--beam-size", "3"], "--beam-size"),
    (["--sample", "--top-p", "1.5"], "--top-p"),
    (["--chunk-lines", "0"], "--chunk-lines"),
    (["--chunk-lines", "-3"], "--chunk-lines"),
    (["--n-best", "9", "--beam-size", "2"], "--n-best 9"),
    (["--precision", "int4"], "--precision"),
    (["--workers", "0"], "--workers"),
    (["--set", "data.src_lang=en", "--set", "data.tgt_lang=de"], "this model translates de to en, not en to de"),
    (["--alpha", "1000"], "--alpha: got 1000"),  # the flag named, not the recipe's decode.alpha
    (["--set", "decode.alpha=1000"], "decode.alpha: got 1000"),
    (["-o", "."], "--output .: is a folder"),
])
def test_translate_bad_flags_are_usage_errors(tiny_model_dir, flags, named):
    result = cli("translate", tiny_model_dir, *flags, "--quiet", stdin=STDIN)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr and result.stdout == ""


def test_translate_checks_its_options_before_reading_any_input(tiny_model_dir):
    result = cli("translate", tiny_model_dir, "--alpha", "1000", "--quiet", stdin="")  # an empty input: nothing to translate
    assert result.returncode == 2 and "--alpha: got 1000" in result.stderr, result.stderr


def test_translate_files_in_and_out(tiny_model_dir, tiny_translator, tmp_path):
    source, target = tmp_path / "in.de", tmp_path / "out.en"
    source.write_text(STDIN, encoding="utf-8")
    result = cli("translate", tiny_model_dir, "-i", source, "-o", target, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert target.read_text(encoding="utf-8").splitlines() == tiny_translator.translate(SOURCES)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as a shell's > would make it, not mkstemp's 0600


def test_translate_and_evaluate_with_two_workers_give_what_one_process_gives(tiny_model_dir, tiny_translator):
    result = cli("translate", tiny_model_dir, "--workers", "2", "--beam-size", "3", "--chunk-lines", "4", "--quiet", stdin=STDIN * 3)  # the same workers, chunk after chunk
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == tiny_translator.translate(SOURCES * 3, beam_size=3)
    alone, in_workers = (json.loads(cli("evaluate", tiny_model_dir, "--split", "test", "--json", "--quiet", *flags).stdout)
                         for flags in ((), ("--workers", "2")))
    assert in_workers == alone


def test_translate_that_fails_leaves_no_output_file(tiny_model_dir, tmp_path):
    source, target = tmp_path / "in.de", tmp_path / "out.en"
    source.write_text("Ein kind.\n" * 5 + "Ein mann sieht der hut. " * 200 + "\n", encoding="utf-8")
    result = cli("translate", tiny_model_dir, "-i", source, "-o", target, "--no-truncate", "--chunk-lines", "2", "--quiet")
    assert result.returncode == 2 and f"{source}, line 6: longer than model.max_positions" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.de"]  # neither the output nor its staging file
    assert_usage_error(cli("translate", tiny_model_dir, "-i", tmp_path / "missing.de", "--quiet"), "translate", "missing.de")
    assert_usage_error(cli("translate", tiny_model_dir, "-i", tmp_path, "--quiet"), "translate", str(tmp_path), "is a folder")
    for verb in ("translate", "evaluate"):
        assert_usage_error(cli(verb, tiny_model_dir, "-o" if verb == "translate" else "--output", tmp_path / "no" / "out.en", "--quiet"),
                           verb, f"no such folder {tmp_path / 'no'}")


def test_translate_reads_its_input_from_a_pipe(tiny_model_dir, tiny_translator):
    """-i takes what is not a regular file but reads as one: /dev/stdin, a named pipe, bash's <(zcat in.gz)."""
    result = cli("translate", tiny_model_dir, "-i", "/dev/stdin", "--quiet", stdin=STDIN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == tiny_translator.translate(SOURCES)


def test_translate_and_evaluate_say_the_precision_unless_quiet(tiny_model_dir, tiny_translator):
    loud = cli("translate", tiny_model_dir, "--precision", "int8", "--device", "cpu", stdin=STDIN)
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.count("precision: int8 (asked for)") == 1 and "device: cpu" in loud.stderr
    assert loud.stdout.splitlines() == tiny_translator.translate(SOURCES, precision="int8")
    auto = cli("evaluate", tiny_model_dir, "--precision", "auto", "--beam-size", "1", "--json")
    assert auto.returncode == 0, auto.stderr
    assert auto.stderr.count(f"precision: {tiny_translator.precision('auto')}") == 1 and "(auto: " in auto.stderr
    quiet = cli("evaluate", tiny_model_dir, "--precision", "int8", "--beam-size", "1", "--json", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_translate_into_a_closed_pipe_ends_quietly_with_141(tiny_model_dir):
    process = subprocess.Popen([sys.executable, "-m", "translator", "translate", str(tiny_model_dir), "--quiet", "--chunk-lines", "5"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line is written, as `| head -0`
    _, stderr = process.communicate(STDIN.encode() * 10, timeout=600)
    assert process.returncode == 141, stderr
    assert stderr == b""


@pytest.mark.parametrize("via_file", [False, True])
def test_invalid_utf8_lines_are_translated_with_a_warning_and_the_rest_is_kept(tiny_model_dir, tiny_translator, tmp_path, via_file):
    data = b"Ein mann sieht der hut.\nEin \xff\xfe hund.\n\x00\x01\x02\x80binary\r\nEin kind f\xc3\xa4hrt.\n"
    args = ["-i", tmp_path / "in.de"] if via_file else []
    (tmp_path / "in.de").write_bytes(data)
    result = cli("translate", tiny_model_dir, *args, "--quiet", stdin=b"" if via_file else data)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert [lines[0], lines[3]] == tiny_translator.translate(["Ein mann sieht der hut.", "Ein kind fährt."])
    assert lines[1] == tiny_translator.translate("Ein \ufffd\ufffd hund.")
    name = str(tmp_path / "in.de") if via_file else "stdin"
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2 and f"{name}, line 2: not valid UTF-8" in warnings[0] and f"{name}, line 3" in warnings[1]
