"""Decoding in several processes at once, each with its share of the sentences and of the threads
(CTranslate2's `inter_threads`).

The matmuls of one decoding step are small, and a step waits on Python between them, so two
threads in one process leave each other idle; two processes of one thread each do not
(bench/decode.py measures both on the same model). The workers are forked from the process that
holds the `Translator`: they start at once with its model in memory, and only sentences and
translations travel through their pipes. They stay for the next call, with their kernels and
memory warm, until the weights change, a call is interrupted or loses a worker, or `close()`
(an error raised inside a worker comes back as itself, or in words if it cannot cross a pipe, and leaves them running); every way out kills them, so
nothing outlives the parent. Forking is Linux's (and macOS's) start method, and CPU-only: CUDA
does not survive a fork.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import stat
import weakref
from multiprocessing.connection import wait

import torch


def _serve(translator, threads: int, pipe) -> None:
    """A worker: translate each (sources, options) that arrives, until the parent's end closes or the parent dies."""
    # Ctrl-C, and SIGTERM from a service manager (systemd's KillMode=control-group), reach the whole process group:
    # the parent decides (a server answers the requests in flight first, through us), and kills us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _close_inherited_sockets(keep=pipe.fileno())
    torch.set_num_threads(threads)
    # A parent killed outright (SIGKILL, the OOM killer) closes nothing itself, and the workers forked after
    # this one hold copies of its end of our pipe: its sentinel, not EOF, says that it is gone.
    parent = multiprocessing.parent_process().sentinel
    while True:
        if parent in wait([pipe, parent]):
            return
        try:
            sources, options = pipe.recv()
        except EOFError:
            return
        try:
            answer = True, translator._translate(sources, **options)
        except Exception as e:  # the caller raises it, as one process would have, if it crosses the pipe whole
            answer = False, e if _crosses_a_pipe(e) else RuntimeError(f"in a decoding worker: {e!r}")
        # By value: pipe.send's pickler (torch's, once torch is imported) would move every tensor of the answer
        # (attention maps: 3 a translation) into shared memory, a file descriptor each, and a few hundred
        # sentences would pass a limit of 1,024 open files.
        pipe.send_bytes(pickle.dumps(answer))


def _crosses_a_pipe(error: Exception) -> bool:
    """Whether `error` pickles and unpickles: an exception whose __init__ takes other arguments than its
    message pickles, then fails to unpickle in the caller, where it would take the workers down."""
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:
        return False


def _close_inherited_sockets(keep: int) -> None:
    """Close the sockets a fork copied from the parent but ours: a server's listening socket and its clients'
    connections. A connection the server closes must close: while a worker held a copy, the client got no FIN
    and its next request on the kept-alive connection hung."""
    for name in os.listdir("/dev/fd"):
        fd = int(name)
        try:
            if fd != keep and stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:  # the descriptor listdir itself had open, gone by now
            pass


def _kill(processes: list, pipes: list) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=10)
    for pipe in pipes:
        pipe.close()


class DecodingWorkers:
    """`workers` processes forked from `translator`, splitting the available threads between them."""

    def __init__(self, translator, workers: int):
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(f"workers={workers}: several decoding processes need the fork start method, which this platform lacks; use workers=1")
        context = multiprocessing.get_context("fork")
        threads = max(1, torch.get_num_threads() // workers)
        self.pipes, self.processes = [], []
        self._finalizer = weakref.finalize(self, _kill, self.processes, self.pipes)  # kills those started, if a fork fails
        for _ in range(workers):
            pipe, child_end = context.Pipe()
            self.pipes.append(pipe)
            process = context.Process(target=_serve, args=(translator, threads, child_end), daemon=True)
            try:
                process.start()
            except BaseException:  # out of memory or processes: the workers forked so far go too
                self.close()
                raise
            finally:
                child_end.close()  # the worker's end: recv() here then sees EOF if the worker dies
            self.processes.append(process)

    @property
    def alive(self) -> bool:
        """Not closed, and no worker has died (the OOM killer, a stray kill): a dead one is not waited for."""
        return self._finalizer.alive and all(process.is_alive() for process in self.processes)

    def close(self) -> None:
        """Kill the workers (also done when this object is collected, and at exit)."""
        self._finalizer()

    def translate(self, sources: list[list[int] | None], progress: bool = False, **options) -> list:
        """Translator._translate(sources, **options), the sources (token ids; None: blank) dealt out in even shares,
        results in input order. With `progress`, the first worker shows its bar: the shares are even, so its bar tracks them all."""
        by_length = sorted(range(len(sources)), key=lambda i: len(sources[i] or ()))
        shares = [by_length[w::len(self.pipes)] for w in range(len(self.pipes))]  # dealt like cards: each share as long as the others
        try:
            answers = self._exchange([([sources[i] for i in share], options | {"progress": progress and w == 0})
                                      for w, share in enumerate(shares)])
        except BaseException:  # answers may be left in the pipes (Ctrl-C, a dead worker): these workers are done
            self.close()
            raise
        for ok, value in answers:
            if not ok:
                raise value
        outputs = [None] * len(sources)
        for share, (_, translations) in zip(shares, answers):
            for i, translation in zip(share, translations):
                outputs[i] = translation
        return outputs

    def _exchange(self, jobs: list[tuple[list[list[int] | None], dict]]) -> list[tuple[bool, object]]:
        """Each worker's answer to its job, (sources, options): (True, translations) or (False, the exception it raised)."""
        try:
            for pipe, job in zip(self.pipes, jobs):
                pipe.send(job)
            return [pickle.loads(pipe.recv_bytes()) for pipe in self.pipes]
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.close()  # joins them: their exit codes are known then
            codes = [process.exitcode for process in self.processes]
            raise RuntimeError(f"a decoding worker ended without an answer (exit codes {codes})") from None
