"""The training step: accumulation is exact, a non-finite loss stops training and loses nothing."""

import importlib
from contextlib import nullcontext

import pytest
import torch

from conftest import TINY_RECIPE
from translator import load_recipe
from translator.batching import source_tensor, target_tensors
from translator.checkpoint import load_training_checkpoint, training_checkpoints
from translator.config import ModelConfig, TrainConfig
from translator.trainset import Batch
from translator.model import Transformer
from translator.tokenizer import Tokenizer

training = importlib.import_module("translator.train")  # `translator.train` the attribute is the function


def make_batch(src_rows, tgt_rows) -> Batch:
    return Batch(source_tensor(src_rows), *target_tensors(tgt_rows))


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_batches_give_the_gradient_of_one_batch_holding_them_all():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.0), vocab_size=30)
    g = torch.Generator().manual_seed(1)
    rows = lambda n, length: [torch.randint(4, 30, (length,), generator=g).tolist() for _ in range(n)]  # noqa: E731
    src1, tgt1, src2, tgt2 = rows(3, 4), rows(3, 6), rows(2, 7), rows(2, 2)  # different lengths and token counts
    cfg = TrainConfig(clip_norm=0.0, label_smoothing=0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)

    two = [make_batch(src1, tgt1), make_batch(src2, tgt2)]
    loss = training.train_step(model, sgd, scheduler, two, nullcontext, cfg)
    accumulated = gradients(model)
    one = make_batch(src1 + src2, tgt1 + tgt2)
    one_loss = training.train_step(model, sgd, scheduler, [one], nullcontext, cfg)
    assert sum(b.n_tgt_tokens for b in two) == one.n_tgt_tokens == 3 * 7 + 2 * 3
    assert abs(loss - one_loss) < 1e-5
    one_batch = gradients(model)
    assert all(torch.allclose(accumulated[n], one_batch[n], atol=1e-6) for n in one_batch)


def make_loss_nan(monkeypatch, on_call) -> None:
    """From now on, training's loss is NaN on the calls for which on_call(call number, from 1) is true."""
    real_loss, calls = training.loss_fn, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        return value * float("nan") if on_call(len(calls)) else value

    monkeypatch.setattr(training, "loss_fn", loss)


@pytest.mark.slow
def test_a_nan_loss_stops_training_naming_the_step_and_the_last_checkpoint_loads(tmp_path, toy_corpus, monkeypatch):
    make_loss_nan(monkeypatch, lambda call: call > 25)
    out = tmp_path / "run"
    recipe = load_recipe(TINY_RECIPE, [f"data.path={toy_corpus}", f"out_dir={out}", "train.max_steps=60", "train.checkpoint_every=10",
                                       "train.valid_every=100"])
    with pytest.raises(FloatingPointError, match=r"nan at step 26.*checkpoints"):
        training.train(recipe, progress=False)
    last = training_checkpoints(out)[-1]
    assert last.name == "step_00000020"
    model = Transformer(recipe.model, Tokenizer.load(out / "sentencepiece.model").vocab_size)
    state = load_training_checkpoint(last, model, torch.optim.AdamW(model.parameters()))
    assert state["step"] == 20 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_a_nan_loss_is_skipped_with_a_warning_when_the_recipe_says_so(tmp_path, toy_corpus, monkeypatch):
    make_loss_nan(monkeypatch, lambda call: call == 5)
    out = tmp_path / "run"
    recipe = load_recipe(TINY_RECIPE, [f"data.path={toy_corpus}", f"out_dir={out}", "train.max_steps=20", "train.valid_every=20",
                                       "train.on_nan=skip"])
    training.train(recipe, progress=False)
    entries = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"skipped"' in line]
    assert len(entries) == 1 and '"step": 5' in entries[0]
    model = Transformer(recipe.model, Tokenizer.load(out / "sentencepiece.model").vocab_size)
    load_training_checkpoint(training_checkpoints(out)[-1], model, torch.optim.AdamW(model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rdrop_adds_alpha_times_the_symmetric_kl_of_two_dropout_passes():
    batch = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]])
    cfg = TrainConfig(label_smoothing=0.1, rdrop_alpha=5.0)
    plain = TrainConfig(label_smoothing=0.1)
    torch.manual_seed(0)
    no_dropout = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.0), vocab_size=30)
    # Without dropout both passes agree: no KL, and the loss is the plain one.
    torch.testing.assert_close(training.loss_fn(no_dropout, batch, cfg), training.loss_fn(no_dropout, batch, plain))

    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.3), vocab_size=30)
    torch.manual_seed(1)
    loss = training.loss_fn(model, batch, cfg)
    torch.manual_seed(1)  # the same two masks, by hand
    logits = model(batch.src.repeat(2, 1), batch.tgt_in.repeat(2, 1)).flatten(0, 1)
    target = batch.tgt_out.flatten()
    counted = target != 0
    ce = torch.nn.functional.cross_entropy(logits, target.repeat(2), ignore_index=0, label_smoothing=0.1)
    p, q = (x[counted].log_softmax(-1) for x in logits.chunk(2))
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum") + torch.nn.functional.kl_div(p, q, log_target=True, reduction="sum")
    torch.testing.assert_close(loss, ce + 5.0 * kl / 2 / counted.sum())
    assert kl > 0


def test_a_batch_is_counted_where_it_was_built_and_carries_its_count_to_the_device():
    """train_step scales each batch's loss by its target tokens: counted on a GPU batch, the count would wait for
    the GPU at every micro-batch (a host sync). The meta device holds no values, so a count made there fails."""
    batch = Batch.of([[5, 6, 7], [5]], [[8, 9], [8, 9, 10, 11]])
    moved = batch.to(torch.device("meta"))
    assert moved.tgt_out.is_meta and moved.n_tgt_tokens == batch.n_tgt_tokens == 8  # 2 + 4 pieces, and an eos each
