"""Training loses nothing: killed at any moment and resumed, it ends bitwise where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RECIPE
from translator import load_recipe, train
from translator.train import Stopped
from translator.checkpoint import OPTIMIZER, WEIGHTS, load_training_checkpoint, run_dir_held, save_training_checkpoint, training_checkpoints
from translator.config import ModelConfig, RecipeError
from translator.model import Transformer
from translator.tokenizer import Tokenizer

STEPS = 240


def overrides(corpus: Path, out: Path) -> list[str]:
    # dropout on, so the masks must come back the same after resuming; one thread, so float sums happen in one order
    return [f"data.path={corpus}", f"out_dir={out}", f"train.max_steps={STEPS}", "train.checkpoint_every=20",
            "train.valid_every=120", "model.dropout=0.1", "train.threads=1", "train.keep_checkpoints=3"]


def start(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "translator", "train", str(TINY_RECIPE), "--quiet", *extra]
    for item in overrides(corpus, out):
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint_after(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [int(p.name.split("_")[1]) for p in training_checkpoints(out)]
        if (done and max(done) > step) or process.poll() is not None:
            return
        time.sleep(0.005)
    raise TimeoutError(f"no checkpoint after step {step} in {out}")


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    last = training_checkpoints(out)[-1]
    assert last.name == f"step_{STEPS:08d}"
    return {**load_file(last / WEIGHTS), **{f"optim.{k}": v for k, v in load_file(last / OPTIMIZER).items()}}


@pytest.mark.slow
def test_killed_twice_and_resumed_equals_uninterrupted(tmp_path, toy_corpus):
    train(load_recipe(TINY_RECIPE, overrides(toy_corpus, tmp_path / "straight")), progress=False)

    out = tmp_path / "killed"
    process = start(toy_corpus, out)
    kills, last_step = 0, 0
    while process.poll() is None or process.returncode == -signal.SIGKILL:
        if process.poll() is not None:  # killed: resume
            process = start(toy_corpus, out, "--resume")
        wait_for_checkpoint_after(out, last_step, process)
        if process.poll() is None and kills < 2:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            last_step = int(training_checkpoints(out)[-1].name.split("_")[1])
        elif process.poll() is None:
            process.wait(timeout=300)
    assert process.returncode == 0, process.stderr.read()
    assert kills == 2, "the run finished before it could be killed twice"

    straight, resumed = final_tensors(tmp_path / "straight"), final_tensors(out)
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"resumed run differs in {different[:5]}"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes_to_the_unstopped_runs_average(tmp_path, toy_corpus):
    averaging = ("--set", "train.average_last=3")
    train(load_recipe(TINY_RECIPE, [*overrides(toy_corpus, tmp_path / "straight"), "train.average_last=3"]), progress=False)
    out = tmp_path / "run"
    process = start(toy_corpus, out, *averaging)
    wait_for_checkpoint_after(out, STEPS - 40, process)  # late: the step it stops at would be among the last 3
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert process.returncode == 143  # 128 + SIGTERM, as a shell reports a process it ended
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    stopped_at = int(training_checkpoints(out)[-1].name.split("_")[1])
    assert stopped_at < STEPS
    resumed = start(toy_corpus, out, "--resume", *averaging)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    # The step it stopped at (between two of every 20) is gone: the same checkpoints, the same mean of the last 3.
    assert [p.name for p in training_checkpoints(out)] == [p.name for p in training_checkpoints(tmp_path / "straight")]
    straight, stopped = load_file(tmp_path / "straight" / WEIGHTS), load_file(out / WEIGHTS)
    assert all(torch.equal(straight[k], stopped[k]) for k in straight)


def test_a_run_directory_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path, toy_corpus):
    out = tmp_path / "run"
    fresh = subprocess.run([sys.executable, "-m", "translator", "train", str(TINY_RECIPE), "--resume", "--set", f"out_dir={out}",
                            "--set", f"data.path={toy_corpus}"], capture_output=True, text=True)
    assert fresh.returncode == 2 and "no checkpoint" in fresh.stderr
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"a finished run's weights")
    again = subprocess.run([sys.executable, "-m", "translator", "train", str(TINY_RECIPE), "--set", f"out_dir={out}",
                            "--set", f"data.path={toy_corpus}"], capture_output=True, text=True)
    # Weights alone (a run stopped before its first checkpoint, an averaged or saved model): nothing to resume, so no
    # --resume is offered, which would only answer "no checkpoint".
    assert again.returncode == 2 and f"holds a model ({WEIGHTS}) and no checkpoint to resume from" in again.stderr
    assert "--resume" not in again.stderr and (out / WEIGHTS).read_bytes() == b"a finished run's weights"
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    with_checkpoint = subprocess.run([sys.executable, "-m", "translator", "train", str(TINY_RECIPE), "--set", f"out_dir={out}",
                                      "--set", f"data.path={toy_corpus}"], capture_output=True, text=True)
    assert with_checkpoint.returncode == 2 and "already holds a run; pass --resume" in with_checkpoint.stderr


def test_a_run_folder_in_use_by_another_training_process_is_refused_untouched(tmp_path, toy_corpus):
    out = tmp_path / "run"
    writing = out / "checkpoints" / ".step_00000004.x1y2"  # the live run's checkpoint, half written
    writing.mkdir(parents=True)
    with run_dir_held(out):  # the live run
        second = subprocess.run([sys.executable, "-m", "translator", "train", str(TINY_RECIPE), "--set", f"out_dir={out}",
                                 "--set", f"data.path={toy_corpus}"], capture_output=True, text=True)
    assert second.returncode == 2 and "in use by another training process" in second.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["checkpoints", "checkpoints/.step_00000004.x1y2"]
    with run_dir_held(out):  # held by no one now: taken again
        pass


def test_a_tilde_in_out_dir_is_the_home_folder(tmp_path, toy_corpus, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a YAML recipe's "~/runs/x" reaches no shell
    monkeypatch.chdir(tmp_path)
    train(load_recipe(TINY_RECIPE, [f"data.path={toy_corpus}", "out_dir=~/run", "train.max_steps=2", "train.valid_every=2"]), progress=False)
    assert (tmp_path / "home" / "run" / WEIGHTS).is_file() and not (tmp_path / "~").exists()


def test_a_signal_during_the_validation_that_stops_early_still_stops_the_command(tmp_path, toy_corpus, monkeypatch):
    training = sys.modules["translator.train"]  # the module (the package's `train` is the function)

    def converged_while_a_signal_came(run, state):  # the validation that ends the run, and SIGTERM during it
        os.kill(os.getpid(), signal.SIGTERM)
        return False, True

    monkeypatch.setattr(training, "validate_and_keep_best", converged_while_a_signal_came)
    with pytest.raises(Stopped) as stopped:
        train_to(toy_corpus, tmp_path / "run", 40)
    assert stopped.value.signal == signal.SIGTERM
    assert [p.name for p in training_checkpoints(tmp_path / "run")] == ["step_00000010", "step_00000020"]  # resumable from there


def test_a_signal_while_the_last_checkpoint_is_written_stops_the_command_before_the_test_split(tmp_path, toy_corpus, monkeypatch):
    training = sys.modules["translator.train"]
    real_save = training.save_checkpoint

    def signalled_at_the_end(run, state, scheduled):  # SIGTERM (a scheduler's grace period) while the last one is written
        real_save(run, state, scheduled)
        if state.step == run.recipe.train.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training, "save_checkpoint", signalled_at_the_end)
    with pytest.raises(Stopped) as stopped:  # not exit 0 after scoring the whole test split
        train_to(toy_corpus, tmp_path / "run", 20)
    assert stopped.value.signal == signal.SIGTERM
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert training_checkpoints(tmp_path / "run")[-1].name == "step_00000020" and '"test"' not in metrics


def test_the_loss_and_time_logged_after_a_resume_go_on_as_an_uninterrupted_runs_do(tmp_path, toy_corpus, monkeypatch):
    training = sys.modules["translator.train"]
    logged = ("train.log_every=10", "train.threads=1")
    train_to(toy_corpus, tmp_path / "straight", 40, *logged)
    real_update = training._update

    def signalled_in_step_25(run, state, batches):  # stops after step 25, halfway through a log window
        result = real_update(run, state, batches)
        if state.step == 25:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(training, "_update", signalled_in_step_25)
    with pytest.raises(Stopped):
        train_to(toy_corpus, tmp_path / "resumed", 40, *logged)
    monkeypatch.undo()
    train_to(toy_corpus, tmp_path / "resumed", 40, *logged, resume=True)

    def logged(run: str, key: str) -> list[tuple[int, float]]:
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(line["step"], line[key]) for line in lines if "loss" in line]

    assert [step for step, _ in logged("straight", "loss")] == [10, 20, 30, 40]
    assert logged("resumed", "loss") == logged("straight", "loss")  # step 30's line: steps 21-30, five of them before the stop
    elapsed = [seconds for _, seconds in logged("resumed", "elapsed_s")]  # the resumed part goes on from step 25's checkpoint
    assert elapsed == sorted(elapsed) and len(set(elapsed)) == 4, elapsed


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1), vocab_size=30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randint(4, 30, (2, 5)), torch.randint(4, 30, (2, 4))).sum().backward()
    optimizer.step()
    save_training_checkpoint(tmp_path, 10, model, optimizer, {"step": 10}, keep=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    import translator.checkpoint as checkpoint

    real_bytes, calls = checkpoint.tensors_bytes, []
    def crash_after_the_weights(tensors, **kwargs):  # noqa: E306
        calls.append(len(tensors))
        if len(calls) > 1:  # the weights are written whole, then the disk fills up
            raise OSError("disk full")
        return real_bytes(tensors, **kwargs)

    monkeypatch.setattr(checkpoint, "tensors_bytes", crash_after_the_weights)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match=r"disk full: writing .*step_00000020 \(the checkpoints before it are whole\)"):
        save_training_checkpoint(tmp_path, 20, model, optimizer, {"step": 20}, keep=2)
    monkeypatch.undo()

    assert [p.name for p in training_checkpoints(tmp_path)] == ["step_00000010"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers
    restored = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1), vocab_size=30)
    state = load_training_checkpoint(training_checkpoints(tmp_path)[-1], restored, torch.optim.AdamW(restored.parameters(), lr=0.01))
    assert state["step"] == 10
    assert all(torch.equal(before[k], v) for k, v in restored.state_dict().items())


def test_a_stops_checkpoint_left_by_a_kill_after_the_next_one_is_written_is_removed_before_resuming(tmp_path, monkeypatch):
    import translator.checkpoint as checkpoint

    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1), vocab_size=30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    save_training_checkpoint(tmp_path, 10, model, optimizer, {"step": 10}, keep=3)
    save_training_checkpoint(tmp_path, 15, model, optimizer, {"step": 15}, keep=3, scheduled=False)  # SIGTERM at step 15

    def killed(path):
        raise KeyboardInterrupt  # SIGKILL, as it would land between writing step 20 and deleting step 15

    monkeypatch.setattr(checkpoint, "_discard", killed)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 20, model, optimizer, {"step": 20}, keep=3)
    monkeypatch.undo()
    assert [p.name for p in training_checkpoints(tmp_path)] == ["step_00000010", "step_00000015", "step_00000020"]
    assert checkpoint.clean_interrupted_writes(tmp_path) == ["removed step_00000015, saved at a stop before step_00000020"]
    assert [p.name for p in training_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]  # what train.average_last takes


def test_a_half_written_checkpoint_directory_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / ".step_00000030.x1y2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000020").mkdir()
    assert [p.name for p in training_checkpoints(tmp_path)] == ["step_00000020"]


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    model = Transformer(ModelConfig(d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1), vocab_size=30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in (10, 20, 30, 40, 50):
        save_training_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=2, best_step=20)
    assert [p.name for p in training_checkpoints(tmp_path)] == ["step_00000020", "step_00000040", "step_00000050"]


@pytest.mark.slow
def test_auto_resume_starts_a_run_then_continues_it_and_never_overwrites_a_model(tmp_path, toy_corpus):
    out = tmp_path / "run"
    train_to(toy_corpus, out, 20, "train.threads=1", resume="auto")  # nothing there: a start
    first = last_weights(out)
    train_to(toy_corpus, out, 30, "train.threads=1", resume="auto")  # a checkpoint there: goes on from step 20
    assert [p.name for p in training_checkpoints(out)][-1] == "step_00000030"
    starts = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert starts == [0, 20] and not torch.equal(first["embedding.weight"], last_weights(out)["embedding.weight"])
    model_only = tmp_path / "model_only"  # weights and no checkpoint: a model, never trained over
    model_only.mkdir()
    (model_only / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes())
    with pytest.raises(RecipeError, match="holds a model"):
        train_to(toy_corpus, model_only, 20, resume="auto")


def train_to(corpus: Path, out: Path, steps: int, *extra: str, resume: bool | str = False) -> None:
    settings = [f"data.path={corpus}", f"out_dir={out}", f"train.max_steps={steps}", "train.valid_every=20",
                "train.checkpoint_every=10", "model.dropout=0.1", *extra]
    train(load_recipe(TINY_RECIPE, settings), progress=False, resume=resume)


def last_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(training_checkpoints(out)[-1] / WEIGHTS)


@pytest.mark.slow
def test_a_streamed_corpus_resumes_exactly(tmp_path, toy_corpus):
    """data.streaming: the stream position (pairs read, batches of the pool taken) is part of the checkpoint."""
    train_to(toy_corpus, tmp_path / "straight", 40, "data.streaming=true")
    train_to(toy_corpus, tmp_path / "stopped", 20, "data.streaming=true")
    state = json.loads((training_checkpoints(tmp_path / "stopped")[-1] / "state.json").read_text())
    assert set(state["data_position"]) == {"epoch", "pairs_read", "batch_in_pool"}
    train_to(toy_corpus, tmp_path / "stopped", 40, "data.streaming=true", resume=True)
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(tmp_path / "stopped")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_fp16_with_a_gradient_scaler_trains_and_resumes_with_its_scale(tmp_path, toy_corpus):
    """fp16 is meant for GPUs; CPU autocast runs the same code path (scaler, unscale before clipping), and the
    scaler's state resumes with the run. A forced overflow is in test_train_reliability.py."""
    train_to(toy_corpus, tmp_path / "straight", 40, "train.precision=fp16")
    train_to(toy_corpus, tmp_path / "stopped", 20, "train.precision=fp16")
    state = json.loads((training_checkpoints(tmp_path / "stopped")[-1] / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0
    train_to(toy_corpus, tmp_path / "stopped", 40, "train.precision=fp16", resume=True)
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(tmp_path / "stopped")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    entries = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in entries if "loss" in e]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_a_run_with_subword_sampling_resumed_in_another_process_finishes_its_epoch_exactly(tmp_path, toy_corpus, monkeypatch):
    """The checkpoint keeps the epoch's sampled pieces, which no other process can draw again
    (SentencePiece salts its seeds per process; simulated here by another seed): up to the end of
    that epoch the resumed run is bitwise the uninterrupted one."""
    sampling = "data.subword_sampling=0.1"
    train_to(toy_corpus, tmp_path / "straight", 20, sampling)
    train_to(toy_corpus, tmp_path / "stopped", 10, sampling)
    real_encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, texts, sampling=0.0, seed=0: real_encode(self, texts, sampling, seed + 1))
    train_to(toy_corpus, tmp_path / "stopped", 20, sampling, resume=True)
    state = json.loads((training_checkpoints(tmp_path / "stopped")[-1] / "state.json").read_text())
    assert state["data_position"]["epoch"] == 0  # still the epoch the checkpoint kept
    straight, resumed = last_weights(tmp_path / "straight"), last_weights(tmp_path / "stopped")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
