"""Training throughput of the Multi30k recipe (its model and batch settings) on real Multi30k batches, printed as a table.

    python bench/train.py                    # the Multi30k recipe's model, fp32 and bf16
    python bench/train.py --peer             # also run Joey NMT's train.sh now (about 12 minutes)

Per precision: target and source+target tokens/s (real tokens, padding excluded), achieved
GFLOP/s (matmul FLOPs of the padded batches, forward + backward = 3x forward) and its fraction
of the matmul peak measured here, padding fraction, peak RSS. With --peer,
`../shared/bench-peers/train.sh` runs first (install.sh and prepare.sh must have run) and the
ratio to Joey NMT's target tokens/s is printed from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from translator.config import ModelConfig, TrainConfig, load_recipe
from translator.data import TrainBatches, filter_pairs, load_split, tokenize
from translator.model import Transformer
from translator.tokenizer import Tokenizer, interleave
from translator.train import optimizer_and_schedule, train_step

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "bench-peers"


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_macs(cfg: ModelConfig, vocab: int, B: int, S: int, T: int) -> int:
    """Multiply-accumulates of one forward pass over a padded (B, S) -> (B, T) batch."""
    D, F = cfg.d_model, cfg.d_ff
    encoder = cfg.encoder_layers * B * S * (4 * D * D + 2 * D * F + 2 * S * D)
    decoder = cfg.decoder_layers * B * (T * (4 * D * D + 2 * D * D + 2 * D * F + 2 * T * D + 2 * S * D) + S * 2 * D * D)
    return encoder + decoder + B * T * D * vocab


def run_peer() -> float:
    env = dict(os.environ, WORK=os.environ.get("WORK", str(Path.home() / "peers")))
    out = subprocess.run(["bash", str(PEERS / "train.sh"), "joey_train_bench"], check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out)["trg_tok_s"]


def measure(model: Transformer, model_cfg: ModelConfig, batches: TrainBatches, precision: str, steps: int, warmup: int, cfg: TrainConfig) -> dict:
    optimizer, scheduler = optimizer_and_schedule(model, cfg)
    stream = batches.from_position({})
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    tgt_tokens = src_tokens = padded = real = macs = 0
    seconds = 0.0
    for step in range(warmup + steps):
        _, batch = next(stream)
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, [batch], amp, cfg)  # the training loop's own update
        elapsed = time.perf_counter() - start
        if step < warmup:
            continue
        seconds += elapsed
        n_src, n_tgt = int((batch.src != 0).sum()), batch.n_tgt_tokens
        tgt_tokens, src_tokens = tgt_tokens + n_tgt, src_tokens + n_src
        real, padded = real + n_src + n_tgt, padded + batch.src.numel() + batch.tgt_out.numel()
        macs += forward_macs(model_cfg, model.embedding.num_embeddings, *batch.src.shape, batch.tgt_in.size(1))
    return {"tgt tok/s": tgt_tokens / seconds, "src+tgt tok/s": (src_tokens + tgt_tokens) / seconds,
            "GFLOP/s": 3 * 2 * macs / seconds / 1e9, "padding": 1 - real / padded, "s/step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "multi30k"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peer", action="store_true", help="run Joey NMT's train.sh in this run and print the ratio")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    joey = run_peer() if args.peer else None
    recipe = load_recipe(ROOT / "recipes" / "multi30k_de_en.yaml", [f"data.path={args.data}"])
    cfg, model_cfg, data = recipe.train, recipe.model, recipe.data
    pairs = load_split(data, "train")
    tokenizer = Tokenizer.train(interleave(pairs["src"], pairs["tgt"]), recipe.tokenizer.vocab_size, seed=recipe.seed)
    tokens, _ = filter_pairs(tokenize(pairs, tokenizer), data.max_len, data.max_ratio)
    batches = TrainBatches(tokens, cfg.max_tokens, recipe.seed)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}

    rows = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Transformer(model_cfg, tokenizer.vocab_size)
        row = {"precision": precision, **measure(model, model_cfg, batches, precision, args.steps, args.warmup, cfg)}
        row["peak GFLOP/s"] = peaks[precision]
        row["of peak"] = row["GFLOP/s"] / peaks[precision]
        if joey:
            row["Joey tgt tok/s"] = joey
            row["x Joey"] = row["tgt tok/s"] / joey
        rows.append(row)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"# translator training benchmark: Multi30k de-en, d_model 256, 3+3 layers, 4 heads, ff 1024, "
          f"{cfg.max_tokens}-token batches, {args.threads} threads, {args.steps} timed steps, torch {torch.__version__}, "
          f"peak RSS {rss:.0f} MiB")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")


if __name__ == "__main__":
    sys.exit(main())
