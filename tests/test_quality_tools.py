"""Checkpoint averaging and early stopping."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_RECIPE
from translator import Translator, load_recipe, train
from translator.checkpoint import WEIGHTS, CheckpointError, average_weights, training_checkpoints


def train_tiny(corpus, out, *overrides) -> None:
    train(load_recipe(TINY_RECIPE, [f"data.path={corpus}", f"out_dir={out}", *overrides]), progress=False)


def test_averaging_two_checkpoints_gives_the_elementwise_mean(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    wa = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    wb = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    save_file(wa, a / WEIGHTS)
    save_file(wb, b / WEIGHTS)
    mean = average_weights([a, b])
    for k in wa:
        assert torch.allclose(mean[k], (wa[k] + wb[k]) / 2, atol=1e-7)
        assert mean[k].dtype == torch.float32


def test_averaging_checkpoints_of_different_models_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, shape in ((a, (3, 4)), (b, (4, 4))):
        d.mkdir()
        save_file({"x": torch.zeros(shape)}, d / WEIGHTS)
    with pytest.raises(CheckpointError, match="do not match"):
        average_weights([a, b])


@pytest.mark.slow
def test_average_last_checkpoints_at_the_end_and_through_the_cli(tmp_path, toy_corpus, capfd):
    out = tmp_path / "run"
    train_tiny(toy_corpus, out, "train.max_steps=30", "train.checkpoint_every=10", "train.valid_every=30",
               "train.keep_checkpoints=3", "train.average_last=2")
    err = capfd.readouterr().err  # early weights pull back: said before training, and again at the end
    assert err.count("warning: the averaged checkpoints reach back to step 20 of 30") == 2
    assert err.index("reach back") < err.index("step 30: valid") < err.rindex("reach back")
    train_tiny(toy_corpus, tmp_path / "late", "train.max_steps=50", "train.checkpoint_every=5", "train.valid_every=50",
               "train.keep_checkpoints=3", "train.average_last=3")
    assert "warning: the averaged" not in capfd.readouterr().err  # steps 40, 45, 50: the last fifth
    step20, step30 = (load_file(p / WEIGHTS) for p in training_checkpoints(out)[-2:])
    final = load_file(out / WEIGHTS)
    assert all(torch.allclose(final[k], (step20[k] + step30[k]) / 2, atol=1e-6) for k in final)

    averaged = tmp_path / "averaged"
    result = subprocess.run([sys.executable, "-m", "translator", "average", *map(str, training_checkpoints(out)), "-o", str(averaged)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    three = [load_file(p / WEIGHTS) for p in training_checkpoints(out)]
    written = load_file(averaged / WEIGHTS)
    assert all(torch.allclose(written[k], sum(w[k] for w in three) / 3, atol=1e-6) for k in written)
    assert isinstance(Translator.from_pretrained(averaged).translate("Ein hund."), str)
    inside = subprocess.run([sys.executable, "-m", "translator", "average", *(p.name for p in training_checkpoints(out)), "-o", "../../inside"],
                            capture_output=True, text=True, cwd=out / "checkpoints")  # names without their folders
    assert inside.returncode == 0, inside.stderr
    assert all(torch.equal(load_file(tmp_path / "inside" / WEIGHTS)[k], written[k]) for k in written)
    first, second, last = training_checkpoints(out)
    (tmp_path / "latest").symlink_to(last, target_is_directory=True)
    relative = subprocess.run([sys.executable, "-m", "translator", "average", ".", f"../{second.name}", str(tmp_path / "latest"),
                               "-o", str(tmp_path / "relative")], capture_output=True, text=True, cwd=first)  # "..", and a link
    assert relative.returncode == 0, relative.stderr
    assert all(torch.equal(load_file(tmp_path / "relative" / WEIGHTS)[k], written[k]) for k in written)


@pytest.mark.slow
def test_a_run_too_short_for_average_last_says_so_with_no_negative_step(tmp_path, toy_corpus, capfd):
    train_tiny(toy_corpus, tmp_path / "run", "train.max_steps=4", "train.valid_every=4", "train.average_last=2")  # checkpoint_every 500
    err = capfd.readouterr().err
    assert "reach back to step 0 of 4" in err and "step -" not in err
    assert "warning: train.average_last is 2, and the run kept 1 checkpoints to average" in err


def test_average_last_must_fit_the_kept_checkpoints():
    with pytest.raises(ValueError, match="train.average_last"):
        load_recipe(TINY_RECIPE, ["train.average_last=3", "train.keep_checkpoints=2"])


@pytest.mark.slow
def test_early_stopping_after_patience_validations_without_improvement(tmp_path, toy_corpus):
    out = tmp_path / "run"
    # lr 0: the first validation sets the best BLEU and nothing ever beats it
    overrides = [f"data.path={toy_corpus}", f"out_dir={out}", "train.max_steps=200", "train.valid_every=5", "train.lr=1e-12",
                 "train.warmup_steps=0", "train.patience=2"]
    for resume in (False, True):  # resumed (say after a kill while testing), an early-stopped run stays stopped
        train(load_recipe(TINY_RECIPE, overrides), progress=False, resume=resume)
        entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        validations = [e for e in entries if "valid_bleu" in e]
        assert [v["step"] for v in validations] == [5, 10, 15]
        assert training_checkpoints(out)[-1].name == "step_00000015"
        # the best validation's checkpoint outlives keep_checkpoints, resumable like any other
        assert training_checkpoints(out)[0].name == "step_00000005"
        assert json.loads((training_checkpoints(out)[-1] / "state.json").read_text())["best_step"] == 5
        assert "test" in entries[-1]
