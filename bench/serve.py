"""Load test of `translator serve` on 127.0.0.1: latency and throughput at 1, 8 and 32 clients, with and without batching.

    python bench/serve.py --model runs/multi30k_de_en
    python bench/serve.py --model runs/multi30k_de_en --clients 1 8 32 --requests 320 --time-limit 60
    python bench/serve.py --model runs/multi30k_de_en --precision fp32   # both servers at this precision (default: auto)

Each client sends one sentence per request (Multi30k test sentences, in order) and waits for the
answer before sending the next. Two servers run one after the other on a free local port: the
default one (dynamic batching) and the same server with `decode.max_tokens=1`, where every batch
holds a single request, i.e. requests are served one at a time. Each (server, clients) row stops
after --requests answers or --time-limit seconds, whichever comes first. The bench also checks
that both servers gave every sentence the same translation. The clients run in this process,
on the same machine: their CPU time is the server's loss, which favours neither server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MULTI30K_TEST = ROOT.parent / "shared" / "data" / "multi30k" / "test.jsonl"
HOST = "127.0.0.1"  # never anything else: the bench loads a local server only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: str, *flags: str, stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """`translator serve MODEL FLAGS` on a free local port, and its URL once /health answers (tests/test_serve.py uses it too)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "translator", "serve", model, "--host", HOST, "--port", str(port), *flags]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{' '.join(command)}: exited or gave no answer on /health within 2 minutes")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


async def load(url: str, pair: dict, sentences: list[str], clients: int, requests: int, time_limit: float, fields: dict) -> dict:
    """`clients` closed-loop clients share `requests` requests (one sentence each); latencies in seconds."""
    latencies, answers, next_index = [], {}, iter(range(requests))
    deadline = time.perf_counter() + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            if time.perf_counter() > deadline:
                return
            sentence = sentences[i % len(sentences)]
            start = time.perf_counter()
            response = await http.post(f"{url}/translate", json={"q": sentence, **pair, **fields})
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            answers[sentence] = response.json()["translatedText"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        (await http.post(f"{url}/translate", json={"q": sentences[0], **pair, **fields})).raise_for_status()  # warm-up, untimed
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "seconds": elapsed, "sentences_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (training's out_dir)")
    parser.add_argument("--data", default=str(MULTI30K_TEST), help="a .jsonl file with the model's source language (default: Multi30k test)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=320, help="answers per row at most (default 320)")
    parser.add_argument("--time-limit", type=float, default=60, help="seconds per row at most (default 60)")
    parser.add_argument("--beam-size", type=int, default=None, help="sent with every request (default: the recipe's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"], help="both servers' --precision")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON lines")
    args = parser.parse_args()

    config = json.loads((Path(args.model) / "config.json").read_text())["recipe"]
    pair = {"source": config["data"]["src_lang"], "target": config["data"]["tgt_lang"]}
    with open(args.data, encoding="utf-8") as f:
        sentences = [json.loads(line)[pair["source"]] for line in f if line.strip()]
    fields = {} if args.beam_size is None else {"beam_size": args.beam_size}

    rows = []
    for name, flags in (("batching", ()), ("one at a time", ("--set", "decode.max_tokens=1"))):
        with tempfile.TemporaryFile("w+") as told:
            process, url = start_server(args.model, "--precision", args.precision, *flags, stderr=told)
            told.seek(0)  # the server's own line: "device: cpu; precision: fp32 (auto for small batches: ...)"
            said = next((line.strip() for line in told if line.startswith("device: ")), "(the server said no precision)")
        print(f"{name}: {said}", file=sys.stderr, flush=True)
        try:
            for clients in args.clients:
                row = asyncio.run(load(url, pair, sentences, clients, args.requests, args.time_limit, fields))
                rows.append({"server": name, **row})
                print(f"{name:>14}  {clients:>3} clients  {row['requests']:>4} requests  {row['sentences_per_s']:7.1f} sentences/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms", file=sys.stderr, flush=True)
        finally:
            stop_server(process)

    import torch  # here: tests/test_serve.py imports start_server without it

    from translator.devices import describe

    print(f"\nmachine: {describe(torch.device('cpu'))}")
    print("\n| server | clients | requests | sentences/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['server']} | {row['clients']} | {row['requests']} | {row['sentences_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")
    for clients in args.clients:
        batched, alone = (next(r for r in rows if r["server"] == s and r["clients"] == clients) for s in ("batching", "one at a time"))
        print(f"{clients} clients: batching serves {batched['sentences_per_s'] / alone['sentences_per_s']:.2f}x the sentences/s of one at a time")
    translated = [{s: t for r in rows if r["server"] == name for s, t in r["answers"].items()} for name in ("batching", "one at a time")]
    common = translated[0].keys() & translated[1].keys()
    differ = sum(translated[0][s] != translated[1][s] for s in common)
    print(f"same translation from both servers: {len(common) - differ} of {len(common)} sentences")
    if args.json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "answers"}))


if __name__ == "__main__":
    main()
