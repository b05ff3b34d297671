"""Training throughput on real Multi30k batches (the Multi30k recipe's batch settings), printed as a table.

    python bench/train.py                         # the recipe's model, each precision, on this machine
    python bench/train.py --reference             # and PyTorch's nn.Transformer of the same size, in this run
    python bench/train.py --size base --device cuda --reference   # Transformer-base (d512, 6+6, ff2048) on a GPU
    python bench/train.py --peer                  # also Joey NMT's train.sh now (about 12 minutes)
    python bench/train.py --set train.rdrop_alpha=2.5 --set train.max_tokens=1024   # recipe overrides: R-Drop at half the batch
    python bench/train.py --profile               # CPU: where the auto precision's step goes, by kind of op
    python bench/train.py --reference --precision fp32   # only the fp32 rows (bf16 emulated on an AVX2-only CPU is very slow)

It prints where it ran (CPU model and flags, or the GPU) and the precision `auto` picks there;
the table has one row per precision, the `auto` one marked. Per precision: target and
source+target tokens/s (real tokens, padding excluded), achieved GFLOP/s and its share of the
matmul peak measured here for that precision (the higher of a measurement before and one after
the timed steps), counting only useful FLOPs (each sentence's own length, no padding; forward +
backward = 3x forward; R-Drop's two passes count twice), padding fraction, peak RSS; tokens/s
count each batch once, so R-Drop's price shows there. --reference runs
`../shared/bench-peers/torch_reference.py` (unpadded batches of 16-token sentences, as many as
the recipe's train.max_tokens holds) with the same size, device and threads, and prints our
tokens/s over its own at the same precision and at its fastest.

--profile (CPU) runs 8 of the auto precision's steps again under torch.profiler and adds, for
that row, each kind of op's share of the step's CPU time (matmuls, random draws, copies: dtype
casts and making tensors contiguous, the rest) and "matmuls alone": the share of the peak the
step would reach if every other op took no time, i.e. the ceiling of kernel work outside the
matmuls. The profiler's own overhead falls on the many small ops, so the matmul share reads low
and that ceiling high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchtable import print_table  # bench/, on the path as the script's folder
from translator.config import ModelConfig, TrainConfig, load_recipe
from translator.data import load_split
from translator.trainset import TrainBatches, filter_pairs, tokenize
from translator.devices import describe, keep_compiled_kernels, keep_freed_memory, kept_kernels, pick_device, resolve_precision, synchronize
from translator.model import Transformer
from translator.tokenizer import Tokenizer, interleave
from translator.train import optimizer_and_schedule, train_step

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "bench-peers"
SIZES = {"recipe": {}, "base": {"d_model": 512, "n_heads": 8, "d_ff": 2048, "encoder_layers": 6, "decoder_layers": 6}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}  # timed by default, by device


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_macs(cfg: ModelConfig, vocab: int, S: int, T: int) -> int:
    """Multiply-accumulates of one forward pass of a sentence pair of S source and T target positions."""
    D, F = cfg.d_model, cfg.d_ff
    encoder = cfg.encoder_layers * S * (4 * D * D + 2 * D * F + 2 * S * D)
    decoder = cfg.decoder_layers * (T * (4 * D * D + 2 * D * D + 2 * D * F + 2 * T * D + 2 * S * D) + S * 2 * D * D)
    return encoder + decoder + T * D * vocab


def useful_macs(cfg: ModelConfig, vocab: int, batch) -> int:
    """Forward MACs of each sentence at its own length (+ eos / bos): what padding-free training would compute."""
    src_lens, tgt_lens = (batch.src != 0).sum(1).tolist(), (batch.tgt_out != 0).sum(1).tolist()
    return sum(forward_macs(cfg, vocab, s, t) for s, t in zip(src_lens, tgt_lens))


OP_KINDS = {"matmul": {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"},
            "random": {"aten::random_", "aten::bernoulli_", "aten::uniform_"},
            "copy": {"aten::copy_"}}  # dtype casts, and the copies that make tensors contiguous
PROFILED_STEPS = 8


def op_shares(model: Transformer, model_cfg: ModelConfig, batches: TrainBatches, precision: str, steps: int,
              cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Each kind of op's share of the CPU time of `steps` training steps, from torch.profiler's self times
    (AdamW's state is allocated in the first: 6.8M parameters, about 1% of one step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        measure(model, model_cfg, batches, precision, steps, 0, cfg, device)
    self_us = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    total = sum(self_us.values())
    shares = {f"{kind} share": sum(self_us.get(name, 0) for name in names) / total for kind, names in OP_KINDS.items()}
    return {**shares, "other share": 1 - sum(shares.values())}


def run_peer(peers: Path) -> float:
    env = dict(os.environ, WORK=os.environ.get("WORK", str(Path.home() / "peers")))
    out = subprocess.run(["bash", str(peers / "train.sh"), "joey_train_bench"], check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out)["trg_tok_s"]


REFERENCE_LENGTH = 16  # the reference's source and target length: its batches are unpadded, every sentence this long


def run_reference(cfg: ModelConfig, max_tokens: int, device: torch.device, threads: int, precisions: list[str], peers: Path) -> dict[str, float]:
    """Target tokens/s of PyTorch's nn.Transformer of the same size and token budget, by precision (it knows fp32 and bf16)."""
    length = str(REFERENCE_LENGTH)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.json"
        modes = [p for p in precisions if p in ("fp32", "bf16")]
        subprocess.run([sys.executable, str(peers / "torch_reference.py"), "--device", device.type, "--threads", str(threads),
                        "--d-model", str(cfg.d_model), "--heads", str(cfg.n_heads), "--layers", str(cfg.encoder_layers),
                        "--ff", str(cfg.d_ff), "--bsz", str(max(1, max_tokens // REFERENCE_LENGTH)), "--src-len", length, "--tgt-len", length, "--modes", *modes, "--out", str(out)], check=True, capture_output=True)
        return {mode: r["tgt_tok_s_median"] for mode, r in json.loads(out.read_text())["modes"].items()}


def measure(model: Transformer, model_cfg: ModelConfig, batches: TrainBatches, precision: str, steps: int, warmup: int,
            cfg: TrainConfig, device: torch.device) -> dict:
    optimizer, scheduler = optimizer_and_schedule(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    stream = batches.from_position({})
    amp = (lambda: torch.autocast(device.type, dtype=DTYPES[precision])) if precision != "fp32" else nullcontext
    tgt_tokens = src_tokens = padded = real = macs = 0
    seconds = 0.0
    for step in range(warmup + steps):
        _, batch = next(stream)
        batch = batch.to(device)
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, [batch], amp, cfg, scaler=scaler)  # the training loop's own update
        synchronize(device)
        elapsed = time.perf_counter() - start
        if step < warmup:
            continue
        seconds += elapsed
        n_src, n_tgt = int((batch.src != 0).sum()), batch.n_tgt_tokens
        tgt_tokens, src_tokens = tgt_tokens + n_tgt, src_tokens + n_src
        real, padded = real + n_src + n_tgt, padded + batch.src.numel() + batch.tgt_out.numel()
        macs += useful_macs(model_cfg, model.embedding.num_embeddings, batch) * (2 if cfg.rdrop_alpha else 1)
    return {"tgt tok/s": tgt_tokens / seconds, "src+tgt tok/s": (src_tokens + tgt_tokens) / seconds,
            "useful GFLOP/s": 3 * 2 * macs / seconds / 1e9, "padding": 1 - real / padded, "s/step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "multi30k"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--size", default="recipe", choices=list(SIZES), help="recipe: the Multi30k recipe's model; base: Transformer-base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="run PyTorch's nn.Transformer of the same size in this run")
    parser.add_argument("--peer", action="store_true", help="run Joey NMT's train.sh in this run and print the ratio")
    parser.add_argument("--profile", action="store_true", help="CPU: each kind of op's share of the auto precision's step")
    parser.add_argument("--precision", action="append", choices=list(DTYPES), help="time only this precision (repeatable; default: each of PRECISIONS for the device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the Multi30k recipe")
    parser.add_argument("--peers", type=Path, default=PEERS, help="the folder of torch_reference.py and Joey NMT's train.sh")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as `translator train` does
    keep_compiled_kernels()
    device = pick_device(args.device, key="--device")
    auto = resolve_precision("auto", device)
    if args.profile and device.type != "cpu":
        parser.error("--profile reads the CPU's op times; on a GPU use torch.profiler with CUDA activities")
    if set(args.precision or ()) - set(PRECISIONS[device.type]):
        parser.error(f"--precision: on {device.type} one of {', '.join(PRECISIONS[device.type])}")
    precisions = args.precision or PRECISIONS[device.type]

    joey = run_peer(args.peers) if args.peer else None
    recipe = load_recipe(ROOT / "recipes" / "multi30k_de_en.yaml", [f"data.path={args.data}", *args.set])
    cfg, data = recipe.train, recipe.data
    model_cfg = ModelConfig(**{**recipe.model.__dict__, **SIZES[args.size]})
    reference = run_reference(model_cfg, cfg.max_tokens, device, args.threads, precisions, args.peers) if args.reference else {}
    pairs = load_split(data, "train")
    tokenizer = Tokenizer.train(interleave(pairs["src"], pairs["tgt"]), recipe.tokenizer.vocab_size, seed=recipe.seed)
    tokens, _ = filter_pairs(tokenize(pairs, tokenizer), data.max_len, data.max_ratio)
    batches = TrainBatches(tokens, cfg.max_tokens, recipe.seed)

    rows = []
    for precision in precisions:
        torch.manual_seed(0)
        model = Transformer(model_cfg, tokenizer.vocab_size).to(device)
        peak_before = matmul_peak(DTYPES[precision], device)
        row = {"precision": precision + (" (auto)" if precision == auto.name else ""),
               **measure(model, model_cfg, batches, precision, args.steps, args.warmup, cfg, device)}
        # The higher of a measurement before and after the steps: on a VM whose speed drifts, one short
        # measurement (about a second) read anywhere from 107 to 181 GFLOP/s for the same CPU (docs/speed.md).
        peak = max(peak_before, matmul_peak(DTYPES[precision], device))
        row["peak GFLOP/s"], row["of peak"] = peak, row["useful GFLOP/s"] / peak
        if args.profile and precision == auto.name:
            row.update(op_shares(model, model_cfg, batches, precision, PROFILED_STEPS, cfg, device))
            row["matmuls alone, of peak"] = row["of peak"] / row["matmul share"]
        if precision in reference:
            row["reference tgt tok/s"] = reference[precision]
            row["x reference"] = row["tgt tok/s"] / reference[precision]
        if reference:
            row["x reference's fastest"] = row["tgt tok/s"] / max(reference.values())
        if joey:
            row["Joey tgt tok/s"], row["x Joey"] = joey, row["tgt tok/s"] / joey
        rows.append(row)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"# translator training benchmark on {describe(device)}; auto picks {auto}")
    print(f"# Multi30k de-en batches, d_model {model_cfg.d_model}, {model_cfg.encoder_layers}+{model_cfg.decoder_layers} layers, "
          f"{model_cfg.n_heads} heads, ff {model_cfg.d_ff}, {cfg.max_tokens}-token batches, R-Drop alpha {cfg.rdrop_alpha}, {args.steps} timed steps, "
          f"torch {torch.__version__}, peak RSS {rss:.0f} MiB, malloc keeps freed memory: {'yes' if kept else 'no'}, "
          f"oneDNN kernels kept: {kept_kernels()}")
    print_table(rows, list(dict.fromkeys(c for r in rows for c in r)))


if __name__ == "__main__":
    sys.exit(main())
