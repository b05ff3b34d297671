"""Watching training: PNG curves (translator plot) and TensorBoard events."""

import subprocess
import sys

import pytest

from translator.checkpoint import CheckpointError
from translator.plot import plot_run

pytest.importorskip("matplotlib")


def test_plot_writes_a_png_of_a_run(tiny_model_dir, tmp_path):
    out = plot_run(tiny_model_dir, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # three panels with curves, not an empty canvas


def test_plot_cli_and_a_directory_without_metrics(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "translator", "plot", str(tiny_model_dir), "-o", str(tmp_path / "c.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "c.png")
    with pytest.raises(CheckpointError, match="metrics.jsonl: no metrics to plot"):  # the user's input: exit 2
        plot_run(tmp_path)


def test_plot_without_a_suffix_writes_and_names_a_png_and_refuses_a_folder(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "translator", "plot", str(tiny_model_dir), "-o", str(tmp_path / "c")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "c").exists()
    folder = subprocess.run([sys.executable, "-m", "translator", "plot", str(tiny_model_dir), "-o", str(tmp_path)],
                            capture_output=True, text=True)
    assert folder.returncode == 2 and "is a folder" in folder.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]


def test_a_plot_that_fails_while_writing_leaves_the_previous_figure(tiny_model_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    out = plot_run(tiny_model_dir, tmp_path / "curves.png")
    before = out.read_bytes()

    def full_disk(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG")  # a few bytes, then the disk is full
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        plot_run(tiny_model_dir, out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_tensorboard_events_are_written_when_tensorboard_is_installed(tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_model_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "lr", "valid_bleu"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss")] == sorted(e.step for e in events.Scalars("loss"))


def test_a_resumed_run_keeps_the_lines_up_to_its_checkpoint_and_drops_the_rest(tmp_path):
    from translator.runlog import METRICS, RunLog

    lines = ['{"step": 0, "start": true, "device": "cpu"}', '{"step": 10, "loss": 3.0}', '{"step": 20, "loss": 2.0}',
             '{"step": 20, "start": true, "device": "cpu"}',  # a resume from step 20 that died before its next checkpoint
             '{"step": 30, "loss": 1.0}',
             '{"test": {"greedy": {"bleu": 1.0}}}',  # the end of a finished run, resumed to more steps: scored again
             '{"step": 40, "lo']  # torn by a killed write
    (tmp_path / METRICS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = RunLog(tmp_path)
    log.open(up_to_step=20, start={"device": "cuda:0"})
    log.record({"step": 21, "loss": 1.9})
    log.close()
    assert (tmp_path / METRICS).read_text(encoding="utf-8").splitlines() == [
        *lines[:3], '{"step": 20, "start": true, "device": "cuda:0"}', '{"step": 21, "loss": 1.9}']


def test_tensorboard_of_a_resumed_run_ends_at_its_checkpoint_like_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from translator.runlog import RunLog

    def run(up_to_step: int, steps: range) -> None:
        log = RunLog(tmp_path)
        log.open(up_to_step)
        for step in steps:
            log.record({"step": step, "loss": float(step)})
        log.close()

    def logged() -> list[int]:
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [e.step for e in events.Scalars("loss")]

    run(0, range(1, 5))  # a run that dies at step 4, before its first checkpoint: started afresh
    run(0, range(1, 17))  # killed at step 16, its last checkpoint at step 10
    assert logged() == list(range(1, 17))
    run(10, range(11, 21))  # resumed
    assert logged() == list(range(1, 21))  # each step once, the resumed run's from 11 on


def test_a_resume_that_fails_while_rewriting_the_metrics_loses_none_of_them(tmp_path, monkeypatch):
    import translator.checkpoint as checkpoint
    from translator.runlog import METRICS, RunLog

    text = '{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.0}\n'
    (tmp_path / METRICS).write_text(text, encoding="utf-8")

    def full_disk(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", full_disk)  # the rename that would put the rewritten file in place
    with pytest.raises(OSError, match="disk full"):
        RunLog(tmp_path).open(up_to_step=10)
    assert (tmp_path / METRICS).read_text(encoding="utf-8") == text
