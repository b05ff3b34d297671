"""A model directory: everything needed to translate, and nothing that executes on load.

    config.json          {"format_version": 1, "recipe": {...}}   the resolved recipe
    model.safetensors    the weights
    sentencepiece.model  the joint subword model
    checkpoints/step_N/  training state to resume from: model.safetensors,
                         optimizer.safetensors (Adam moments), state.json (the rest),
                         data.safetensors (with subword sampling: the epoch's pieces)

Every file is written atomically (temporary file in the same directory, fsync, rename), a
training checkpoint as a whole directory, so a crash mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_arrays, save as arrays_bytes
from safetensors.torch import load_file, save as tensors_bytes

from .config import Recipe, RecipeError, recipe_from_dict
from .ensemble import Ensemble
from .model import Transformer
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG, WEIGHTS, SPM = "config.json", "model.safetensors", "sentencepiece.model"
CHECKPOINTS, OPTIMIZER, STATE = "checkpoints", "optimizer.safetensors", "state.json"
DATA = "data.safetensors"  # what the batch stream needs besides its position, if anything (a sampled epoch's pieces)
REPLACED = ".replaced"  # suffix of a checkpoint directory stepping aside for a new one of the same step


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: setting it is the only way to read it, and threads share it


def plain_mode(path: str | Path) -> None:
    """Give a file or directory from mkstemp or mkdtemp (owner-only: 0600, 0700), about to be renamed
    into place, the mode open() or mkdir() would have given it: 0666 or 0777 less the umask, so that
    a service's user can read the model a trainer wrote."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_UMASK)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then fsync and rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync(Path(tmp))
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_naming(e, path, "what was there before is as it was")
    _fsync(path.parent)  # make the rename itself durable


def _raise_naming(error: BaseException, path: Path, kept: str):
    """Raise `error` again; an OSError (a full disk's names no file) as one that names `path` and what stayed whole."""
    if isinstance(error, OSError):
        raise OSError(error.errno, f"{error.strerror or error}: writing {path} ({kept})") from error
    raise error


@contextmanager
def staged_text_file(path: Path) -> Iterator[TextIO]:
    """A text file written beside `path` and renamed onto it when the block ends without an error:
    `path` holds the old file or the whole new one, and a failure leaves nothing behind. Opened up
    front, so that a path that cannot be written fails before the work whose output it is. A path
    that is not a regular file (a pipe, a device) is written into, as it is; a file replaced keeps its mode
    (a 0600 file of translations does not become world-readable), as `sed -i` keeps it."""
    if path.exists() and not path.is_file():  # a pipe, a device, /dev/stdout, bash's >(gzip > out.gz): written through
        with open(path, "w", encoding="utf-8") as f:
            yield f
        return
    path = path.resolve()  # a link's target is replaced, from beside it; the link stays
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave `path` empty
        if path.exists():
            shutil.copymode(path, staging)
        else:
            plain_mode(staging)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def _tensors(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: Transformer, path: Path) -> None:
    tensors = tensors_bytes(_tensors(model), metadata={"format_version": str(FORMAT_VERSION)})
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(tensors))


def save_model_config(directory: str | Path, recipe: Recipe, tokenizer: Tokenizer) -> None:
    """config.json and the SentencePiece model: a model directory still without weights (a run that has just started)."""
    directory = Path(directory)
    config = json.dumps({"format_version": FORMAT_VERSION, "recipe": recipe.to_dict()}, indent=2)
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(config + "\n", encoding="utf-8"))
    atomic_write(directory / SPM, lambda tmp: Path(tmp).write_bytes(tokenizer.model_proto))


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to fill, put in place when the block ends without an error, so
    that a failure while writing (Ctrl-C, a full disk) leaves `out` as it was. A new `out` appears by
    one rename; an existing one (whose other files stay) gets the folder's files by a rename each,
    a window of microseconds where the writes took seconds. Every file is fsynced before it is put
    in place, so a power cut after the block cannot leave `out` with empty files. The folders made
    for `out` go with it."""
    made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]  # deepest first
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        yield staging
        for path in [*staging.rglob("*"), staging]:  # the files, then the folders' entries of them
            _fsync(path)
        if out.is_dir():
            for file in staging.iterdir():
                os.replace(file, out / file.name)
            _fsync(out)
        else:
            plain_mode(staging)
            os.replace(staging, out)
        _fsync(out.parent)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)  # emptied into an existing `out`


def save_model_dir(directory: str | Path, model: Transformer, recipe: Recipe, tokenizer: Tokenizer) -> None:
    with staged_directory(Path(directory)) as staging:
        save_model_config(staging, recipe, tokenizer)
        save_weights(model, staging / WEIGHTS)


def load_recipe_json(directory: Path) -> Recipe:
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} was written by a newer translator (this one reads {FORMAT_VERSION}); upgrade translator")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not one this translator reads ({FORMAT_VERSION})")
    try:
        return recipe_from_dict(config["recipe"])
    except (KeyError, RecipeError) as e:
        raise CheckpointError(f"{path}: invalid recipe ({e})") from None


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Recipe, Transformer, Tokenizer]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}" + (" (that is a file)" if directory.exists() else ""))
    if (directory / WEIGHTS).exists() and not (directory / CONFIG).exists():
        raise CheckpointError(f"{directory}: a training checkpoint, not a model directory (no {CONFIG}); "
                              f"a training checkpoint becomes a model directory with: translator average {directory} -o DIR")
    recipe = load_recipe_json(directory)
    tokenizer = _load_tokenizer(directory / SPM)
    model = Transformer(recipe.model, tokenizer.vocab_size)
    if not (directory / WEIGHTS).exists() and (directory / CONFIG).exists():
        raise CheckpointError(f"{directory / WEIGHTS} not found: this model directory holds no trained weights yet (its training "
                              "stopped before the first validation); continue it with translator train RECIPE --resume, or train it again")
    try:
        state = load_file(directory / WEIGHTS, device=str(device))  # safetensors: tensors only, never code
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory / WEIGHTS}: cannot load the weights ({e})") from None
    _load_weights(model, state, directory / WEIGHTS, CONFIG)
    return recipe, model.to(device).eval(), tokenizer


def load_ensemble(directories: list[str | Path], device: str | torch.device = "cpu") -> tuple[Recipe, Ensemble, Tokenizer]:
    """Model directories -> the first one's recipe (its decode settings are the ensemble's), the ensemble
    and the shared tokenizer; models that cannot decode together are refused, naming the directory."""
    loaded = [load_model_dir(directory, device) for directory in directories]
    recipe, _, tokenizer = loaded[0]
    first = Path(directories[0])
    for directory, (other, _, other_tokenizer) in zip(directories[1:], loaded[1:]):
        if other_tokenizer.model_proto != tokenizer.model_proto:
            raise CheckpointError(f"{directory}: its SentencePiece model differs from {first}'s; an ensemble's models must share "
                                  "one (train them on the same data with the same tokenizer settings)")
        if (other.data.src_lang, other.data.tgt_lang) != (recipe.data.src_lang, recipe.data.tgt_lang):
            raise CheckpointError(f"{directory}: translates {other.data.src_lang} to {other.data.tgt_lang}, "
                                  f"{first} {recipe.data.src_lang} to {recipe.data.tgt_lang}")
        if other.model.max_positions != recipe.model.max_positions:
            raise CheckpointError(f"{directory}: model.max_positions is {other.model.max_positions}, {first}'s {recipe.model.max_positions}; "
                                  "an ensemble's models must cover the same positions")
    return recipe, Ensemble([model for _, model, _ in loaded]), tokenizer


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the SentencePiece model ({' '.join(str(e).split())})") from None


def _load_weights(model: Transformer, weights: dict[str, torch.Tensor], path: Path, config: str) -> None:
    """`model.load_state_dict(weights)`, or one line saying how the weights differ from what `config` builds
    (torch's own message lists every tensor, over many lines)."""
    expected = model.state_dict()
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    problems = [
        f"{len(names)} {what} (first: {names[0]}{detail(names[0])})"
        for names, what, detail in (
            (reshaped, "of another shape", lambda k: f" is {tuple(weights[k].shape)}, the config makes {tuple(expected[k].shape)}"),
            (missing, "missing", lambda k: ""),
            (unexpected, "that the config has no place for", lambda k: ""),
        )
        if names
    ]
    if problems:
        raise CheckpointError(f"{path}: weights do not match {config}: tensors {'; '.join(problems)}")
    model.load_state_dict(weights, strict=True)


def training_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints, oldest first (half-written ones are hidden temporary directories)."""
    root = run_dir / CHECKPOINTS
    return sorted(root.glob("step_*")) if root.is_dir() else []


def save_training_checkpoint(
    run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, state: dict, keep: int, best_step: int | None = None,
    scheduled: bool = True, data: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write checkpoints/step_N as a whole (temporary directory, fsync, rename), then keep the
    newest `keep` and the one of `best_step` (the best validation BLEU so far). `data`: arrays the
    batch stream needs to go on (`load_data_arrays`).

    One saved only because training stopped there (`scheduled=False`: a signal) goes as soon as a
    newer one is written: a resumed run then keeps, and averages, the checkpoints of a run that
    was never stopped."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        # safetensors' bytes, written here: its save_file writes through a temporary file of its own, which is
        # mode 0600 (unreadable to a service account) and, killed mid-write, left where no cleaning finds it.
        (tmp / WEIGHTS).write_bytes(tensors_bytes(_tensors(model)))
        optim = optimizer.state_dict()
        slots = {f"{i}.{name}": value for i, slots in optim["state"].items() for name, value in slots.items()}
        (tmp / OPTIMIZER).write_bytes(tensors_bytes(slots))
        (tmp / STATE).write_text(json.dumps({**state, "scheduled": scheduled, "optimizer_groups": optim["param_groups"]}), encoding="utf-8")
        if data:
            (tmp / DATA).write_bytes(arrays_bytes(data))
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)  # the files' entries in it, before it is renamed into view
        plain_mode(tmp)
        _rename_over(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(e, final, "the checkpoints before it are whole")
    _discard_stops_before(final)
    best = root / f"step_{best_step:08d}" if best_step is not None else None
    for old in training_checkpoints(run_dir)[:-keep]:
        if old != best:
            _discard(old)
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint out of view first: one killed mid-delete is a hidden leftover
    (`clean_interrupted_writes` removes it), never a step_N with files missing."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.discarded")
    os.rename(checkpoint, hidden)
    shutil.rmtree(hidden)


def _discard_stops_before(newest: Path) -> list[Path]:
    """Delete the checkpoints saved only because training stopped (a signal) that are older than `newest`."""
    stops = [p for p in training_checkpoints(newest.parent.parent) if p < newest and not _scheduled(p)]
    for stop in stops:
        _discard(stop)
    return stops


def _scheduled(checkpoint: Path) -> bool:
    try:
        return json.loads((checkpoint / STATE).read_text(encoding="utf-8")).get("scheduled", True)
    except (OSError, ValueError):
        return True  # unreadable: not this function's to delete; resuming from it names the problem


def _rename_over(new: Path, final: Path) -> None:
    """Put directory `new` in the place of `final`, which may exist (the same step saved again).

    A directory cannot be renamed over a full one, so the old one first steps aside under a
    hidden name; a crash between the two renames leaves it there, whole, and
    `clean_interrupted_writes` puts it back. At no moment is a complete step_N lost.
    """
    aside = final.with_name(f".{final.name}{REPLACED}")
    if final.exists():
        os.rename(final, aside)
    os.rename(new, final)
    _fsync(final.parent)  # make the renames durable
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def run_dir_held(run_dir: Path) -> Iterator[Callable[[], None]]:
    """`run_dir` for this process alone while the block runs: another training process there is refused before
    it cleans what it would take for a killed run's leftovers, or writes anything. An flock on the folder itself,
    which the system drops when the process ends, however it ends. Taken now if the folder exists, else by the
    function the block gets, which a new run calls before its first write (a refused run makes no folder)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"out_dir: {run_dir} is a file, expected the run's folder")
    fd = None

    def hold() -> None:
        nonlocal fd
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the folder is not held
            return
        if fd is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                raise RecipeError(f"out_dir: {run_dir} is in use by another training process; let it end, or choose another out_dir") from None

    try:
        if run_dir.is_dir():
            hold()
        yield hold
    finally:
        if fd is not None:
            os.close(fd)


def clean_interrupted_writes(run_dir: Path) -> list[str]:
    """Remove what a killed process left half-written in a run (hidden temporary files and checkpoint
    directories), putting back a checkpoint that was stepping aside for its replacement. Returns what was done."""
    done = []
    root = run_dir / CHECKPOINTS
    for aside in sorted(root.glob(f".step_*{REPLACED}")) if root.is_dir() else []:
        final = aside.with_name(aside.name[1 : -len(REPLACED)])
        if not final.exists():
            os.rename(aside, final)
            done.append(f"restored {final.name}")
    leftovers = [*(root.glob(".step_*") if root.is_dir() else []), *run_dir.glob(".*.tmp")]
    for path in sorted(leftovers):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        done.append(f"removed {path.name}")
    if checkpoints := training_checkpoints(run_dir):  # killed after writing a checkpoint, before deleting the stop's before it
        done += [f"removed {stop.name}, saved at a stop before {checkpoints[-1].name}" for stop in _discard_stops_before(checkpoints[-1])]
    return done


def load_training_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer in place; return the rest of the state (step, data position, ...)."""
    try:
        weights = load_file(path / WEIGHTS)
        tensors = load_file(path / OPTIMIZER)
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot load the training checkpoint ({e})") from None
    _load_weights(model, weights, path / WEIGHTS, "the recipe")
    slots: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("rng."):  # random generator states of checkpoints older than keyed dropout: no longer needed
                continue
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": state.pop("optimizer_groups")})
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: the optimizer's state cannot be restored ({type(e).__name__}: {e})") from None
    return state


def load_data_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays a training checkpoint keeps for the batch stream; none if it has no DATA file."""
    try:
        return load_arrays(path / DATA) if (path / DATA).exists() else {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / DATA}: cannot load the batch stream's state ({e})") from None


def average_weights(directories: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the `model.safetensors` in each directory (model directories or training checkpoints)."""
    total: dict[str, torch.Tensor] = {}
    for directory in directories:
        path = Path(directory) / WEIGHTS
        try:
            weights = load_file(path)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path}: cannot load the weights ({e})") from None
        if total and (weights.keys() != total.keys() or any(weights[k].shape != total[k].shape for k in total)):
            raise CheckpointError(f"{path}: weights do not match those of {directories[0]}; only one model's checkpoints can be averaged")
        for name, tensor in weights.items():
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    return {name: (tensor / len(directories)).float() for name, tensor in total.items()}


def _model_dir_of(directory: Path) -> Path:
    """A model directory itself, or the run (model directory) a training checkpoint belongs to."""
    checkpoint = Path(directory).resolve()  # "step_00000010" given from inside checkpoints/, "../step_N" or a link: its real parents
    source = checkpoint if (checkpoint / CONFIG).is_file() else checkpoint.parent.parent  # run_dir/checkpoints/step_N -> run_dir
    if not (source / CONFIG).is_file():
        raise CheckpointError(f"{checkpoint}: neither a model directory nor a training checkpoint of one (no {CONFIG} in it or in {source})")
    return source


def _start(recipe: Recipe) -> str:
    """Where a run's weights started: the model it fine-tuned, or the initial weights its seed drew. Runs from different
    starts hold their features in different units: their mean is no model (the SentencePiece model of two seeds is the same)."""
    return f"the model {recipe.train.init_from}" if recipe.train.init_from else f"seed {recipe.seed}'s initial weights"


def _pair(recipe: Recipe) -> str:
    return f"{recipe.data.src_lang} to {recipe.data.tgt_lang}"


def save_averaged(directories: list[Path], out: Path) -> None:
    """A model directory whose weights average `directories`; config and tokenizer from the first one's run.
    `out` must not hold a model already: averaging never overwrites one."""
    if (Path(out) / CONFIG).exists() or (Path(out) / WEIGHTS).exists():
        raise CheckpointError(f"{out} already holds a model; choose another output directory")
    if Path(out).exists() and not Path(out).is_dir():
        raise CheckpointError(f"{out} is a file; averaging writes a model directory")
    above = next(p for p in Path(out).absolute().parents if p.exists())  # where the folders for `out` would start
    if not above.is_dir():
        raise CheckpointError(f"{out}: {above} is a file, so no folder can be made in it")
    first, source = Path(directories[0]), _model_dir_of(directories[0])
    recipe = load_recipe_json(source)
    tokenizer = _load_tokenizer(source / SPM)
    for directory in directories[1:]:  # same shapes under another vocabulary, or from another start, average into nonsense, silently
        if _load_tokenizer(_model_dir_of(directory) / SPM).model_proto != tokenizer.model_proto:
            raise CheckpointError(f"{directory}: its run's SentencePiece model differs from {first}'s; "
                                  "only one run's checkpoints can be averaged")
        other = load_recipe_json(_model_dir_of(directory))
        if (pair := _pair(other)) != _pair(recipe):  # a joint vocabulary and one seed: the two directions of one corpus
            raise CheckpointError(f"{directory}: its run translates {pair}, {first}'s {_pair(recipe)}; "
                                  "only one run's checkpoints can be averaged")
        if (start := _start(other)) != _start(recipe):
            raise CheckpointError(f"{directory}: its run started from {start}, {first}'s from {_start(recipe)}; only one run's "
                                  "checkpoints can be averaged, or models fine-tuned from the same model")
    model = Transformer(recipe.model, tokenizer.vocab_size)
    _load_weights(model, average_weights(directories), first / WEIGHTS, str(source / CONFIG))
    save_model_dir(out, model, recipe, tokenizer)
