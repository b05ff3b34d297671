"""Model directories: save -> load is lossless, loading never runs code, broken files are named, writes are atomic."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import random
import shutil
import stat
import tempfile
import threading

import pytest
import sentencepiece as spm
import torch

from conftest import toy_pair
from translator import Translator
from translator.checkpoint import (
    CONFIG, FORMAT_VERSION, SPM, WEIGHTS, CheckpointError, atomic_write, load_model_dir, staged_directory, staged_text_file,
    training_checkpoints,
)


class TouchOnUnpickle:
    """A pickle payload: unpickling it calls Path.touch(marker), i.e. runs code chosen by the file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def toy_sentences(n: int = 16, seed: int = 99) -> list[str]:
    rng = random.Random(seed)
    return [toy_pair(rng)["de"] for _ in range(n)]


@pytest.fixture
def saved(tiny_translator, tmp_path) -> pathlib.Path:
    out = tmp_path / "model"
    tiny_translator.save_pretrained(out)
    return out


def test_directory_layout(saved, tiny_translator):
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG, WEIGHTS, SPM])  # no temporary files left
    config = json.loads((saved / CONFIG).read_text(encoding="utf-8"))
    assert config["format_version"] == FORMAT_VERSION == 1
    assert config["recipe"] == tiny_translator.recipe.to_dict()
    assert (saved / SPM).read_bytes() == tiny_translator.tokenizer.model_proto
    assert (saved / WEIGHTS).stat().st_size > 0


def test_save_load_round_trip(saved, tiny_translator):
    loaded = Translator.from_pretrained(saved)
    assert loaded.recipe == tiny_translator.recipe
    assert loaded.tokenizer.model_proto == tiny_translator.tokenizer.model_proto

    before, after = tiny_translator.model.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key

    sentences = toy_sentences()
    for beam_size in (1, 3):
        expected = tiny_translator.translate(sentences, beam_size=beam_size)
        assert loaded.translate(sentences, beam_size=beam_size) == expected
        assert any(expected), "the tiny model translates something"


def test_loaded_model_is_in_eval_mode(saved):
    recipe, model, tokenizer = load_model_dir(saved)
    assert not model.training
    assert model.embedding.weight.shape[0] == tokenizer.vocab_size
    assert recipe.model.d_model == model.embedding.weight.shape[1]


def test_save_over_an_existing_directory(saved, tiny_translator):
    tiny_translator.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG, WEIGHTS, SPM])
    loaded = Translator.from_pretrained(saved)
    sentences = toy_sentences(4)
    assert loaded.translate(sentences, beam_size=1) == tiny_translator.translate(sentences, beam_size=1)


def test_an_interrupted_save_leaves_the_directory_as_it_was(saved, tiny_translator, tmp_path, monkeypatch):
    import translator.checkpoint as checkpoint

    def interrupted(model, path):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_weights", interrupted)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    (tmp_path / "new").mkdir()
    for target in (saved, tmp_path / "new" / "model", tmp_path / "new" / "made" / "for" / "it" / "model"):
        with pytest.raises(KeyboardInterrupt):
            tiny_translator.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no staging folder left, no file changed
    assert list((tmp_path / "new").iterdir()) == []  # nothing of the new directories, nor the folders made for them


def test_a_save_that_cannot_make_its_staging_folder_leaves_no_folders(tiny_translator, tmp_path, monkeypatch):
    def full_disk(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full_disk)
    with pytest.raises(OSError, match="No space"):
        tiny_translator.save_pretrained(tmp_path / "made" / "for" / "it" / "model")
    assert list(tmp_path.iterdir()) == []


def test_staged_outputs_are_on_disk_before_they_are_put_in_place(tmp_path, monkeypatch):
    """A file written plainly into a staging folder (distill, CTranslate2's export) or file
    (translate -o) is fsynced before the rename: after a power cut, the output is there with its
    data, or the old one is."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    out = tmp_path / "distilled"
    with staged_directory(out) as staging:
        for name in ("train.de", "train.en"):
            (staging / name).write_text("ein Satz\n", encoding="utf-8")
    placed = events.index(("replace", str(staging)))
    assert {("fsync", str(staging / name)) for name in ("train.de", "train.en")} | {("fsync", str(staging))} <= set(events[:placed])
    assert (out / "train.de").read_text(encoding="utf-8") == "ein Satz\n"
    events.clear()
    with staged_text_file(tmp_path / "translations.txt") as f:  # translate -o
        f.write("ein Satz\n")
    ((_, written),) = [event for event in events if event[0] == "replace"]
    assert events.index(("fsync", written)) < events.index(("replace", written))


# --- nothing executes on load ------------------------------------------------------------------


def test_pickle_payload_works_as_a_payload(tmp_path):
    # The premise of the next tests: unpickling this object really creates the marker.
    marker = tmp_path / "premise"
    pickle.loads(pickle.dumps(TouchOnUnpickle(marker)))
    assert marker.exists()


def test_pickle_weights_are_rejected_without_running_code(saved, tmp_path):
    marker = tmp_path / "pwned"
    (saved / WEIGHTS).write_bytes(pickle.dumps({"weights": TouchOnUnpickle(marker)}))
    with pytest.raises(CheckpointError, match=WEIGHTS):
        Translator.from_pretrained(saved)
    assert not marker.exists()


def test_torch_save_weights_are_rejected_without_running_code(saved, tmp_path):
    marker = tmp_path / "pwned_torch"
    buffer = io.BytesIO()
    torch.save({"weights": TouchOnUnpickle(marker)}, buffer)
    (saved / WEIGHTS).write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=WEIGHTS):
        Translator.from_pretrained(saved)
    assert not marker.exists()


# --- broken directories are named --------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.01, 4], ids=["half", "header", "4-bytes"])
def test_truncated_weights(saved, keep):
    path = saved / WEIGHTS
    data = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=WEIGHTS):
        Translator.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS):
        Translator.from_pretrained(saved)


def test_weights_that_do_not_match_the_config(saved):
    config = json.loads((saved / CONFIG).read_text(encoding="utf-8"))
    config["recipe"]["model"]["d_model"] *= 2
    (saved / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}.*do not match"):
        Translator.from_pretrained(saved)


def test_unknown_format_version(saved):
    config = json.loads((saved / CONFIG).read_text(encoding="utf-8"))
    config["format_version"] = 99
    (saved / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{CONFIG}.*format_version 99"):
        Translator.from_pretrained(saved)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"recipe": {}}'], ids=["broken", "empty", "list", "no-version"])
def test_unreadable_config(saved, text):
    (saved / CONFIG).write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match=CONFIG):
        Translator.from_pretrained(saved)


def test_missing_config(saved):
    (saved / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=CONFIG):
        Translator.from_pretrained(saved)


def test_invalid_recipe_in_config(saved):
    config = json.loads((saved / CONFIG).read_text(encoding="utf-8"))
    config["recipe"]["model"]["d_modle"] = 3
    (saved / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{CONFIG}.*did you mean model\.d_model"):
        Translator.from_pretrained(saved)


@pytest.mark.parametrize("recipe", [None, [1, 2]], ids=["null", "list"])
def test_recipe_that_is_not_a_mapping(saved, recipe):
    (saved / CONFIG).write_text(json.dumps({"format_version": 1, "recipe": recipe}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=CONFIG):
        Translator.from_pretrained(saved)


def test_garbage_sentencepiece_model(saved):
    (saved / SPM).write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=SPM):
        Translator.from_pretrained(saved)


def test_empty_sentencepiece_model(saved):
    (saved / SPM).write_bytes(b"")
    with pytest.raises(CheckpointError, match=SPM):
        Translator.from_pretrained(saved)


def test_missing_sentencepiece_model(saved):
    (saved / SPM).unlink()
    with pytest.raises(CheckpointError, match=SPM):
        Translator.from_pretrained(saved)


def test_sentencepiece_model_with_other_special_ids(saved):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(toy_sentences(200)), model_writer=model, vocab_size=40, hard_vocab_limit=False, minloglevel=2
    )  # SentencePiece's default ids: unk 0, bos 1, eos 2, no pad
    (saved / SPM).write_bytes(model.getvalue())
    with pytest.raises(CheckpointError, match=SPM):
        Translator.from_pretrained(saved)


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match=str(missing)):
        Translator.from_pretrained(missing)


def test_a_file_is_not_a_model_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not found"):
        Translator.from_pretrained(path)


# --- atomic writes -----------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old content")
    before = sorted(os.listdir(tmp_path))
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        assert pathlib.Path(tmp).parent == tmp_path  # same directory, so the rename is atomic
        with open(tmp, "wb") as f:
            f.write(b"new cont")
        raise error("disk full")

    with pytest.raises(error):
        atomic_write(path, write)
    assert path.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == before
    assert not pathlib.Path(seen[0]).exists()


def test_atomic_write_failure_on_a_new_file_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "config.json"

    def write(tmp: str) -> None:
        pathlib.Path(tmp).write_text("{")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, write)
    assert not path.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "deep" / "er" / "config.json"
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("first"))
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text("second"))
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["config.json"]


def test_copy_of_a_model_directory_loads(saved, tmp_path):
    # Self-contained: nothing in the directory points back at where it was written.
    copy = tmp_path / "elsewhere"
    shutil.copytree(saved, copy)
    shutil.rmtree(saved)
    sentences = toy_sentences(4)
    assert len(Translator.from_pretrained(copy).translate(sentences, beam_size=1)) == 4


def test_a_model_directory_and_its_checkpoints_are_readable_as_plain_files_and_directories(tiny_model_dir, saved):
    umask = os.umask(0o022)
    os.umask(umask)
    files = [directory / name for directory in (tiny_model_dir, saved) for name in (CONFIG, WEIGHTS, SPM)]
    directories = [saved, *training_checkpoints(tiny_model_dir)]  # saved: save_pretrained's new directory
    assert len(directories) > 1
    files += [file for checkpoint in directories[1:] for file in checkpoint.iterdir()]  # weights and Adam moments too
    assert not [p.name for p in pathlib.Path(tiny_model_dir).rglob(".*")]  # and no writer's temporary file left anywhere
    # what open() and mkdir() give under this umask, not mkstemp's and mkdtemp's owner-only 0600 and 0700
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}
    assert {stat.S_IMODE(d.stat().st_mode) for d in directories} == {0o777 & ~umask}


def test_a_staged_output_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    private, fresh = tmp_path / "private.txt", tmp_path / "fresh.txt"
    private.write_text("old\n")
    private.chmod(0o600)  # translations of confidential text, kept from other users
    for path in (private, fresh):
        with staged_text_file(path) as f:
            f.write("new\n")
    assert private.read_text() == "new\n" and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # a new file: what open() would give, not mkstemp's 0600


def test_a_staged_output_replaces_a_links_target_and_writes_through_a_pipe(tmp_path):
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old\n")
    link.symlink_to(target)
    with staged_text_file(link) as f:
        f.write("new\n")
    assert link.is_symlink() and target.read_text() == "new\n"  # the link stays a link; its target is the new file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    with staged_text_file(fifo) as f:  # `translate -o fifo`, `-o >(gzip > out.gz)`: written into, never renamed over
        f.write("through\n")
    reader.join(timeout=30)
    assert received == ["through\n"] and stat.S_ISFIFO(fifo.stat().st_mode)
