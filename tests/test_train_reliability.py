"""Training never leaves a run that no command accepts, never dies late on data that was there at
the start, and refuses a resume that would silently break its bitwise promise."""

import importlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RECIPE, write_toy_corpus
from translator import Translator, load_recipe, train
from translator.checkpoint import (
    CHECKPOINTS, WEIGHTS, CheckpointError, clean_interrupted_writes, save_training_checkpoint, training_checkpoints,
)
from translator.config import ModelConfig, RecipeError
from translator.data import DataError
from translator.distributed import World
from translator.model import Transformer

training = importlib.import_module("translator.train")


def recipe(corpus: Path, out: Path, *extra: str):
    return load_recipe(TINY_RECIPE, [f"data.path={corpus}", f"out_dir={out}", "train.max_steps=20", "train.valid_every=10",
                                     "train.checkpoint_every=10", *extra])


@pytest.mark.slow
def test_a_run_that_dies_before_its_first_checkpoint_starts_again_and_serves_nothing_meanwhile(tmp_path, toy_corpus, monkeypatch):
    out = tmp_path / "run"
    real_loss = training.loss_fn
    monkeypatch.setattr(training, "loss_fn", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="at step 1"):
        training.train(recipe(toy_corpus, out), progress=False)
    monkeypatch.undo()
    assert not training_checkpoints(out)
    with pytest.raises(CheckpointError, match="no trained weights"):  # never the random initial weights
        Translator.from_pretrained(out)
    with pytest.raises(RecipeError, match="no checkpoint to resume"):
        training.train(recipe(toy_corpus, out), progress=False, resume=True)
    training.train(recipe(toy_corpus, out), progress=False)  # the same folder starts afresh
    assert training_checkpoints(out)[-1].name == "step_00000020"
    Translator.from_pretrained(out)


class Killed(BaseException):
    """What SIGKILL or the OOM killer would do: nothing after it runs (not even `except Exception`)."""


@pytest.mark.slow
def test_a_run_killed_while_writing_its_first_checkpoint_starts_again(tmp_path, toy_corpus, monkeypatch):
    # The first validation is always the best so far: its weights and its checkpoint are written one after the other
    out = tmp_path / "run"
    monkeypatch.setattr(training, "save_training_checkpoint", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        training.train(recipe(toy_corpus, out), progress=False)
    monkeypatch.undo()
    assert not training_checkpoints(out) and not (out / WEIGHTS).exists()  # weights alone would make both commands refuse the folder
    training.train(recipe(toy_corpus, out), progress=False)  # the same folder starts afresh
    assert training_checkpoints(out)[-1].name == "step_00000020"


@pytest.mark.slow
def test_a_resume_that_turns_averaging_off_ends_on_the_best_checkpoints_weights(tmp_path, toy_corpus, capfd):
    out = tmp_path / "run"
    training.train(recipe(toy_corpus, out, "train.average_last=2"), progress=False)
    averaged = load_file(out / WEIGHTS)
    best_step = json.loads((training_checkpoints(out)[-1] / "state.json").read_text())["best_step"]
    capfd.readouterr()
    training.train(recipe(toy_corpus, out, "train.average_last=0"), progress=False, resume=True)
    assert f"model weights: the best validation, at step_{best_step:08d}" in capfd.readouterr().err
    weights, best = load_file(out / WEIGHTS), load_file(out / CHECKPOINTS / f"step_{best_step:08d}" / WEIGHTS)
    assert all(torch.equal(weights[k], best[k]) for k in best)
    assert not all(torch.equal(weights[k], averaged[k]) for k in averaged)  # the premise: the mean was other weights


@pytest.mark.slow
def test_a_recipe_without_a_test_split_trains_and_scores_nothing(tmp_path):
    corpus = write_toy_corpus(tmp_path / "data", sizes=(("train", 200), ("validation", 10)))
    out = tmp_path / "run"
    assert train(recipe(corpus, out, "data.test_split=null"), progress=False) == {}
    assert (out / "model.safetensors").exists()
    assert not any("test" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_max_len_must_fit_the_position_table():
    with pytest.raises(RecipeError, match=r"data.max_len: got 256, expected at most model.max_positions - 1 = 255"):
        load_recipe(TINY_RECIPE, ["data.max_len=256"])
    load_recipe(TINY_RECIPE, ["data.max_len=255"])


@pytest.mark.slow
def test_validation_pairs_longer_than_the_position_table_do_not_crash_validation(tmp_path, capfd):
    corpus = write_toy_corpus(tmp_path / "data")
    with open(corpus / "validation.jsonl", "a", encoding="utf-8") as f:  # 300 words: past the tiny model's 256 positions
        f.write(json.dumps({"de": " ".join(["ein hund"] * 150), "en": " ".join(["a dog"] * 150)}) + "\n")
    results = training.train(recipe(corpus, tmp_path / "run", "train.max_steps=10"), progress=False)
    assert results["greedy"].bleu >= 0
    assert "validation loss: 60 of 61 pairs (1 longer than model.max_positions" in capfd.readouterr().err


@pytest.mark.slow
def test_resume_refuses_a_changed_key_that_breaks_the_promise_and_allows_the_rest(tmp_path, toy_corpus, capfd):
    out = tmp_path / "run"
    training.train(recipe(toy_corpus, out, "train.max_steps=10"), progress=False)
    before = sorted(p.name for p in out.rglob("*"))
    for changed in ("model.d_ff=128", "train.lr=0.001", "seed=7", "tokenizer.vocab_size=100", "data.max_len=32"):
        key = changed.split("=")[0]
        with pytest.raises(RecipeError, match=rf"^{key}: the run was trained with .*, the recipe now says"):
            training.train(recipe(toy_corpus, out, "train.max_steps=20", changed), progress=False, resume=True)
    config = (out / "config.json").read_bytes()
    with pytest.raises(DataError, match="split 'nope' not found"):  # allowed changes, but a split that is not there
        training.train(recipe(toy_corpus, out, "train.max_steps=20", "decode.beam_size=2", "data.valid_split=nope"), progress=False, resume=True)
    assert sorted(p.name for p in out.rglob("*")) == before  # a refused resume changes nothing
    assert (out / "config.json").read_bytes() == config
    capfd.readouterr()
    training.train(recipe(toy_corpus, out, "train.max_steps=20", "train.patience=3", "decode.beam_size=2"), progress=False, resume=True)
    err = capfd.readouterr().err
    assert "resume: train.max_steps changed from 10 to 20" in err and "resume: decode.beam_size changed from 3 to 2" in err
    assert json.loads((out / "config.json").read_text())["recipe"]["decode"]["beam_size"] == 2


def small_model_and_optimizer():
    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1), vocab_size=30)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def test_leftovers_of_a_killed_write_are_cleaned_and_a_checkpoint_stepping_aside_is_put_back(tmp_path):
    model, optimizer = small_model_and_optimizer()
    save_training_checkpoint(tmp_path, 10, model, optimizer, {"step": 10}, keep=3)
    save_training_checkpoint(tmp_path, 20, model, optimizer, {"step": 20}, keep=3)
    root = tmp_path / CHECKPOINTS
    # What SIGKILL leaves: a half-written checkpoint, a half-written atomic file, and (killed between
    # the two renames of replacing step 20) the old step 20 stepping aside with no new one in place.
    (root / ".step_00000030.k2j3").mkdir()
    (root / ".step_00000030.k2j3" / WEIGHTS).write_bytes(b"half")
    (tmp_path / ".model.safetensors.abc.tmp").write_bytes(b"half")
    os.rename(root / "step_00000020", root / ".step_00000020.replaced")
    done = clean_interrupted_writes(tmp_path)
    assert "restored step_00000020" in done and len(done) == 3
    assert sorted(p.name for p in root.iterdir()) == ["step_00000010", "step_00000020"]
    assert not list(tmp_path.glob(".*"))
    assert json.loads((root / "step_00000020" / "state.json").read_text())["step"] == 20


def test_a_checkpoint_killed_while_being_deleted_is_never_listed_as_complete(tmp_path, monkeypatch):
    import translator.checkpoint as checkpoint

    model, optimizer = small_model_and_optimizer()
    for step in (10, 20):
        save_training_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=2)

    def killed_midway(path, **options):  # removes one file of the checkpoint, then the process dies
        if not Path(path).exists():
            return
        next(Path(path).glob("*")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 30, model, optimizer, {"step": 30}, keep=2)  # deletes step 10 to keep 2
    monkeypatch.undo()
    assert [p.name for p in training_checkpoints(tmp_path)] == ["step_00000020", "step_00000030"]
    assert clean_interrupted_writes(tmp_path) == ["removed .step_00000010.discarded"]
    assert not [p for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["no optimizer groups", "a foreign optimizer key"])
def test_a_checkpoint_with_a_damaged_optimizer_state_is_refused_naming_it(tmp_path, damage):
    from safetensors.torch import save_file

    from translator.checkpoint import OPTIMIZER, STATE, load_training_checkpoint

    model, optimizer = small_model_and_optimizer()
    checkpoint = save_training_checkpoint(tmp_path, 10, model, optimizer, {"step": 10}, keep=3)
    if damage == "no optimizer groups":
        (checkpoint / STATE).write_text(json.dumps({"step": 10}), encoding="utf-8")
    else:
        save_file({"first.exp_avg": torch.zeros(1)}, checkpoint / OPTIMIZER)
    with pytest.raises(CheckpointError, match=f"^{checkpoint}: the optimizer's state cannot be restored"):
        load_training_checkpoint(checkpoint, *small_model_and_optimizer())


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    model, optimizer = small_model_and_optimizer()
    save_training_checkpoint(tmp_path, 10, model, optimizer, {"step": 10, "mark": "old"}, keep=3)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_training_checkpoint(tmp_path, 10, model, optimizer, {"step": 10, "mark": "new"}, keep=3)
    (only,) = training_checkpoints(tmp_path)
    assert json.loads((only / "state.json").read_text())["mark"] == "new"
    name = next(iter(model.state_dict()))
    assert torch.equal(load_file(only / WEIGHTS)[name], model.state_dict()[name])
    assert not [p for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_training_starts_by_cleaning_what_a_killed_run_left(tmp_path, toy_corpus, capfd):
    out = tmp_path / "run"
    training.train(recipe(toy_corpus, out, "train.max_steps=10"), progress=False)
    (out / CHECKPOINTS / ".step_00000020.x1y2").mkdir()
    (out / ".config.json.q.tmp").write_text("half")
    training.train(recipe(toy_corpus, out), progress=False, resume=True)
    assert "removed .step_00000020.x1y2" in capfd.readouterr().err
    assert not [p for p in out.rglob(".*")]
    assert training_checkpoints(out)[-1].name == "step_00000020"


def test_an_fp16_overflow_skips_the_update_and_lowers_the_scale():
    """GradScaler's skip is what makes fp16 safe: force an overflow and check nothing moved."""
    torch.manual_seed(0)
    model, optimizer = small_model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients of 2^40 x the loss overflow
    batch = training.Batch.of([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_recipe(TINY_RECIPE).train
    autocast = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    training.train_step(model, optimizer, scheduler, [batch], autocast, cfg, scaler=scaler)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 2.0**39
    training.train_step(model, optimizer, scheduler, [batch], autocast, cfg, scaler=torch.amp.GradScaler("cpu"))
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a normal scale updates


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])  # 0: clipping off, and the gradient still checked
def test_a_non_finite_gradient_from_a_finite_loss_never_reaches_the_weights(clip_norm):
    torch.manual_seed(0)
    model, optimizer = small_model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = training.Batch.of([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]])
    cfg = replace(load_recipe(TINY_RECIPE).train, clip_norm=clip_norm)
    model.embedding.weight.register_hook(lambda grad: grad.index_fill(0, torch.tensor([5]), math.inf))  # one row overflows
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="gradient is not finite"):
        training.train_step(model, optimizer, scheduler, [batch], nullcontext, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_fp16_update_after_a_skipped_nan_loss_trains(monkeypatch):
    """train.on_nan=skip under fp16: the skipped step must leave the scaler ready for the next one."""
    torch.manual_seed(0)
    model, optimizer = small_model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    batch = training.Batch.of([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]])
    cfg = load_recipe(TINY_RECIPE).train
    autocast = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    real_loss = training.loss_fn
    monkeypatch.setattr(training, "loss_fn", lambda *args, **kwargs: real_loss(*args, **kwargs) * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="nan"):
        training.train_step(model, optimizer, scheduler, [batch], autocast, cfg, scaler=scaler)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.setattr(training, "loss_fn", real_loss)
    loss = training.train_step(model, optimizer, scheduler, [batch], autocast, cfg, scaler=scaler)
    assert math.isfinite(loss) and not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_decode_precision_the_device_cannot_validate_at_fails_before_training(tmp_path):
    """Validation decodes at decode.precision: int8 (CPU only) on a GPU must fail at once, not after
    the steps up to the first validation."""
    recipe = load_recipe(TINY_RECIPE, [f"out_dir={tmp_path / 'run'}", "decode.precision=int8"])
    with pytest.raises(RecipeError, match="decode.precision: int8"):
        training.setup(recipe, World(), torch.device("cuda", 0), resume=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resume_that_changes_the_batches_per_update_warns(tmp_path, toy_corpus, capfd):
    out = tmp_path / "run"
    training.train(recipe(toy_corpus, out, "train.max_steps=10"), progress=False)
    capfd.readouterr()
    training.train(recipe(toy_corpus, out, "train.accum_steps=2"), progress=False, resume=True)
    assert "batches per update (processes x train.accum_steps) go from 1 to 2" in capfd.readouterr().err
