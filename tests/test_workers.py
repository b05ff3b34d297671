"""Decoding in several processes: the same translations as one process, in input order, from the current weights."""

import copy
import gc
import multiprocessing
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from translator import Sampling, Translator
from translator.api import Translation

from test_search import SENTENCES

MIXED = SENTENCES * 3 + ["", "   "] + SENTENCES[::-1]  # blank lines map to "" wherever they land


def with_two_workers(translator: Translator) -> Translator:
    """A Translator of the same model, tokenizer and recipe, decoding in 2 worker processes (forked at its first call)."""
    return Translator(translator.model, translator.tokenizer, translator.recipe, workers=2)


@pytest.fixture(scope="module")
def two_workers(tiny_translator):
    return with_two_workers(tiny_translator)


@pytest.mark.parametrize("options", [dict(beam_size=1), dict(beam_size=4), dict(beam_size=4, n_best=3), dict(beam_size=1, precision="int8"),
                                     dict(sampling=Sampling(top_k=5, seed=7), n_best=2)],
                         ids=["greedy", "beam", "n_best", "int8", "sampling"])
def test_two_workers_translate_as_one_process(tiny_translator, two_workers, options):
    """The same texts; the same scores up to float rounding (a sentence's batch companions differ)."""
    in_workers, alone = two_workers.translate(MIXED, **options), tiny_translator.translate(MIXED, **options)
    if "n_best" not in options:
        assert in_workers == alone
        return
    assert [[t.text for t in ts] for ts in in_workers] == [[t.text for t in ts] for ts in alone]
    assert [t.score for ts in in_workers for t in ts] == pytest.approx([t.score for ts in alone for t in ts], rel=1e-5)


def test_progress_shows_one_bar_from_the_workers_and_none_when_off(tiny_translator, capfd):
    # Workers forked here, under this test's capture of stderr (they keep the stderr they were forked with).
    two_workers = with_two_workers(tiny_translator)
    capfd.readouterr()  # what making the fixtures printed
    two_workers.translate(MIXED, beam_size=1)
    assert "translating" not in capfd.readouterr().err
    two_workers.translate(MIXED, beam_size=1, progress=True)
    err = capfd.readouterr().err
    assert err.count("translating:   0%") == 1 and "100%" in err  # one bar (the first worker's), to its end


def pids_translator(tiny_translator, monkeypatch) -> Translator:
    """Two workers whose translations name the process that made them (patched before they fork)."""
    translator = with_two_workers(tiny_translator)
    monkeypatch.setattr(translator, "_translate", lambda sentences, **options: [[Translation(str(os.getpid()), 0.0)] for _ in sentences])
    return translator


def alive(pid: str) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_go_when_their_translator_is_collected(tiny_translator, monkeypatch):
    translator = pids_translator(tiny_translator, monkeypatch)
    pids = set(translator.translate(SENTENCES * 2, beam_size=1))
    monkeypatch.undo()  # the patch holds the translator too
    del translator
    gc.collect()
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_attention_maps_come_back_from_workers_under_a_low_limit_of_open_files(tiny_model_dir):
    """Workers hand their answers back by value: 60 sentences' maps are 180 tensors, and shared through file
    descriptors (pipe.send's pickler) they would pass a limit of 64 open files. The maps equal one process's."""
    sentences = SENTENCES * 12
    program = ("import resource, pickle, sys, translator; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
               f"t = translator.Translator.from_pretrained({str(tiny_model_dir)!r}, workers=2); "
               f"maps = [tr.attention for tr in t.translate({sentences!r}, beam_size=1, return_attention=True)]; "
               "sys.stdout.buffer.write(pickle.dumps([(m.encoder, m.decoder, m.cross) for m in maps]))")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    in_workers = pickle.loads(result.stdout)
    alone = Translator.from_pretrained(tiny_model_dir).translate(sentences, beam_size=1, return_attention=True)
    assert len(in_workers) == len(alone) == 60
    for got, expected in zip(in_workers, alone):
        for tensor, reference in zip(got, (expected.attention.encoder, expected.attention.decoder, expected.attention.cross)):
            torch.testing.assert_close(tensor, reference)


def test_a_fork_that_fails_takes_the_workers_forked_before_it(tiny_translator, monkeypatch):
    """Out of memory or processes at the third fork: the error reaches the caller, and the two workers
    already forked do not stay behind (no Translator holds them, so nothing else would end them)."""
    started = []
    start = multiprocessing.context.ForkProcess.start

    def third_fails(process):
        if len(started) == 2:
            raise OSError(12, "Cannot allocate memory")
        start(process)
        started.append(process)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", third_fails)
    translator = Translator(tiny_translator.model, tiny_translator.tokenizer, tiny_translator.recipe, workers=3)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        translator.translate(SENTENCES, beam_size=1)
    assert len(started) == 2 and not any(process.is_alive() for process in started)


@pytest.mark.parametrize("end", ["exits", "is killed"])
def test_workers_go_when_the_program_ends(tiny_model_dir, end):
    """At exit the workers are killed; a program killed outright (SIGKILL, the OOM killer) kills nothing,
    and its workers see it gone and end themselves."""
    program = (f"import glob, os, signal, translator; t = translator.Translator.from_pretrained({str(tiny_model_dir)!r}, workers=2); "
               f"t.translate({SENTENCES * 2!r}, beam_size=1); "
               "print(*(pid for task in glob.glob(f'/proc/{os.getpid()}/task/*/children') for pid in open(task).read().split()), flush=True)"
               + ("; os.kill(os.getpid(), signal.SIGKILL)" if end == "is killed" else ""))
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    pids = result.stdout.split()
    assert result.returncode == (0 if end == "exits" else -signal.SIGKILL) and len(pids) == 2, result.stderr
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def test_the_sentences_are_decoded_in_two_other_processes_that_stay_for_the_next_call(tiny_translator, monkeypatch):
    translator = pids_translator(tiny_translator, monkeypatch)
    pids = set(translator.translate(SENTENCES * 2, beam_size=1))
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert set(translator.translate(SENTENCES * 2, beam_size=1)) == pids
    translator.close()
    assert not any(alive(pid) for pid in pids)


def test_sigterm_and_ctrl_c_to_the_process_group_leave_the_workers_to_their_parent(tiny_translator, monkeypatch):
    """A service manager's SIGTERM (systemd's KillMode=control-group) and Ctrl-C reach the workers too: they keep
    decoding, so that a server can still answer the requests in flight, and go when their parent kills them."""
    translator = pids_translator(tiny_translator, monkeypatch)
    pids = set(translator.translate(SENTENCES * 2, beam_size=1))
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)
        os.kill(int(pid), signal.SIGINT)
    time.sleep(0.5)
    assert all(alive(pid) for pid in pids)
    assert set(translator.translate(SENTENCES * 2, beam_size=1)) == pids  # the same processes, not replacements
    translator.close()
    assert not any(alive(pid) for pid in pids)


def test_a_call_interrupted_by_ctrl_c_kills_its_workers(tiny_translator, monkeypatch):
    """Ctrl-C in the caller while the workers decode: answers may be left in their pipes, so they go."""
    translator = with_two_workers(tiny_translator)

    def pid_or_stall(sources, **options):  # a share of one sentence answers at once; a longer one stalls
        if len(sources) > 1:
            time.sleep(60)
        return [[Translation(str(os.getpid()), 0.0)] for _ in sources]

    monkeypatch.setattr(translator, "_translate", pid_or_stall)
    pids = set(translator.translate(SENTENCES[:2], beam_size=1))
    ctrl_c = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    with pytest.raises(KeyboardInterrupt):
        translator.translate(SENTENCES * 2, beam_size=1)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_workers_hold_no_copy_of_the_parents_sockets(tiny_translator, monkeypatch):
    """A server's listening socket and client connections stay the server's: a connection it closes must close (a
    copy in a worker kept a kept-alive client waiting for a FIN), and a worker must not hold its port."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        translator = pids_translator(tiny_translator, monkeypatch)
        pids = set(translator.translate(SENTENCES * 2, beam_size=1))
        inode = f"socket:[{os.fstat(server.fileno()).st_ino}]"
        for pid in pids:
            assert inode not in [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        assert set(translator.translate(SENTENCES * 2, beam_size=1)) == pids  # their own pipes still work
        translator.close()
    finally:
        server.close()


def test_a_worker_that_died_is_replaced_at_the_next_call(tiny_translator, monkeypatch):
    translator = pids_translator(tiny_translator, monkeypatch)
    first = set(translator.translate(SENTENCES * 2, beam_size=1))
    os.kill(int(min(first)), signal.SIGKILL)
    while alive(min(first)):  # the signal lands a moment later
        time.sleep(0.01)
    second = set(translator.translate(SENTENCES * 2, beam_size=1))
    assert len(second) == 2 and not second & first and not any(alive(pid) for pid in first)
    translator.close()


class NeedsTwoArguments(Exception):  # pickles, then fails to unpickle: __init__ gets the message alone
    def __init__(self, what: str, where: int):
        super().__init__(f"{what} at {where}")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")


@pytest.mark.parametrize("error", [Unpicklable("the model broke"), NeedsTwoArguments("the model broke", 3)], ids=["pickle", "unpickle"])
def test_an_error_that_does_not_cross_the_pipe_still_reaches_the_caller_in_words(tiny_translator, monkeypatch, error):
    translator = with_two_workers(tiny_translator)
    def fail(sentences, **options):
        raise error

    monkeypatch.setattr(translator, "_translate", fail)
    with pytest.raises(RuntimeError, match="in a decoding worker: .*the model broke"):
        translator.translate(SENTENCES, beam_size=1)
    translator.close()


def test_a_worker_dying_mid_call_is_an_error_that_names_it_and_the_next_call_works(tiny_translator, monkeypatch):
    translator = with_two_workers(tiny_translator)
    real = translator._translate
    # the worker dealt the blank sentence (None: no source ids) dies
    monkeypatch.setattr(translator, "_translate", lambda sources, **options: os._exit(3) if None in sources else real(sources, **options))
    with pytest.raises(RuntimeError, match="decoding worker ended without an answer"):
        translator.translate(SENTENCES + [""], beam_size=1)
    monkeypatch.setattr(translator, "_translate", real)  # the next workers fork from here
    assert translator.translate(SENTENCES, beam_size=1) == tiny_translator.translate(SENTENCES, beam_size=1)
    translator.close()


def test_an_error_in_a_worker_is_raised_by_the_call_and_leaves_the_workers_running(tiny_translator, monkeypatch):
    translator = with_two_workers(tiny_translator)
    def fail(sources, **options):
        raise ValueError(f"a worker of pid {os.getpid()} failed")

    monkeypatch.setattr(translator, "_translate", fail)
    with pytest.raises(ValueError, match="a worker of pid") as raised:
        translator.translate(SENTENCES, beam_size=1)
    worker = re.search(r"pid (\d+)", str(raised.value)).group(1)
    assert worker != str(os.getpid()) and alive(worker)  # answered in words, not by dying: kept for the next call
    translator.close()
    assert not alive(worker)


def test_an_overlong_sentence_is_warned_of_or_refused_in_the_callers_process_by_its_index(two_workers):
    """Checked before the sentences are dealt out: the caller's warning filters see the warning, and
    the index is the caller's, not one in a worker's share."""
    sentences = SENTENCES + ["Ein mann sieht der hut. " * 300] + SENTENCES
    with pytest.raises(ValueError, match=rf"1 sentence\(s\) longer than model\.max_positions=256 tokens \(first: index {len(SENTENCES)},"):
        two_workers.translate(sentences, beam_size=1, truncate=False)
    with pytest.warns(UserWarning, match=rf"first: index {len(SENTENCES)},.*truncated"):
        translations = two_workers.translate(sentences, beam_size=1)
    assert translations[:len(SENTENCES)] == translations[len(SENTENCES) + 1:] == two_workers.translate(SENTENCES, beam_size=1)


def test_workers_decode_with_the_weights_of_the_moment(tiny_translator):
    model = copy.deepcopy(tiny_translator.model)
    translator = Translator(model, tiny_translator.tokenizer, tiny_translator.recipe, workers=2)

    def alone():
        return Translator(model, tiny_translator.tokenizer, tiny_translator.recipe).translate(SENTENCES, beam_size=1)

    before = translator.translate(SENTENCES, beam_size=1)
    torch.manual_seed(0)
    noisy = {name: p + torch.randn_like(p) * 0.5 for name, p in model.state_dict().items()}
    model.load_state_dict(noisy, assign=True)  # new tensors (a reload), whose counts of in-place writes are 0 as before
    after = translator.translate(SENTENCES, beam_size=1)
    assert after == alone() and after != before  # the noise changed the translations, so the comparison means something
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # as training would between two validations, in place
    moved = translator.translate(SENTENCES, beam_size=1)
    assert moved == alone() and moved != after
    translator.close()


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2"])
def test_a_bad_worker_count_names_the_argument(tiny_translator, workers):
    with pytest.raises(ValueError, match="workers"):
        Translator(tiny_translator.model, tiny_translator.tokenizer, tiny_translator.recipe, workers=workers)


def test_workers_are_refused_off_the_cpu_when_the_translator_is_made_naming_the_device(tiny_translator):
    elsewhere = copy.deepcopy(tiny_translator.model).to("meta")  # any device but the CPU: what a GPU's model would meet
    with pytest.raises(ValueError, match="CPU only.*meta"):
        Translator(elsewhere, tiny_translator.tokenizer, tiny_translator.recipe, workers=2)
