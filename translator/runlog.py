"""What a training run tells: one voice on stderr (rank 0's), metrics.jsonl, and TensorBoard events.

Every logged step and validation is a JSON line in `out_dir/metrics.jsonl` (read by `translator plot`),
and a scalar in `out_dir/tensorboard` when tensorboard is installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import atomic_write

METRICS = "metrics.jsonl"


class RunLog:
    """Disabled (every rank but 0), it says and writes nothing."""

    def __init__(self, out: Path, enabled: bool = True):
        self.out, self.enabled = out, enabled
        self.metrics = self.board = None

    def open(self, up_to_step: int, start: dict | None = None) -> None:
        """Open metrics.jsonl for appending, dropping what a killed run logged after its last checkpoint (`up_to_step`),
        and log `start` (what this run starts with) as the line {"step": up_to_step, "start": true, ...}. A resume from
        that checkpoint killed before the next one logged its own start there: dropped, so each start is logged once."""
        if self.enabled:
            self.metrics = _reopen(self.out / METRICS, up_to_step)
            self.board = _tensorboard(self.out, up_to_step)
        if start is not None:
            self.record({"step": up_to_step, "start": True, **start})

    def say(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def record(self, entry: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()
        if self.board and "step" in entry:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        for sink in (self.metrics, self.board):
            if sink:
                sink.close()


def _reopen(path: Path, up_to_step: int):
    if up_to_step and path.exists():  # the kept lines replace the file whole: a crash here loses none of them
        kept = "".join(line + "\n" for line in path.read_text(encoding="utf-8").splitlines() if _kept(line, up_to_step))
        atomic_write(path, lambda tmp: Path(tmp).write_text(kept, encoding="utf-8"))
        return path.open("a", encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8")


def _kept(line: str, up_to_step: int) -> bool:
    """Whether a run resumed from step `up_to_step` keeps a line: one of a step up to it, but not a start logged at
    it (a resume from there that died). The end's test scores (logged again by the resumed run) and a line a
    killed write left torn have no step: dropped."""
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    step = entry.get("step", float("inf")) if isinstance(entry, dict) else float("inf")
    return step < up_to_step or (step == up_to_step and not entry.get("start"))


def _tensorboard(out: Path, up_to_step: int):
    """TensorBoard events in out_dir/tensorboard when tensorboard is installed (it is optional). Like metrics.jsonl,
    they end at the checkpoint a run resumes from (TensorBoard hides the later events of the killed run); a run
    started afresh drops the events of the one that died before its first checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    if not up_to_step:
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    return SummaryWriter(str(out / "tensorboard"), purge_step=up_to_step + 1 if up_to_step else None)
