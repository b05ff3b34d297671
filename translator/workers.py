"""Decoding in several processes at once, each with its share of the sentences and of the threads
(CTranslate2's `inter_threads`).

The matmuls of one decoding step are small, and a step waits on Python between them, so two
threads in one process leave each other idle; two processes of one thread each do not
(bench/decode.py measures both on the same model). The workers are forked from the process that
holds the `Translator`: they start at once with its model in memory, nothing is pickled but the
sentences and the translations. Forking is Linux's (and macOS's) start method, and CPU-only:
CUDA does not survive a fork.
"""

from __future__ import annotations

import multiprocessing
import weakref

import torch

from .quantize import weights_version

_forked_from = None  # in a worker: the Translator it was forked from


def _start(translator, threads: int) -> None:
    global _forked_from
    _forked_from = translator
    torch.set_num_threads(threads)


def _translate_share(job: tuple[list[str], dict]) -> list:
    sentences, options = job
    return _forked_from._translate(sentences, **options)


class DecodingWorkers:
    """`workers` forked processes holding a copy of `translator`, splitting the available threads."""

    def __init__(self, translator, workers: int):
        if translator.device.type != "cpu":
            raise ValueError(f"workers={workers}: several decoding processes run on the CPU only (CUDA does not survive a fork); use workers=1 on {translator.device}")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(f"workers={workers}: several decoding processes need the fork start method, which this platform lacks; use workers=1")
        self.workers = workers
        self.weights = weights_version(translator.model)  # a copy forked before the weights changed is stale
        threads = max(1, torch.get_num_threads() // workers)
        self.pool = multiprocessing.get_context("fork").Pool(workers, _start, (translator, threads))
        weakref.finalize(self, self.pool.terminate)

    def translate(self, sentences: list[str], **options) -> list:
        """Translator._translate(sentences, **options), the sentences dealt out in even shares, results in input order."""
        by_length = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        shares = [by_length[w::self.workers] for w in range(self.workers)]  # dealt like cards: each share as long as the others
        results = self.pool.map(_translate_share, [([sentences[i] for i in share], options) for share in shares])
        outputs = [None] * len(sentences)
        for share, translations in zip(shares, results):
            for i, translation in zip(share, translations):
                outputs[i] = translation
        return outputs

    def close(self) -> None:
        self.pool.terminate()
