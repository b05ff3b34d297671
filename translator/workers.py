"""Decoding in several processes at once, each with its share of the sentences and of the threads
(CTranslate2's `inter_threads`).

The matmuls of one decoding step are small, and a step waits on Python between them, so two
threads in one process leave each other idle; two processes of one thread each do not
(bench/decode.py measures both on the same model). Each call forks its workers from the process
that holds the `Translator`: they start at once with its model (and its current weights) in
memory, only the translations travel back, and nothing outlives the call. Forking is Linux's (and
macOS's) start method, and CPU-only: CUDA does not survive a fork.
"""

from __future__ import annotations

import multiprocessing
import signal

import torch


def _translate_share(translator, sentences: list[str], options: dict, threads: int, send) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the CLI's handler turns SIGTERM into KeyboardInterrupt: a worker just ends
    torch.set_num_threads(threads)
    try:
        send.send((True, translator._translate(sentences, **options)))
    except Exception as e:  # the caller raises it, as one process would have
        send.send((False, e))


class DecodingWorkers:
    """`workers` processes forked from `translator` for each call, splitting the available threads."""

    def __init__(self, translator, workers: int):
        if translator.device.type != "cpu":
            raise ValueError(f"workers={workers}: several decoding processes run on the CPU only (CUDA does not survive a fork); use workers=1 on {translator.device}")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(f"workers={workers}: several decoding processes need the fork start method, which this platform lacks; use workers=1")
        self.translator, self.workers = translator, workers

    def translate(self, sentences: list[str], **options) -> list:
        """Translator._translate(sentences, **options), the sentences dealt out in even shares, results in input order."""
        by_length = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        shares = [by_length[w::self.workers] for w in range(self.workers)]  # dealt like cards: each share as long as the others
        results = self._run([[sentences[i] for i in share] for share in shares], options)
        outputs = [None] * len(sentences)
        for share, translations in zip(shares, results):
            for i, translation in zip(share, translations):
                outputs[i] = translation
        return outputs

    def _run(self, shares: list[list[str]], options: dict) -> list:
        context = multiprocessing.get_context("fork")
        threads = max(1, torch.get_num_threads() // self.workers)
        receivers, processes = [], []
        try:
            for share in shares:
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_translate_share, args=(self.translator, share, options, threads, send), daemon=True)
                process.start()
                send.close()  # the child's end: recv() then sees EOF if the child dies
                receivers.append(receive)
                processes.append(process)
            answers = []
            for process, receive in zip(processes, receivers):
                try:
                    answers.append(receive.recv())
                except EOFError:
                    process.join()
                    raise RuntimeError(f"a decoding worker ended without an answer (exit code {process.exitcode})") from None
        finally:
            for process in processes:
                process.kill()
                process.join()
        for ok, value in answers:
            if not ok:
                raise value
        return [value for _, value in answers]
