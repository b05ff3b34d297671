"""Training curves from a run's metrics.jsonl: loss, validation BLEU and learning rate, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the curves of `run_dir/metrics.jsonl` to `output` (default `run_dir/curves.png`)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("translator plot needs matplotlib: pip install 'translator[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics to plot (is {run_dir} a training run directory?)")
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [e for e in entries if "loss" in e]
    valid = [e for e in entries if "valid_bleu" in e]

    figure, (loss_ax, bleu_ax, lr_ax) = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    loss_ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="training (label-smoothed)")
    loss_ax.plot([e["step"] for e in valid], [e["valid_loss"] for e in valid], "o-", label="validation")
    loss_ax.set_ylabel("loss per target token")
    loss_ax.legend()
    bleu_ax.plot([e["step"] for e in valid], [e["valid_bleu"] for e in valid], "o-", label="BLEU")
    bleu_ax.plot([e["step"] for e in valid], [e["valid_chrf"] for e in valid], "s-", label="chrF")
    bleu_ax.set_ylabel("validation (greedy)")
    bleu_ax.legend()
    lr_ax.plot([e["step"] for e in train], [e["lr"] for e in train])
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    output = Path(output) if output else run_dir / "curves.png"
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
