"""The training loop: recipe in, model directory out.

    load splits -> train SentencePiece -> tokenize and filter -> token-budget batches
    -> AdamW + warmup/inverse-sqrt -> validate (loss, greedy BLEU) -> keep the best -> test
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .api import Translator
from .checkpoint import (
    CHECKPOINTS, SPM, WEIGHTS, average_weights, load_training_checkpoint, save_model_dir, save_training_checkpoint, save_weights, training_checkpoints,
)
from .config import Recipe, RecipeError, TrainConfig
from .data import Batch, StreamBatches, TrainBatches, filter_pairs, load_split, tokenize
from .devices import pick_device, resolve_precision
from .distributed import World, join, leave
from .evaluate import Scores, evaluate, score
from .loss import cross_entropy
from .model import Transformer
from .tokenizer import PAD_ID, Tokenizer, interleave


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_and_schedule(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW as one fused kernel over all parameters (the per-tensor loop was 2% of a CPU step), with
    the inverse square-root schedule."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt_schedule(cfg.warmup_steps))


def inverse_sqrt_schedule(warmup_steps: int):
    """Linear warmup to the peak, then decay with 1/sqrt(step) (Vaswani et al., 5.3), as a multiplier of lr."""
    def multiplier(step: int) -> float:
        step = max(step, 1)
        if warmup_steps == 0:
            return 1.0
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return multiplier


def loss_fn(model: torch.nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy per real target token (padding ignored)."""
    logits = model(src, tgt_in)  # (B, T, V)
    return cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), label_smoothing, ignore_index=PAD_ID)


def train_step(
    model: torch.nn.Module, optimizer, scheduler, batches: list[Batch], autocast, cfg: TrainConfig, world: World = World(),
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, int]:
    """One update from one or more batches (gradient accumulation, and under DDP every rank's
    batches); the loss is the mean over all their target tokens, as if they were one batch.
    `scaler` (fp16) scales the loss up so small gradients survive, and skips the update on
    overflow. Returns this rank's mean loss and token count."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled, every call passes through
    n_local = sum(batch.n_tgt_tokens for batch in batches)
    n_tokens = world.sum(n_local)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, batch in enumerate(batches):
        # DDP averages gradients over ranks at the last backward only (no_sync before it)
        sync = i == len(batches) - 1 or not isinstance(model, DistributedDataParallel)
        with nullcontext() if sync else model.no_sync():
            with autocast():
                loss = loss_fn(model, batch.src, batch.tgt_in, batch.tgt_out, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
            scaler.scale(loss * (batch.n_tgt_tokens * world.size / n_tokens)).backward()  # x size: DDP divides by it
        total += loss.item() * batch.n_tgt_tokens
    if cfg.clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return total / n_local, n_local


def sentences(pairs: datasets.Dataset) -> Iterator[str]:
    """Source and target text, streamed in chunks (never the whole corpus as a list)."""
    for chunk in pairs.iter(batch_size=10_000):
        yield from interleave(chunk["src"], chunk["tgt"])


def resolved(recipe: Recipe) -> Recipe:
    """The recipe as the model directory stores it: a local data folder becomes an absolute path."""
    path = Path(recipe.data.path).expanduser()
    return replace(recipe, data=replace(recipe.data, path=str(path.resolve()))) if path.is_dir() else recipe


@torch.no_grad()
def validate(translator: Translator, batches: TrainBatches, pairs: datasets.Dataset, autocast) -> tuple[float, Scores]:
    """Teacher-forced loss per target token, and greedy BLEU/chrF through the same path as `evaluate`."""
    model = translator.model.eval()
    total, tokens = 0.0, 0
    for indices in batches.epoch(0):
        batch = batches.collate(indices).to(translator.device)
        with autocast():
            loss = loss_fn(model, batch.src, batch.tgt_in, batch.tgt_out, 0.0)
        n = batch.n_tgt_tokens
        total, tokens = total + loss.item() * n, tokens + n
    scores = score(translator.translate(list(pairs["src"]), beam_size=1), list(pairs["tgt"]))
    model.train()
    return total / max(tokens, 1), scores


def train(recipe: Recipe, progress: bool = True, resume: bool = False) -> dict[str, Scores]:
    """Train from a recipe; write the model directory to `recipe.out_dir`; return test scores.

    With `resume`, continue from the newest checkpoint in `out_dir/checkpoints` (the result is
    bitwise the same as a run that was never interrupted); without it, refuse an `out_dir`
    that already holds a run. SIGINT and SIGTERM save a checkpoint, then raise KeyboardInterrupt.
    """
    device = pick_device(recipe.train.device)
    return _train(recipe, progress, resume, join(device), device)


def generator_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generators that training draws from (dropout)."""
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def set_generator_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _train(recipe: Recipe, progress: bool, resume: bool, world: World, device: torch.device) -> dict[str, Scores]:
    recipe = resolved(recipe)
    cfg, out = recipe.train, Path(recipe.out_dir)
    say = log if world.is_main else (lambda message: None)  # one voice: rank 0's
    checkpoint = world.from_main(_checkpoint_to_resume(out, resume) if world.is_main else None)
    seed_everything(recipe.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    with world.main_first():  # rank 0 downloads, trains the tokenizer and fills the caches; the rest reuse them
        streaming = recipe.data.streaming
        train_pairs = load_split(recipe.data, recipe.data.train_split, streaming)
        valid_pairs = load_split(recipe.data, recipe.data.valid_split)
        say(f"data: {'a stream of' if streaming else len(train_pairs)} training pairs, {len(valid_pairs)} validation pairs from {recipe.data.path}")
        tok = recipe.tokenizer
        if checkpoint or not world.is_main:
            tokenizer = Tokenizer.load(out / SPM)
        else:
            sample = train_pairs.shuffle(seed=recipe.seed).take(tok.input_sentence_size) if streaming else train_pairs
            tokenizer = Tokenizer.train(
                sentences(sample), tok.vocab_size, tok.model_type, tok.character_coverage, tok.input_sentence_size, recipe.seed
            )
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(out / SPM)
        say(f"tokenizer: SentencePiece {tok.model_type}, {tokenizer.vocab_size} pieces")
        if streaming:
            train_batches = StreamBatches(train_pairs, tokenizer, cfg.max_tokens, recipe.seed, recipe.data.max_len, recipe.data.max_ratio)
            say("filter: applied to each pool as the stream is read")
        else:
            train_tokens, report = filter_pairs(tokenize(train_pairs, tokenizer, recipe.data.num_proc), recipe.data.max_len, recipe.data.max_ratio)
            say(f"filter: {report}")
            train_batches = TrainBatches(train_tokens, cfg.max_tokens, recipe.seed)
        valid_batches = TrainBatches(tokenize(valid_pairs, tokenizer), cfg.max_tokens, recipe.seed)

    model = Transformer(recipe.model, tokenizer.vocab_size).to(device)
    say(f"{model.num_parameters() / 1e6:.2f} M parameters, on {device}")
    optimizer, scheduler = optimizer_and_schedule(model, cfg)
    position = {"step": 0, "data_position": {}, "padding": [0, 0, 0], "best_bleu": -1.0, "best_step": None, "stale_validations": 0}
    precision = resolve_precision(cfg.precision, device)
    say(f"precision: {precision}")
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    rng = None
    if checkpoint:
        position = load_training_checkpoint(checkpoint, model, optimizer)
        scheduler.load_state_dict(position.pop("scheduler"))
        scaler_state = position.pop("grad_scaler", {})
        if scaler_state:  # a run saved without fp16 has none
            scaler.load_state_dict(scaler_state)
        python_rng = position.pop("python_rng")
        random.setstate((python_rng[0], tuple(python_rng[1]), python_rng[2]))
        rng = position.pop("rng")
        say(f"resuming from {checkpoint} (step {position['step']})")
    elif world.is_main:
        save_model_dir(out, model, recipe, tokenizer)  # config and tokenizer now; weights are replaced by each better one
    if rng is not None and len(rng) == world.size:
        set_generator_states(rng[world.rank], device)  # dropout goes on exactly where it stopped
    elif world.size > 1 or rng is not None:  # each rank its own dropout masks
        torch.manual_seed(recipe.seed + 7919 * world.rank + position["step"])
        if rng is not None:
            say(f"the checkpoint was written by {len(rng)} processes, not {world.size}: dropout masks are drawn afresh")
    if world.size > 1:
        say(f"data parallel: {world.size} processes, each update reads {world.size} x {cfg.accum_steps} batches")
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world.size > 1 else model
    autocast = (lambda: torch.autocast(device.type, dtype=precision.dtype)) if precision.dtype else nullcontext
    translator = Translator(model, tokenizer, recipe)
    metrics = _metrics_log(out / "metrics.jsonl", up_to_step=position["step"]) if world.is_main else None
    board = _tensorboard(out) if world.is_main else None

    def record(entry: dict) -> None:
        if metrics:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()
        if board and "step" in entry:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    board.add_scalar(key, value, entry["step"])

    def save_checkpoint(step: int, data_position: dict) -> None:
        generators = world.gather(generator_states(device))  # every rank takes part; rank 0 writes
        if not world.is_main:
            return
        state = {"step": step, "data_position": data_position, "padding": padding, "best_bleu": best_bleu, "best_step": best_step,
                 "stale_validations": stale_validations, "scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
                 "python_rng": random.getstate()}
        save_training_checkpoint(out, step, model, optimizer, state, cfg.keep_checkpoints, best_step, generators)

    record({"step": position["step"], "precision": precision.name, "precision_reason": precision.reason, "device": str(device)})
    best_bleu, best_step, stale_validations = position["best_bleu"], position["best_step"], position["stale_validations"]
    first_step = position["step"] + 1
    converged = improved = False
    bar = tqdm(total=cfg.max_steps, initial=first_step - 1, desc="training", unit="step", disable=not (progress and world.is_main), file=sys.stderr)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    train_start = time.perf_counter()
    model.train()
    batches = train_batches.from_position(position["data_position"])
    padding = position["padding"]  # [epoch, padding positions, all positions] of the epoch so far
    step = first_step - 1  # stays so when a finished run is resumed
    with _stop_requests() as stop:
        for step in range(first_step, cfg.max_steps + 1):
            # Every rank walks the same stream of batches and takes its own accum_steps of each update's share.
            positions_and_batches = [next(batches) for _ in range(world.size * cfg.accum_steps)]
            for data_position, batch in positions_and_batches:
                if data_position["epoch"] != padding[0]:  # an epoch ended: log its share of padding
                    record({"step": step, "epoch": padding[0], "padding": padding[1] / max(padding[2], 1)})
                    padding = [data_position["epoch"], 0, 0]
                pads, positions = batch.padding
                padding = [padding[0], padding[1] + pads, padding[2] + positions]
            data_position = positions_and_batches[-1][0]
            mine = [b.to(device) for _, b in positions_and_batches[world.rank * cfg.accum_steps:(world.rank + 1) * cfg.accum_steps]]
            try:
                loss, n_tokens = train_step(trained, optimizer, scheduler, mine, autocast, cfg, world, scaler)
            except FloatingPointError as e:
                if cfg.on_nan == "stop":
                    raise FloatingPointError(f"{e} at step {step}; the last good checkpoint is in {out / CHECKPOINTS}") from None
                say(f"warning: {e} at step {step}; update skipped (train.on_nan=skip)")
                record({"step": step, "skipped": str(e)})
                optimizer.zero_grad(set_to_none=True)
                loss, n_tokens = 0.0, 0
            window_loss, window_tokens = window_loss + loss * n_tokens, window_tokens + n_tokens
            bar.update()
            if (step % cfg.log_every == 0 or step == cfg.max_steps) and window_tokens:
                elapsed = time.perf_counter() - window_start
                entry = {"step": step, "loss": window_loss / window_tokens, "lr": scheduler.get_last_lr()[0],
                         "tgt_tokens_per_s": window_tokens / elapsed, "elapsed_s": time.perf_counter() - train_start}
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tgt_tokens_per_s']:.0f}")
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            improved = False
            if (step % cfg.valid_every == 0 or step == cfg.max_steps) and world.is_main:
                valid_loss, valid = validate(translator, valid_batches, valid_pairs, autocast)
                improved = valid.bleu > best_bleu
                stale_validations = 0 if improved else stale_validations + 1
                converged = cfg.patience is not None and stale_validations >= cfg.patience
                if improved:  # the model directory's weights, and a training checkpoint kept past keep_checkpoints
                    best_bleu, best_step = valid.bleu, step
                    save_weights(model, out / WEIGHTS)
                record({"step": step, "valid_loss": valid_loss, "valid_bleu": valid.bleu, "valid_chrf": valid.chrf, "best": improved})
                say(f"step {step}: valid loss {valid_loss:.3f}, greedy BLEU {valid.bleu:.2f}, chrF {valid.chrf:.2f}{' (best)' if improved else ''}")
            if world.size > 1:  # every rank must agree on stopping
                if step % cfg.valid_every == 0 or step == cfg.max_steps:
                    best_bleu, best_step, stale_validations, converged, improved = world.from_main(
                        (best_bleu, best_step, stale_validations, converged, improved))
                stop = ["signal"] * int(world.sum(len(stop)) > 0) or stop
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop or converged or improved:
                save_checkpoint(step, data_position)
            if converged:
                say(f"early stop at step {step}: no better validation BLEU in {cfg.patience} validations")
                break
            if stop:
                bar.close()
                say(f"stopped by {stop[0]} after step {step}; continue with: translator train RECIPE --resume")
                leave(world)  # every rank agreed to stop here
                raise KeyboardInterrupt
    bar.close()
    if not world.weights_agree(model):
        raise RuntimeError(f"the {world.size} processes ended with different weights")
    if world.size > 1:
        say(f"weights identical on all {world.size} processes")
    leave(world)
    if not world.is_main:
        return {}
    if cfg.average_last:
        averaged = training_checkpoints(out)[-cfg.average_last:]
        model.load_state_dict(average_weights(averaged))
        save_weights(model, out / WEIGHTS)
        say(f"model weights: the mean of {', '.join(p.name for p in averaged)}")
    say(f"trained {step} steps in {time.perf_counter() - train_start:.0f} s; best validation BLEU {best_bleu:.2f}")

    best = Translator.from_pretrained(out, device)
    results = {"greedy": evaluate(best, recipe.data.test_split, beam_size=1)}
    if recipe.decode.beam_size > 1:
        results[f"beam{recipe.decode.beam_size}"] = evaluate(best, recipe.data.test_split)
    record({"test": {name: s.to_dict() for name, s in results.items()}})
    metrics.close()
    if board:
        board.close()
    return results


def _checkpoint_to_resume(out: Path, resume: bool) -> Path | None:
    checkpoints = training_checkpoints(out)
    if resume:
        if not checkpoints:
            raise RecipeError(f"out_dir: {out} holds no checkpoint to resume from")
        return checkpoints[-1]
    if checkpoints or (out / WEIGHTS).exists():
        raise RecipeError(f"out_dir: {out} already holds a run; pass --resume to continue it, or choose another out_dir")
    return None


def _tensorboard(out: Path):
    """TensorBoard events in out_dir/tensorboard when tensorboard is installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _metrics_log(path: Path, up_to_step: int):
    """Open metrics.jsonl for appending, dropping what a killed run logged after its last checkpoint."""
    kept = []
    if up_to_step and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line).get("step", 0) <= up_to_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = path.open("w", encoding="utf-8")
    metrics.write("".join(line + "\n" for line in kept))
    return metrics


@contextmanager
def _stop_requests():
    """A list that SIGINT/SIGTERM fill with the signal's name, so the loop can stop after a whole step."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: requests.append(signal.Signals(signum).name))
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
