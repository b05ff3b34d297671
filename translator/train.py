"""The training loop: recipe in, model directory out.

    setup   load splits -> train SentencePiece -> tokenize and filter -> token-budget batches
            -> model, AdamW + warmup/inverse-sqrt (restored from the newest checkpoint with --resume)
    loop    one update a step -> log -> validate (loss, greedy BLEU), keep the best -> checkpoint
    finish  average checkpoints if asked -> test BLEU/chrF

Everything a run needs lives in a `Run`, built once by `setup`; everything that changes from
step to step lives in one `TrainingState`, saved and restored with each checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .api import Translator, check_beam_size
from .checkpoint import (
    CHECKPOINTS, SPM, WEIGHTS, CheckpointError, average_weights, clean_interrupted_writes, load_data_arrays, load_model_dir,
    load_recipe_json, load_training_checkpoint, run_dir_held, save_model_config, save_training_checkpoint, save_weights, training_checkpoints,
)
from .config import Recipe, RecipeError, TrainConfig
from .data import DataError, load_split, read_named, split_source, texts
from .trainset import Batch, SampledTrainBatches, StreamBatches, TrainBatches, filter_pairs, tokenize, training_pairs
from .devices import Precision, keep_compiled_kernels, keep_freed_memory, pick_device, resolve_precision
from .distributed import World, join, leave
from .evaluate import Scores, bleu_metric, evaluate, score
from .loss import cross_entropy, symmetric_kl
from .model import Transformer
from .runlog import RunLog
from .tokenizer import PAD_ID, Tokenizer, interleave

# Recipe keys a resumed run may change: they do not touch the weights' path (the rest would break
# the promise that a resumed run ends bitwise where an uninterrupted one does). train.accum_steps
# may change with the number of processes: _restore warns unless their product, the batches an
# update reads, stays.
RESUMABLE_CHANGES = (
    "name", "out_dir", "data.num_proc", "data.valid_split", "data.test_split", "train.max_steps", "train.on_nan", "train.device",
    "train.log_every", "train.valid_every", "train.checkpoint_every", "train.keep_checkpoints", "train.patience",
    "train.average_last", "train.threads", "train.accum_steps", "decode.", "evaluate.",
)

# A fine-tuned run (train.init_from) must describe the model it starts from: every model and tokenizer key but
# these, which the weights do not depend on (dropout is training's own; the position table is computed, not learned).
FINE_TUNING_MAY_CHANGE = ("model.dropout", "model.attention_dropout", "model.activation_dropout", "model.max_positions")


@dataclass
class TrainingState:
    """A run's progress: all that changes from step to step besides the tensors, saved as one value."""

    step: int = 0  # updates done
    data_position: dict = field(default_factory=dict)  # where the batch stream goes on (TrainBatches / StreamBatches)
    best_bleu: float = -1.0  # the best validation BLEU so far, and its step
    best_step: int | None = None
    stale_validations: int = 0  # validations since the best (train.patience)
    padding: list[int] = field(default_factory=lambda: [0, 0, 0])  # [epoch, padding positions, all positions] of this epoch so far
    logged_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # [loss x tokens, tokens] since the last log line
    elapsed_s: float = 0.0  # wall seconds up to the last checkpoint, over every part of a resumed run
    precision: str | None = None  # what the run trains at (auto is resolved on the machine that started it)
    batches_per_update: int | None = None  # processes x train.accum_steps: the global batch
    scheduler: dict = field(default_factory=dict)
    grad_scaler: dict = field(default_factory=dict)

    def stopped_early(self, patience: int | None) -> bool:
        """train.patience validations in a row without a better BLEU."""
        return patience is not None and self.stale_validations >= patience

    @classmethod
    def from_dict(cls, values: dict) -> TrainingState:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass
class Run:
    """What training works with, built once by `setup`."""

    recipe: Recipe
    out: Path
    world: World
    device: torch.device
    precision: Precision
    tokenizer: Tokenizer
    model: Transformer
    trained: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_batches: TrainBatches | StreamBatches
    valid_batches: TrainBatches
    valid_pairs: datasets.Dataset
    log: RunLog

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.precision.dtype) if self.precision.dtype else nullcontext()


def train(recipe: Recipe, progress: bool = True, resume: bool | Literal["auto"] = False) -> dict[str, Scores]:
    """Train from a recipe; write the model directory to `recipe.out_dir`; return test scores.

    With `resume`, continue from the newest checkpoint in `out_dir/checkpoints` (the result is
    bitwise the same as a run that was never interrupted); without it, refuse an `out_dir`
    that already holds a run; "auto": continue if there is a checkpoint, else start (one command for
    the first start and every restart). SIGINT and SIGTERM save a checkpoint, then raise `Stopped`.
    """
    device = pick_device(recipe.train.device)
    keep_freed_memory()
    keep_compiled_kernels()
    world, recipe = join(device), resolved(recipe)
    with run_dir_held(Path(recipe.out_dir)) if world.is_main else nullcontext(lambda: None) as hold:  # one training process a run folder
        run, state = setup(recipe, world, device, resume, hold)
        loop(run, state, progress)
        return finish(run, state)


class Stopped(KeyboardInterrupt):
    """Training stopped by a signal after saving a checkpoint; `signal` is its number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


# --- setup ---------------------------------------------------------------------------------------

def setup(recipe: Recipe, world: World, device: torch.device, resume: bool | Literal["auto"], hold: Callable[[], None] = lambda: None) -> tuple[Run, TrainingState]:
    """`hold()` takes the run folder for this process (`run_dir_held`) before its first write."""
    out, cfg = Path(recipe.out_dir), recipe.train
    bleu_metric(recipe.data.tgt_lang, recipe.evaluate.tokenize)  # a BLEU tokenizer that is not installed fails now, not at validation
    resolve_precision(recipe.decode.precision, device)  # validation decodes at it: int8 on a GPU fails now, too
    log = RunLog(out, enabled=world.is_main)
    say = log.say
    checkpoint = world.computed_by_main(lambda: _checkpoint_to_resume(recipe, resume, say))
    weights, start_tokenizer = (None, None) if checkpoint else _fine_tuning_start(recipe)  # a resumed run's weights are its checkpoint's
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(recipe.seed)  # the initial weights
    tokenizer, train_batches, valid_batches, valid_pairs = load_data(recipe, world, from_checkpoint=checkpoint is not None, say=say,
                                                                     start_tokenizer=start_tokenizer, hold=hold)
    model = Transformer(recipe.model, tokenizer.vocab_size).to(device)
    if weights is not None:
        model.load_state_dict(weights)
        say(f"fine-tuning {cfg.init_from}: its weights and SentencePiece model, a new optimizer and learning-rate schedule")
    optimizer, scheduler = optimizer_and_schedule(model, cfg)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    per_update = world.size * cfg.accum_steps
    state = TrainingState(precision=precision.name, batches_per_update=per_update)
    if checkpoint:
        state = _restore(checkpoint, model, optimizer, scheduler, scaler, precision, per_update, say)
        if isinstance(train_batches, SampledTrainBatches) and (drawn := load_data_arrays(checkpoint)):
            train_batches.restore(drawn)  # the epoch in progress goes on with the pieces it had
        if world.is_main:  # the model directory follows the recipe's allowed changes, once the resume is known to work
            save_model_config(out, recipe, tokenizer)
    log.open(up_to_step=state.step, start={"precision": precision.name, "precision_reason": precision.reason, "device": str(device)})
    say(f"{model.num_parameters() / 1e6:.2f} M parameters, on {device}; precision: {precision}")
    if cfg.average_last and (warning := averaging_warning(max(cfg.max_steps - (cfg.average_last - 1) * cfg.checkpoint_every, 0), cfg.max_steps)):
        say(warning)  # now, as well as at the end: before the hours of training it would spoil
    if world.size > 1:
        say(f"data parallel: {world.size} processes, each update reads {world.size} x {cfg.accum_steps} batches")
    # broadcast_buffers off: the only buffer is the position table, built alike on every rank and never
    # changed; DDP would otherwise send it from rank 0 before every forward (786 KB at 1,024 x 192).
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False) if world.size > 1 else model
    run = Run(recipe, out, world, device, precision, tokenizer, model, trained, optimizer, scheduler, scaler,
              train_batches, valid_batches, valid_pairs, log)
    return run, state


def load_data(recipe: Recipe, world: World, from_checkpoint: bool, say, start_tokenizer: Tokenizer | None = None,
              hold: Callable[[], None] = lambda: None,
              ) -> tuple[Tokenizer, TrainBatches | StreamBatches, TrainBatches, datasets.Dataset]:
    """The tokenizer (trained, the run's own when resuming, or `start_tokenizer`: the fine-tuned model's),
    training batches, validation batches and pairs."""
    out, data, tok, cfg = Path(recipe.out_dir), recipe.data, recipe.tokenizer, recipe.train
    with world.main_first():  # rank 0 downloads, trains the tokenizer and fills the caches; the rest reuse them
        train_pairs = load_split(data, data.train_split, data.streaming)
        valid_pairs = load_split(data, data.valid_split)
        # Loaded now only to be checked: a missing or broken test split fails before training, not after it.
        test = f"{len(load_split(data, data.test_split))} test" if data.test_split else "no test"
        say(f"data: {'a stream of' if data.streaming else len(train_pairs)} training, {len(valid_pairs)} validation, {test} pairs from {data.path}")
        if from_checkpoint or not world.is_main:
            tokenizer = Tokenizer.load(out / SPM)
        elif start_tokenizer:
            tokenizer = start_tokenizer
        else:
            sample = train_pairs.shuffle(seed=recipe.seed).take(tok.input_sentence_size) if data.streaming else train_pairs
            try:
                tokenizer = Tokenizer.train(sentences(sample, split_source(data, data.train_split)), tok.vocab_size, tok.model_type, tok.character_coverage, tok.input_sentence_size, recipe.seed)
            except RuntimeError as e:  # SentencePiece's own checks of the settings against the data
                raise RecipeError(f"tokenizer: SentencePiece cannot train with these settings on this data: {e}") from None
        say(f"tokenizer: SentencePiece {tok.model_type}, {tokenizer.vocab_size} pieces")
        if data.streaming:
            train_batches = StreamBatches(train_pairs, tokenizer, cfg.max_tokens, recipe.seed, data.max_len, data.max_ratio,
                                          source=split_source(data, data.train_split))
            next(train_batches.from_position({}))  # a batch, or the error that none passes the filters: before anything is written
            say("filter: applied to each pool as the stream is read")
        else:
            train_tokens, report = training_pairs(train_pairs, tokenizer, data)
            say(f"filter: {report}")
            train_batches = (SampledTrainBatches(train_tokens, cfg.max_tokens, recipe.seed, tokenizer, data.subword_sampling, data.max_len,
                                                 agree=world.computed_by_main)
                             if data.subword_sampling else TrainBatches(train_tokens, cfg.max_tokens, recipe.seed))
        # The validation loss needs pairs that fit the position table; BLEU translates them all (truncating).
        valid_tokens, report = filter_pairs(tokenize(valid_pairs, tokenizer), recipe.model.max_positions - 1, 0)
        counts = f"{report.too_long} longer than model.max_positions, {report.empty} with an empty side"
        if not report.kept:
            raise DataError(f"{split_source(data, data.valid_split)}: no pair to compute the validation loss on, of {len(valid_pairs)} ({counts})")
        if report.kept < len(valid_pairs):
            say(f"validation loss: {report.kept} of {len(valid_pairs)} pairs ({counts} left out)")
        check_beam_size(recipe.decode.beam_size, tokenizer.vocab_size)  # now, not at the test split after training
        if world.is_main and not from_checkpoint:  # once the data is known to be usable: a refused run leaves nothing behind
            hold()
            save_model_config(out, recipe, tokenizer)  # weights only once trained: until then the folder can be started again
    return tokenizer, train_batches, TrainBatches(valid_tokens, cfg.max_tokens, recipe.seed), valid_pairs


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


def sentences(pairs: datasets.Dataset | datasets.IterableDataset, source: str) -> Iterator[str]:
    """Source and target text, read in chunks (never the whole corpus as a list); a stream's broken line named."""
    for chunk in read_named(pairs.iter(batch_size=10_000), source):
        yield from interleave(texts(chunk["src"]), texts(chunk["tgt"]))


def resolved(recipe: Recipe) -> Recipe:
    """The recipe as the model directory stores it: a local data folder and the model fine-tuned become absolute paths,
    and a ~ in out_dir the home folder (a YAML recipe has no shell to expand it)."""
    recipe = replace(recipe, out_dir=str(Path(recipe.out_dir).expanduser()))
    path = Path(recipe.data.path).expanduser()
    if path.is_dir():
        recipe = replace(recipe, data=replace(recipe.data, path=str(path.resolve())))
    if recipe.train.init_from:
        recipe = replace(recipe, train=replace(recipe.train, init_from=str(Path(recipe.train.init_from).expanduser().resolve())))
    return recipe


def fine_tuning_mismatches(trained: Recipe, recipe: Recipe) -> list[tuple[str, object, object]]:
    """The keys that keep `recipe` from fine-tuning the model `trained` describes: (key, its value there, here)."""
    return [(key, old, new) for key, old, new in _changed_keys(trained, recipe)
            if key.startswith(("model.", "tokenizer.")) and key not in FINE_TUNING_MAY_CHANGE]


def _fine_tuning_start(recipe: Recipe) -> tuple[dict[str, torch.Tensor] | None, Tokenizer | None]:
    """train.init_from's weights and SentencePiece model, once the recipe is known to describe them (without it: None, None)."""
    if not recipe.train.init_from:
        return None, None
    try:
        trained, model, tokenizer = load_model_dir(recipe.train.init_from)
    except CheckpointError as e:
        raise RecipeError(f"train.init_from: {e}") from None
    differ = fine_tuning_mismatches(trained, recipe)
    if differ:
        listed = "; ".join(f"{key} is {old!r} there, {new!r} here" for key, old, new in differ)
        raise RecipeError(f"train.init_from: {recipe.train.init_from} is not the model this recipe describes ({listed}); "
                          "fine-tuning keeps a model's shape and SentencePiece model: set these keys to its values")
    return model.state_dict(), tokenizer


def _checkpoint_to_resume(recipe: Recipe, resume: bool | Literal["auto"], say) -> Path | None:
    """The checkpoint to go on from; a run folder that holds one (or trained weights) is never overwritten."""
    out = Path(recipe.out_dir)
    for done in clean_interrupted_writes(out) if out.is_dir() else []:
        say(f"{out}: {done} (left by an interrupted write)")
    checkpoints = training_checkpoints(out)
    if resume == "auto":
        resume = bool(checkpoints)
        say(f"resume: from {checkpoints[-1].name}" if resume else f"resume: no checkpoint in {out}, starting the run")
    if not resume:
        if checkpoints:
            raise RecipeError(f"out_dir: {out} already holds a run; pass --resume to continue it, or choose another out_dir")
        if (out / WEIGHTS).exists():  # a model (averaged, exported, or a run's first weights) with nothing to resume from
            raise RecipeError(f"out_dir: {out} holds a model ({WEIGHTS}) and no checkpoint to resume from; choose another "
                              "out_dir, or move the model away to train afresh")
        return None
    if not checkpoints:
        raise RecipeError(f"out_dir: {out} holds no checkpoint to resume from (train without --resume to start it afresh)")
    changed = _changed_keys(load_recipe_json(out), recipe)
    fixed = [c for c in changed if not c[0].startswith(RESUMABLE_CHANGES)]
    if fixed:
        key, old, new = fixed[0]
        raise RecipeError(f"{key}: the run was trained with {old!r}, the recipe now says {new!r}; a resumed run must keep it "
                          "to go on as it would have (set it back, or train in another out_dir)")
    for key, old, new in changed:
        say(f"resume: {key} changed from {old!r} to {new!r}")
    return checkpoints[-1]


def _changed_keys(old: Recipe, new: Recipe) -> list[tuple[str, object, object]]:
    def flat(values: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in values.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return items
    before, after = flat(old.to_dict()), flat(new.to_dict())
    return [(key, before.get(key), after[key]) for key in after if before.get(key) != after[key]]


def _restore(checkpoint: Path, model, optimizer, scheduler, scaler, precision: Precision, per_update: int, say) -> TrainingState:
    state = TrainingState.from_dict(load_training_checkpoint(checkpoint, model, optimizer))
    scheduler.load_state_dict(state.scheduler)
    if state.grad_scaler:  # a run saved without fp16 has none
        scaler.load_state_dict(state.grad_scaler)
    if state.precision not in (None, precision.name):
        say(f"warning: the run trained in {state.precision} and goes on in {precision} (not bitwise what it would have been)")
    if state.batches_per_update not in (None, per_update):
        say(f"warning: batches per update (processes x train.accum_steps) go from {state.batches_per_update} to {per_update}: "
            "another global batch; set train.accum_steps so that the product stays, to go on bitwise")
    say(f"resuming from {checkpoint} (step {state.step})")
    return replace(state, precision=precision.name, batches_per_update=per_update)



# --- the loop ------------------------------------------------------------------------------------

def loop(run: Run, state: TrainingState, progress: bool) -> None:
    """Train from `state.step` to train.max_steps (or early stopping), updating `state` in place."""
    cfg, world = run.recipe.train, run.world
    if state.stopped_early(cfg.patience):  # resumed after its early stop
        run.log.say(f"step {state.step}: {state.stale_validations} validations without a better BLEU, train.patience is {cfg.patience}: "
                    "nothing left to train (a larger train.patience goes on)")
        return
    batches = run.train_batches.from_position(state.data_position)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="training", unit="step", disable=not (progress and world.is_main))
    window = Window(state)
    run.trained.train()
    with _stop_requests() as signals:
        while state.step < cfg.max_steps:
            state.step += 1
            # Every rank walks the same stream of batches and takes its own accum_steps of each update's share.
            update = [next(batches) for _ in range(world.size * cfg.accum_steps)]
            state.data_position = update[-1][0]
            _count_padding(run, state, [batch for _, batch in update])
            window.add(*_update(run, state, [batch for _, batch in update]))
            bar.update()
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                bar.set_postfix(window.log(run, state.step))
            improved, converged, paused = False, False, time.perf_counter()
            if state.step % cfg.valid_every == 0 or state.step == cfg.max_steps:
                improved, converged = validate_and_keep_best(run, state)
            stop = world.any(bool(signals))
            scheduled = state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps or converged or improved
            if scheduled or stop:
                state.elapsed_s = window.elapsed()
                save_checkpoint(run, state, scheduled)
            window.start += time.perf_counter() - paused  # tokens/s counts training steps, not validations and saves
            if converged and not stop:  # a signal during that validation stops the command (130/143), test split untouched
                run.log.say(f"early stop at step {state.step}: no better validation BLEU in {cfg.patience} validations")
                break
            if stop:
                _stop(run, state, signals, bar)
        if world.any(bool(signals)):  # one that came while the last checkpoint was written: stop before the test split
            _stop(run, state, signals, bar)
    bar.close()


def _stop(run: Run, state: TrainingState, signals: list[int], bar: tqdm) -> None:
    """End the command on a signal, after the checkpoint of this step: every rank agreed to stop here."""
    bar.close()
    by = signal.Signals(signals[0]).name if signals else "a signal to another process"
    run.log.say(f"stopped by {by} after step {state.step}; continue with: translator train RECIPE --resume")
    leave(run.world)
    raise Stopped(signals[0] if signals else signal.SIGTERM)


def _update(run: Run, state: TrainingState, batches: list[Batch]) -> tuple[float, int]:
    """One optimizer update from this rank's share of the batches; a non-finite loss stops or skips it
    (train.on_nan), on every rank alike. Returns the update's mean loss and target tokens (all ranks)."""
    cfg, world = run.recipe.train, run.world
    n_tokens = sum(batch.n_tgt_tokens for batch in batches)  # every rank holds every batch of the update
    share = range(world.rank * cfg.accum_steps, (world.rank + 1) * cfg.accum_steps)
    keys = [dropout_key(run.recipe.seed, state.step, i) for i in share]  # the same masks on any number of processes
    mine = [batches[i].to(run.device) for i in share]
    try:
        loss = train_step(run.trained, run.optimizer, run.scheduler, mine, run.autocast, cfg, world, run.scaler, n_tokens, keys)
    except FloatingPointError as e:
        if cfg.on_nan == "stop":
            raise FloatingPointError(f"{e} at step {state.step}; the last good checkpoint is in {run.out / CHECKPOINTS}") from None
        run.log.say(f"warning: {e} at step {state.step}; update skipped (train.on_nan=skip)")
        run.log.record({"step": state.step, "skipped": str(e)})
        return 0.0, 0
    return loss, n_tokens


def dropout_key(seed: int, step: int, batch: int) -> int:
    """The seed of the dropout masks for batch `batch` of update `step`: drawn from the global batch, not the
    process, N processes draw the masks one process accumulating N batches draws, and a resumed run the same ones."""
    return int(np.random.SeedSequence([seed, step, batch]).generate_state(1, np.uint64)[0])


def train_step(
    model: torch.nn.Module, optimizer, scheduler, batches: list[Batch], autocast, cfg: TrainConfig, world: World = World(),
    scaler: torch.amp.GradScaler | None = None, n_tokens: int | None = None, dropout_keys: list[int] | None = None,
) -> float:
    """One update from one or more batches (gradient accumulation; under DDP this rank's share): the
    loss is the mean over all `n_tokens` target tokens of the update (default: these batches'), as if
    they were one batch. `scaler` (fp16) scales the loss so small gradients survive, and skips the
    update on overflow. Returns the update's mean loss over every rank.

    Every rank runs every backward (so DDP's gradient all-reduce never waits for a rank that
    gave up); then one all-reduce of [loss, non-finite count], the only host sync of the step,
    lets all ranks agree: a non-finite loss on any rank raises FloatingPointError on every rank."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled, every call passes through
    n_tokens = n_tokens or sum(batch.n_tgt_tokens for batch in batches)
    optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(2, device=batches[0].src.device)  # [loss x tokens / n_tokens, non-finite losses], summed over ranks
    for i, batch in enumerate(batches):
        if dropout_keys:
            torch.manual_seed(dropout_keys[i])
        # DDP averages gradients over ranks at the last backward only (no_sync before it)
        sync = i == len(batches) - 1 or not isinstance(model, DistributedDataParallel)
        with nullcontext() if sync else model.no_sync():
            with autocast():
                loss = loss_fn(model, batch, cfg, scale=batch.n_tgt_tokens * world.size / n_tokens)  # x size: DDP divides by it
            scaler.scale(loss).backward()
        stats += torch.stack([loss.detach().float() / world.size, (~torch.isfinite(loss.detach())).float()])
    scaler.unscale_(optimizer)  # fp16 only (a disabled scaler passes): before clipping, and so update() below is always valid
    # The norm is taken with clipping off too (an infinite limit): a non-finite gradient from a finite loss must not reach the weights.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
    if not scaler.is_enabled():  # fp16 overflows are the scaler's to skip; elsewhere a non-finite gradient is a NaN
        stats[1] += (~torch.isfinite(norm)).float()
    mean_loss, non_finite = world.sum_(stats).tolist()
    if non_finite:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()  # fp16: close this step's unscaling, or train.on_nan=skip's next update could not unscale
        raise FloatingPointError(f"loss is {mean_loss}" if not math.isfinite(mean_loss) else "gradient is not finite")
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return mean_loss


def loss_fn(model: torch.nn.Module, batch: Batch, cfg: TrainConfig, scale: float = 1.0) -> torch.Tensor:
    """`scale` x the mean label-smoothed cross-entropy per real target token (padding ignored).

    With train.rdrop_alpha, the batch goes through twice (two dropout masks, one forward of both
    copies) and the loss adds alpha x the symmetric KL between the two predictions (R-Drop)."""
    target = batch.tgt_out.flatten()
    if not cfg.rdrop_alpha:
        logits = model(batch.src, batch.tgt_in)  # (B, T, V)
        return cross_entropy(logits.flatten(0, 1), target, cfg.label_smoothing, ignore_index=PAD_ID, scale=scale)
    logits = model(batch.src.repeat(2, 1), batch.tgt_in.repeat(2, 1)).flatten(0, 1)  # (2 B T, V)
    first, second = logits.chunk(2)
    counted = target != PAD_ID
    consistency = symmetric_kl(first, second, counted) / counted.sum().clamp(min=1)
    return cross_entropy(logits, target.repeat(2), cfg.label_smoothing, ignore_index=PAD_ID, scale=scale) + scale * cfg.rdrop_alpha * consistency


class Window:
    """Loss and throughput since the last log line. The loss's sums are the training state's, so that the
    first line after a resume averages the steps an uninterrupted run's would; throughput is this process's.
    The elapsed time goes on from the checkpoint's: the steps after it are done again, and counted again."""

    def __init__(self, state: TrainingState):
        now = time.perf_counter()
        self.state, self.tokens, self.start, self.first = state, 0, now, now - state.elapsed_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.first

    def add(self, loss: float, tokens: int) -> None:
        loss_sum, loss_tokens = self.state.logged_loss
        self.state.logged_loss, self.tokens = [loss_sum + loss * tokens, loss_tokens + tokens], self.tokens + tokens

    def log(self, run: Run, step: int) -> dict:
        loss_sum, loss_tokens = self.state.logged_loss
        if not loss_tokens:
            return {}
        now = time.perf_counter()
        entry = {"step": step, "loss": loss_sum / loss_tokens, "lr": run.scheduler.get_last_lr()[0],
                 "tgt_tokens_per_s": self.tokens / (now - self.start), "elapsed_s": self.elapsed()}
        run.log.record(entry)
        self.state.logged_loss, self.tokens, self.start = [0.0, 0], 0, now
        return {"loss": f"{entry['loss']:.3f}", "lr": f"{entry['lr']:.2e}", "tok_s": f"{entry['tgt_tokens_per_s']:.0f}"}


def _count_padding(run: Run, state: TrainingState, batches: list[Batch]) -> None:
    """Add the update's padding to its epoch's count; log an epoch's share of padding as it ends."""
    epoch = state.data_position["epoch"]
    if epoch != state.padding[0]:
        run.log.record({"step": state.step, "epoch": state.padding[0], "padding": state.padding[1] / max(state.padding[2], 1)})
        state.padding = [epoch, 0, 0]
    for batch in batches:
        pads, positions = batch.padding
        state.padding = [epoch, state.padding[1] + pads, state.padding[2] + positions]


# --- validation, checkpoints ---------------------------------------------------------------------

def validate_and_keep_best(run: Run, state: TrainingState) -> tuple[bool, bool]:
    """Validate on rank 0. Returns (improved, converged), on every rank; the checkpoint an improvement makes
    writes the model directory's weights (save_checkpoint)."""
    patience = run.recipe.train.patience
    improved = False
    if run.world.is_main:
        valid_loss, valid = validate(Translator(run.model, run.tokenizer, run.recipe), run.valid_batches, run.valid_pairs, run.autocast)
        run.model.train()
        improved = valid.bleu > state.best_bleu
        state.stale_validations = 0 if improved else state.stale_validations + 1
        if improved:
            state.best_bleu, state.best_step = valid.bleu, state.step
        run.log.record({"step": state.step, "valid_loss": valid_loss, "valid_bleu": valid.bleu, "valid_chrf": valid.chrf, "best": improved})
        run.log.say(f"step {state.step}: valid loss {valid_loss:.3f}, greedy BLEU {valid.bleu:.2f}, chrF {valid.chrf:.2f}{' (best)' if improved else ''}")
    verdict = (state.best_bleu, state.best_step, state.stale_validations, improved)
    state.best_bleu, state.best_step, state.stale_validations, improved = run.world.from_main(verdict)
    return improved, state.stopped_early(patience)


@torch.no_grad()
def validate(translator: Translator, batches: TrainBatches, pairs: datasets.Dataset, autocast) -> tuple[float, Scores]:
    """Teacher-forced loss per target token, and greedy BLEU/chrF through the same path as `evaluate`."""
    model = translator.model.eval()
    total, tokens = 0.0, 0
    cfg = replace(translator.recipe.train, label_smoothing=0.0, rdrop_alpha=0.0)
    for indices in batches.epoch(0):
        batch = batches.collate(indices).to(translator.device)
        with autocast():
            loss = loss_fn(model, batch, cfg)
        n = batch.n_tgt_tokens
        total, tokens = total + loss.item() * n, tokens + n
    recipe = translator.recipe
    scores = score(translator.translate(texts(pairs["src"]), beam_size=1), texts(pairs["tgt"]), recipe.data.tgt_lang,
                   recipe.evaluate.tokenize, recipe.evaluate.lowercase)
    return total / max(tokens, 1), scores


def save_checkpoint(run: Run, state: TrainingState, scheduled: bool) -> None:
    if run.world.is_main:
        state.scheduler, state.grad_scaler = run.scheduler.state_dict(), run.scaler.state_dict()
        cfg = run.recipe.train
        drawn = run.train_batches.drawn() if isinstance(run.train_batches, SampledTrainBatches) else None  # pieces no process can draw again
        save_training_checkpoint(run.out, state.step, run.model, run.optimizer, asdict(state), cfg.keep_checkpoints, state.best_step,
                                 scheduled, drawn)
        if state.best_step == state.step:  # the best so far: the model directory's weights, after the checkpoint, so that
            save_weights(run.model, run.out / WEIGHTS)  # a crash between the two leaves a run that --resume goes on with


# --- the end -------------------------------------------------------------------------------------

def finish(run: Run, state: TrainingState) -> dict[str, Scores]:
    """Check the ranks agree, make the final weights (best or averaged), and score the test split."""
    world, out, cfg = run.world, run.out, run.recipe.train
    if not world.weights_agree(run.model):
        raise RuntimeError(f"the {world.size} processes ended with different weights")
    if world.size > 1:
        run.log.say(f"weights identical on all {world.size} processes")
    leave(world)
    if not world.is_main:
        return {}
    best = out / CHECKPOINTS / f"step_{state.best_step:08d}" if state.best_step is not None else None
    # The mean of the last checkpoints, or the best's own (rotation keeps it), taken anew: a resume may have changed average_last
    chosen = training_checkpoints(out)[-cfg.average_last:] if cfg.average_last else [best] if best and best.is_dir() else []
    if chosen:
        run.model.load_state_dict(average_weights(chosen))
        save_weights(run.model, out / WEIGHTS)
        run.log.say(f"model weights: {'the mean of' if cfg.average_last else 'the best validation, at'} {', '.join(p.name for p in chosen)}")
        if cfg.average_last and (warning := averaging_warning(int(chosen[0].name.split("_")[1]), state.step)):
            run.log.say(warning)
        if len(chosen) < cfg.average_last:
            run.log.say(f"warning: train.average_last is {cfg.average_last}, and the run kept {len(chosen)} checkpoints to average")
    elif not (out / WEIGHTS).exists():  # never validated: the last weights (a best whose checkpoint was removed by hand stays)
        save_weights(run.model, out / WEIGHTS)
    run.log.say(f"trained {state.step} steps; best validation BLEU {state.best_bleu:.2f}")
    test, results = run.recipe.data.test_split, {}
    if test:
        best = Translator.from_pretrained(out, run.device)
        results["greedy"] = evaluate(best, test, beam_size=1)
        if run.recipe.decode.beam_size > 1:
            results[f"beam{run.recipe.decode.beam_size}"] = evaluate(best, test)
        run.log.record({"test": {name: s.to_dict() for name, s in results.items()}})
    run.log.close()
    return results


def averaging_warning(oldest: int, last: int) -> str | None:
    """Averaging helps with close, late checkpoints; early ones pull the weights back."""
    if oldest >= 0.8 * last:
        return None
    return (f"warning: the averaged checkpoints reach back to step {oldest} of {last}; average checkpoints of the "
            "last fifth of a run (lower train.checkpoint_every or train.average_last)")


@contextmanager
def _stop_requests():
    """A list that SIGINT/SIGTERM fill with the signal's number, so the loop can stop after a whole step."""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: requests.append(signum))
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
