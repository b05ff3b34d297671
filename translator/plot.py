"""PNG figures: a run's training curves (loss, validation BLEU, learning rate), and a translation's attention maps."""

from __future__ import annotations

import json
from pathlib import Path

from .attention_maps import AttentionMaps
from .checkpoint import CheckpointError, atomic_write
from .config import RecipeError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("translator plot needs matplotlib: pip install 'translator[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the curves of `run_dir/metrics.jsonl` to `output` (default `run_dir/curves.png`)."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    train, valid = _read_metrics(run_dir / "metrics.jsonl")

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
    return _save(plt, figure, output or run_dir / "curves.png")


def plot_attention(maps: AttentionMaps, output: str | Path, head: int | None = None, title: str = "") -> Path:
    """The three attention modes of one translation, a row per layer: encoder self-attention (source x source),
    decoder self-attention (target x target) and cross-attention (target x source). head: 0-based, or None for the mean."""
    plt = _pyplot()
    layers = maps.encoder.size(0)
    panels = [("encoder self-attention", maps.encoder, maps.source, maps.source),
              ("decoder self-attention", maps.decoder, maps.target, maps.target_input),
              ("cross-attention", maps.cross, maps.target, maps.source)]
    inch = 0.22  # per piece
    width = inch * (2 * len(maps.source) + len(maps.target)) + 6
    figure, axes = plt.subplots(layers, 3, figsize=(width, layers * (inch * max(len(maps.source), len(maps.target)) + 2)), squeeze=False)
    for layer in range(layers):
        for ax, (panel, weights, rows, cols) in zip(axes[layer], panels):
            shown = weights[layer].mean(dim=0) if head is None else weights[layer, head]
            ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_title(f"{panel}, layer {layer + 1}", fontsize=10)
    figure.suptitle(f"{title}  ({'mean over heads' if head is None else f'head {head + 1}'})", fontsize=10)
    figure.tight_layout()
    return _save(plt, figure, output)


def _save(plt, figure, output: str | Path) -> Path:
    """The figure at `output` in the format its suffix names (none: .png, added), written whole or not at all
    (a full disk or Ctrl-C leaves the previous figure as it was). Returns the path written."""
    path = Path(output)
    path = path if path.suffix else path.with_name(path.name + ".png")
    kind = path.suffix[1:].lower()
    try:
        if kind not in figure.canvas.get_supported_filetypes():
            raise RecipeError(f"{path}: matplotlib writes no {kind!r} files; name a .png, .pdf or .svg")
        atomic_write(path, lambda tmp: figure.savefig(tmp, format=kind, dpi=100))
    finally:
        plt.close(figure)
    return path


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """The training and the validation entries of a metrics.jsonl; a run with neither is the user's mistake (exit 2)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no metrics to plot (is {path.parent} a training run directory?)")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            entries += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    train = [e for e in entries if isinstance(e, dict) and "loss" in e]
    valid = [e for e in entries if isinstance(e, dict) and "valid_bleu" in e]
    if not train and not valid:
        raise CheckpointError(f"{path}: no training or validation metrics to plot yet (the run logs every train.log_every steps)")
    return train, valid
