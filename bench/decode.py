"""Decoding speed on the Multi30k test set, side by side with Joey NMT, printed as a table.

    python bench/decode.py --model runs/multi30k_de_en              # a trained model
    python bench/decode.py                                          # random weights, output length forced to the source's
    python bench/decode.py --model runs/multi30k_de_en --peer       # also run Joey NMT's decode.sh now, same machine
    python bench/decode.py --model runs/multi30k_de_en --ctranslate2   # also CTranslate2 fp32 and int8, exported now
    python bench/decode.py --model runs/multi30k_de_en --device cuda    # on a GPU: fp32, bf16 and fp16, one process
    python bench/decode.py --model runs/multi30k_de_en --precision fp32 --precision int8   # only these of ours (bf16 emulated is slow)

Rows: greedy and beam 5 over the 1,000 test sentences (sentences/s, target tokens/s, counted
as subword pieces + 1 eos per sentence, as the peer script counts them), beam 5 under both of
decode.beam_stop's rules: "exact" (the default) and "first_k" (CTranslate2's own rule); incremental
(K/V cache) against recomputing the whole prefix every step; per-token step time at output
lengths 16, 64 and 256. With --peer, `../shared/bench-peers/decode.sh` runs first (it needs
install.sh, prepare.sh and train.sh to have run, see its README), and the ratios to Joey NMT
are measured in the same run. With --ctranslate2 the model is exported (`translator export`) to
CTranslate2 in float32 and int8 and timed on the same sentences and threads: 8,192-token batches,
2 threads in one worker, and 2 workers of 1 thread. Ours runs both ways too (`workers=2`: forked
processes; on the CPU only). The rows "one sentence a call" translate the first 100 test sentences
each in a call of its own (greedy, and beam 5 `first_k`), in one process of one thread: the latency
a service answering one request at a time sees ("ms a sentence"; CTranslate2 took 14x as long a
sentence on 2 threads as on one). With a trained model, every row has its BLEU (the one-sentence
rows' over their 100 sentences).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch

from benchtable import print_table  # bench/, on the path as the script's folder
from translator import Translator
from translator.batching import source_tensor
from translator.config import DataConfig, DecodeConfig, load_recipe
from translator.data import load_split
from translator.devices import describe, keep_freed_memory, kept_kernels, pick_device, synchronize
from translator.evaluate import score
from translator.export import export_ctranslate2
from translator.model import Transformer
from translator.search import argmax_rows
from translator.tokenizer import BOS_ID, EOS_ID, Tokenizer, interleave

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "bench-peers"
PRECISIONS = {"cpu": ("fp32", "bf16", "int8"), "cuda": ("fp32", "bf16", "fp16")}  # ours, by device: int8 runs on the CPU only


def random_translator(data: DataConfig, device: torch.device) -> Translator:
    """The Multi30k recipe's model with random weights; eos can never win, so outputs run to the length limit."""
    recipe = replace(load_recipe(ROOT / "recipes" / "multi30k_de_en.yaml"), data=data)
    train = load_split(data, "train")
    tokenizer = Tokenizer.train(interleave(train["src"], train["tgt"]), recipe.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(recipe.model, tokenizer.vocab_size).to(device).eval()
    with torch.no_grad():
        model.embedding.weight[EOS_ID].zero_()  # eos's logit is then 0, which never beats the best of 5k random ones
        # and so is bos's: through the tied embedding a random model echoes its input, and an echoed bos
        # would detokenize to "", leaving the tok/s column nothing to count
        model.embedding.weight[BOS_ID].zero_()
    decode = DecodeConfig(beam_size=5, alpha=0.6, max_len_a=1.0, max_len_b=1)  # output length = source length
    return Translator(model, tokenizer, replace(recipe, decode=decode))


def count_tokens(tokenizer: Tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer.encode(texts)) + len(texts)


def best_of(repeat: int, runs: dict, threads: int) -> dict:
    """Each of `runs` (key -> run() -> outputs) `repeat` times -> key -> (its best seconds, its outputs).

    In rounds, every run once a round: this machine's speed drifts by 10-20% from minute to minute, and
    rounds spread the drift over every row alike, where back-to-back repeats left it between rows."""
    best = {key: (float("inf"), None) for key in runs}
    for _ in range(repeat):
        for key, run in runs.items():
            torch.set_num_threads(threads)  # creating a CTranslate2 translator sets OpenMP's thread count for this thread too
            start = time.perf_counter()
            out = run()
            best[key] = min(best[key][0], time.perf_counter() - start), out
    return best


ALONE = " one sentence a call, 1 thread"  # the label of the rows that translate ALONE_SENTENCES, each in its own call
ALONE_SENTENCES = 100


def one_at_a_time(translator: Translator, sentences: list[str], **options) -> list[str]:
    """Each sentence in a call of its own, on one thread (best_of sets the threads again before the next run)."""
    torch.set_num_threads(1)
    return [translator.translate(sentence, **options) for sentence in sentences]


def ctranslate2_runs(model_dir: str, translator: Translator, sentences: list[str], threads: int, folder: Path) -> dict:
    """(name, beam, label) -> run() for CTranslate2 exports of the model, decoding as ours does where it can:
    </s> may win at the first step; the same length penalty exponent (its formula differs, see docs/deployment.md)."""
    import ctranslate2

    decode = translator.recipe.decode

    def translate(ct2, pieces: list[list[str]], beam: int) -> list[str]:
        longest = max(len(p) for p in pieces) + 1  # with </s>, as ours counts; one limit for the batch, ours is per sentence
        results = ct2.translate_batch(pieces, max_batch_size=decode.max_tokens, batch_type="tokens", beam_size=beam,
                                      length_penalty=decode.alpha, min_decoding_length=0,  # our limit counts </s>:
                                      max_decoding_length=int(decode.max_len_a * longest + decode.max_len_b) - 1)  # tests/test_export.py
        return [translator.tokenizer.sp.decode_pieces(r.hypotheses[0]) for r in results]

    pieces = [translator.tokenizer.pieces(s) for s in sentences]
    runs = {}
    for quantization in ("float32", "int8"):
        out = export_ctranslate2(model_dir, folder / quantization, quantization)
        for workers in (1, threads):
            ct2 = ctranslate2.Translator(str(out), device="cpu", inter_threads=workers, intra_threads=threads // workers)
            label = f"CTranslate2 {quantization}" + (f", {workers} workers x {threads // workers} thread" if workers > 1 else "")
            for name, beam in (("greedy", 1), ("beam 5, first_k", 5)):  # its beam search stops at the first K finished
                runs[(name, beam, label)] = lambda ct2=ct2, beam=beam: translate(ct2, pieces, beam)
        # One sentence a call on one thread, as ours: on 2, CTranslate2 int8 took 49.7 ms a greedy sentence, on one 3.6 (docs/deployment.md, session 40).
        ct2 = ctranslate2.Translator(str(out), device="cpu", inter_threads=1, intra_threads=1)
        for name, beam in (("greedy", 1), ("beam 5, first_k", 5)):
            runs[(name, beam, f"CTranslate2 {quantization},{ALONE}")] = lambda ct2=ct2, beam=beam: [
                translate(ct2, [p], beam)[0] for p in pieces[:ALONE_SENTENCES]]
    return runs


@torch.inference_mode()
def greedy_without_cache(model: Transformer, src: torch.Tensor, steps: int) -> None:
    """The slow way (Joey NMT's): re-feed the whole prefix through the decoder at every step."""
    memory, src_mask = model.encode(src)
    prefix = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)
    for _ in range(steps):
        outputs, _ = model.decode(prefix, model.start(memory, src_mask))
        prefix = torch.cat([prefix, model.logits(outputs[:, -1]).argmax(-1, keepdim=True)], dim=1)


@torch.inference_mode()
def greedy_with_cache(model: Transformer, src: torch.Tensor, steps: int, step_times: list[float] | None = None) -> None:
    memory, src_mask = model.encode(src)
    state = model.start(memory, src_mask)
    last = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)
    for _ in range(steps):
        start = time.perf_counter()
        outputs, state = model.decode(last, state)
        last = argmax_rows(model.logits(outputs[:, -1]).float())[:, None]  # as greedy search picks its token
        if step_times is not None:
            synchronize(src.device)
            step_times.append(time.perf_counter() - start)


def per_token_ms(model: Transformer, src: torch.Tensor, length: int, repeat: int) -> float:
    """Mean time of the decoding steps that produce tokens length-7 .. length (forced, eos ignored), best of `repeat`."""
    best = float("inf")
    for _ in range(repeat):
        times: list[float] = []
        greedy_with_cache(model, src, length, times)
        best = min(best, 1000 * sum(times[-8:]) / 8)
    return best


def step_rows(model: Transformer, tokenizer: Tokenizer, sentences: list[str], cache_sentences: int, repeat: int) -> list[dict]:
    """Incremental decoding against recomputing the prefix, and the per-token step time by output length."""
    rows = []
    device = next(model.parameters()).device
    src = source_tensor(tokenizer.encode(sentences[:cache_sentences])).to(device)
    steps = 32
    start = time.perf_counter()
    greedy_with_cache(model, src, steps)
    synchronize(device)
    cached = time.perf_counter() - start
    start = time.perf_counter()
    greedy_without_cache(model, src, steps)
    synchronize(device)
    uncached = time.perf_counter() - start
    rows.append({"what": f"{steps} greedy steps x {len(src)} sentences: cache", "seconds": cached})
    rows.append({"what": f"{steps} greedy steps x {len(src)} sentences: no cache", "seconds": uncached, "x cache": uncached / cached})

    batch = source_tensor(tokenizer.encode(sentences[:32])).to(device)
    per_token = {n: per_token_ms(model, batch, n, repeat) for n in (16, 64, 256)}
    for n, ms in per_token.items():
        rows.append({"what": f"per-token step, 32 sentences, output length {n}", "ms": ms, "x length 16": ms / per_token[16]})
    return rows


def run_peer() -> dict[int, dict]:
    env = dict(os.environ, WORK=os.environ.get("WORK", str(Path.home() / "peers")))
    subprocess.run(["bash", str(PEERS / "decode.sh")], check=True, env=env, stdout=sys.stderr)
    lines = (Path(env["WORK"]) / "results" / "joey_decode.jsonl").read_text().splitlines()
    results = {}
    for line in lines[-2:]:  # the two runs decode.sh just appended: beam 5 and greedy
        entry = json.loads(line)
        results[entry["beam"]] = entry
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained model directory (default: random weights, forced output length)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "multi30k"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="cuda: fp32, bf16 and fp16 in one process (no workers, no int8)")
    parser.add_argument("--peer", action="store_true", help="run Joey NMT's decode.sh in this run and print ratios")
    parser.add_argument("--ctranslate2", action="store_true", help="also export the model to CTranslate2 (float32, int8) and time it (needs --model)")
    parser.add_argument("--repeat", type=int, default=3, help="time each test-set row this many times (in rounds: every row once a round) and keep the best")
    parser.add_argument("--cache-sentences", type=int, default=200, help="sentences for the cache vs no-cache row")
    parser.add_argument("--precision", action="append", choices=sorted({p for ps in PRECISIONS.values() for p in ps}),
                        help="time only this precision of ours (repeatable; default: each of PRECISIONS for the device)")
    parser.add_argument("--test-set-only", action="store_true", help="only the test-set rows (no cache and per-token rows)")
    args = parser.parse_args()
    if args.ctranslate2 and not args.model:
        parser.error("--ctranslate2 exports a trained model: give --model")
    args.device = pick_device(args.device, key="--device")
    if (args.ctranslate2 or args.peer) and args.device.type != "cpu":
        parser.error("--ctranslate2 and --peer time CPU decoders: use --device cpu")
    if set(args.precision or ()) - set(PRECISIONS[args.device.type]):
        parser.error(f"--precision: on {args.device.type} one of {', '.join(PRECISIONS[args.device.type])}")
    return args


def main() -> None:
    args = parse_args()
    device = args.device
    torch.set_num_threads(args.threads)

    peer = run_peer() if args.peer else {}
    if args.model:  # the model's own pair (an en->de model decodes the English side), read from --data
        translator = Translator.from_pretrained(args.model, device=device)
        data = replace(translator.recipe.data, path=args.data, name=None)
    else:
        data = DataConfig(path=args.data, src_lang="de", tgt_lang="en")
        translator = random_translator(data, device)
    test = load_split(data, "test")
    sentences, references = list(test["src"]), list(test["tgt"])
    model, tokenizer = translator.model, translator.tokenizer
    ways = [("", translator)]
    if device.type == "cpu":  # CTranslate2's "2 workers x 1 thread", ours: the same model in `threads` forked processes of one thread each
        ways.append((f", {args.threads} workers x 1 thread", Translator(model, tokenizer, translator.recipe, workers=args.threads)))
    precisions = args.precision or PRECISIONS[device.type]
    for (_, ours), precision in itertools.product(ways, precisions):  # warm up (and build the int8 copy, fork the workers)
        ours.translate(sentences[:64], beam_size=1, precision=precision)

    runs = {}
    searches = (("greedy", 1, "exact"), ("beam 5, exact", 5, "exact"), ("beam 5, first_k", 5, "first_k"))  # decode.beam_stop
    for (name, beam, stop), precision in itertools.product(searches, precisions):
        for label, ours in ((f"ours {precision}{way}", ours) for way, ours in ways):
            runs[(name, beam, label)] = lambda ours=ours, beam=beam, stop=stop, precision=precision: ours.translate(
                sentences, beam_size=beam, beam_stop=stop, precision=precision)
        if stop == "first_k" or beam == 1:  # latency: a sentence a call, as a service at one client decodes
            runs[(name, beam, f"ours {precision},{ALONE}")] = lambda beam=beam, stop=stop, precision=precision: one_at_a_time(
                translator, sentences[:ALONE_SENTENCES], beam_size=beam, beam_stop=stop, precision=precision)
    machine = (f"{describe(translator.device)}; decode.precision auto picks {translator.precision('auto')}; "  # before CTranslate2 sets OpenMP's threads
               f"malloc keeps freed memory: {'yes' if keep_freed_memory() else 'no'} (set GLIBC_TUNABLES= to leave it to glibc); "
               f"oneDNN kernels kept: {kept_kernels()}")
    if args.ctranslate2:  # on AMD CPUs it multiplies int8 through oneDNN unless CT2_USE_MKL=1 (docs/deployment.md)
        machine += f"; CTranslate2 {version('ctranslate2')}, CT2_USE_MKL={os.environ.get('CT2_USE_MKL', 'unset')}"
        runs |= ctranslate2_runs(args.model, translator, sentences, args.threads, Path(tempfile.mkdtemp(prefix="bench_ct2_")))
    rows = []
    timed = best_of(args.repeat, runs, args.threads)
    for (name, beam, label), (seconds, out) in sorted(timed.items(), key=lambda item: (item[0][2].endswith(ALONE), item[0][1], item[0][0])):
        tokens = count_tokens(tokenizer, out)
        row = {"what": f"{name}, {label}, {len(out)} test sentences", "seconds": seconds,
               "sent/s": len(out) / seconds, "tok/s": tokens / seconds}
        if label.endswith(ALONE):
            row["ms a sentence"] = 1000 * seconds / len(out)
        if args.model:
            row["BLEU"] = score(out, references[:len(out)], data.tgt_lang).bleu
        if beam in peer:
            joey_s = peer[beam]["generation_s"]
            row["Joey NMT s"] = joey_s
            row["x Joey"] = joey_s / seconds
        rows.append(row)

    torch.set_num_threads(args.threads)
    if not args.test_set_only:
        rows += step_rows(model, tokenizer, sentences, args.cache_sentences, args.repeat)

    print(f"# translator decode benchmark: {'trained ' + args.model if args.model else 'random weights'}, "
          f"{args.threads} threads, torch {torch.__version__}, {model.num_parameters() / 1e6:.2f} M parameters")
    print(f"# {machine}")
    columns = ["what", "seconds", "sent/s", "tok/s", "ms a sentence", "BLEU", "Joey NMT s", "x Joey", "x cache", "ms", "x length 16"]
    print_table(rows, [c for c in columns if any(c in r for r in rows)])


if __name__ == "__main__":
    main()
