"""Data-parallel training under torchrun (gloo on CPU): ranks agree, and two processes are one
process that accumulates the same batches, dropout masks included."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RECIPE
from translator.checkpoint import DATA, SPM, WEIGHTS, training_checkpoints


def settings(corpus, out, *extra):
    args = [f"data.path={corpus}", f"out_dir={out}", "train.max_steps=40", "train.valid_every=20", "train.checkpoint_every=20",
            "train.threads=1", *extra]
    return [part for item in args for part in ("--set", item)]


def train_cli(launcher, corpus, out, *extra, resume=False):
    command = [*launcher, "-m", "translator", "train", str(TINY_RECIPE), "--quiet", *(["--resume"] if resume else []), *settings(corpus, out, *extra)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def torchrun(n):
    """--standalone: the launcher binds a free port itself (a port picked here first could be taken before it binds)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


@pytest.mark.slow
def test_two_processes_train_like_one_accumulating_their_batches_and_resume_on_one_accumulating_two(tmp_path, toy_corpus):
    """Bitwise: dropout masks are drawn from the global batch, and the loss scales are powers of two apart."""
    two = train_cli(torchrun(2), toy_corpus, tmp_path / "two", "model.dropout=0.1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "weights identical on all 2 processes" in two.stderr
    assert two.stdout.count("test (greedy)") == 1  # only rank 0 reports

    one = train_cli([sys.executable], toy_corpus, tmp_path / "one", "model.dropout=0.1", "train.accum_steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(training_checkpoints(tmp_path / "two")[-1] / WEIGHTS)
    b = load_file(training_checkpoints(tmp_path / "one")[-1] / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP shards, dropout masks or loss scaling differ from accumulation"

    losses = [e["loss"] for e in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert losses[-1] < losses[0]

    # on one process, accumulating two batches: the same global batch, so bitwise the one-process run's next 20 updates
    for run in ("two", "one"):
        more = train_cli([sys.executable], toy_corpus, tmp_path / run, "model.dropout=0.1", "train.max_steps=60", "train.accum_steps=2",
                         resume=True)
        assert more.returncode == 0, more.stderr[-3000:]
        assert "batches per update" not in more.stderr
    a = load_file(training_checkpoints(tmp_path / "two")[-1] / WEIGHTS)
    b = load_file(training_checkpoints(tmp_path / "one")[-1] / WEIGHTS)
    assert training_checkpoints(tmp_path / "two")[-1].name == "step_00000060" and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_train_on_rank_0s_sampled_pieces_and_resume_from_them(tmp_path, toy_corpus):
    """data.subword_sampling under torchrun: rank 0 draws each epoch's pieces and sends them (which
    pieces the ranks cut is checked in test_data.py); the checkpoint keeps them for the resume."""
    first = train_cli(torchrun(2), toy_corpus, tmp_path / "run", "data.subword_sampling=0.1", "train.max_steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (training_checkpoints(tmp_path / "run")[-1] / DATA).is_file()
    rest = train_cli(torchrun(2), toy_corpus, tmp_path / "run", "data.subword_sampling=0.1", resume=True)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "weights identical on all 2 processes" in rest.stderr


@pytest.mark.slow
def test_two_processes_resume_bitwise_with_dropout_on(tmp_path, toy_corpus):
    """Dropout masks are keyed by (seed, step, batch), so no generator state needs saving: stopped at
    step 20 and resumed on 2 processes, the run ends bitwise where an uninterrupted one does, dropout included."""
    straight = train_cli(torchrun(2), toy_corpus, tmp_path / "straight", "model.dropout=0.1")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train_cli(torchrun(2), toy_corpus, tmp_path / "stopped", "model.dropout=0.1", "train.max_steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    rest = train_cli(torchrun(2), toy_corpus, tmp_path / "stopped", "model.dropout=0.1", resume=True)
    assert rest.returncode == 0, rest.stderr[-3000:]
    a = load_file(training_checkpoints(tmp_path / "straight")[-1] / WEIGHTS)
    b = load_file(training_checkpoints(tmp_path / "stopped")[-1] / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("on_nan", ["skip", "stop"])
def test_a_nan_on_one_rank_skips_or_stops_on_every_rank_without_hanging(tmp_path, toy_corpus, on_nan):
    script = str(Path(__file__).with_name("nan_on_one_rank.py"))
    command = [*torchrun(2), script, "train", str(TINY_RECIPE), "--quiet", *settings(toy_corpus, tmp_path / "run", f"train.on_nan={on_nan}")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)  # a hang fails here
    if on_nan == "stop":
        assert result.returncode != 0 and "loss is nan at step 5" in result.stderr
        assert not training_checkpoints(tmp_path / "run")  # nothing was saved past the NaN
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 processes" in result.stderr  # rank 0 skipped the update rank 1's NaN spoiled
    skipped = [e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "skipped" in e]
    assert [e["step"] for e in skipped] == [5]


@pytest.mark.slow
def test_two_processes_fine_tune_like_one_accumulating_their_batches(tmp_path, toy_corpus, tiny_model_dir):
    """train.init_from under torchrun: the ranks start from the model's weights and SentencePiece model (rank 0
    stores it in the run, where the others read it), bitwise as one process accumulating their batches."""
    init = [f"train.init_from={tiny_model_dir}", "train.lr=0.0001", "model.dropout=0.1"]
    two = train_cli(torchrun(2), toy_corpus, tmp_path / "two", *init)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train_cli([sys.executable], toy_corpus, tmp_path / "one", *init, "train.accum_steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(training_checkpoints(tmp_path / "two")[-1] / WEIGHTS)
    b = load_file(training_checkpoints(tmp_path / "one")[-1] / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "two" / SPM).read_bytes() == (tiny_model_dir / SPM).read_bytes()
    trained, tuned = ([e["valid_bleu"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "valid_bleu" in e]
                      for run in (tiny_model_dir, tmp_path / "two"))
    assert tuned[0] > 0.7 * trained[-1]  # from fresh weights, updates at this learning rate translate next to nothing (test_fine_tuning.py)


WAITS_FOR_RANK_0 = """
import datetime, time
import torch.distributed as dist
from translator.distributed import join
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))  # the training collectives' limit, made short
world = join()
with world.main_first():
    if world.is_main:
        time.sleep(8)  # rank 0 alone preparing the corpus, past that limit
value = world.from_main("ready" if world.is_main else None)
print(world.rank, value, flush=True)
dist.destroy_process_group()
"""


def test_ranks_wait_for_rank_0_past_the_collectives_timeout(tmp_path):
    """Rank 0 prepares the data alone (a large corpus: hours) while the others wait. They wait through World's own gloo
    group: under the default group NCCL's watchdog would end a wait of 10 minutes (here: 3 seconds) and the job with it."""
    script = tmp_path / "waits.py"
    script.write_text(WAITS_FOR_RANK_0)
    result = subprocess.run([*torchrun(2), str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(result.stdout.split()) == ["0", "1", "ready", "ready"]
