"""Where a model runs and at what precision, decided at run time from the machine itself.

    device    "auto" is the GPU when torch sees one, else the CPU (under torchrun, GPU LOCAL_RANK)
    precision "auto" is the fastest precision that keeps quality on that device:
              CPU   bf16 where the CPU has bf16 instructions (avx512_bf16 or AMX), else fp32:
                    bf16 emulated in software measured 2.6x slower than fp32 (Intel Xeon, VNNI, no avx512_bf16);
                    fp32 for a service's small batches (translator serve), where native bf16 measured slower too
              CUDA  bf16 where the GPU runs it natively (compute capability >= 8.0), else fp16 (training adds a gradient scaler)
    memory    freed blocks kept for reuse by glibc's malloc (keep_freed_memory), unless the user tuned it
    kernels   4,096 of oneDNN's compiled kernels kept, not 1,024 (keep_compiled_kernels), unless the user chose

Nothing machine-specific is stored with a model: a model trained in bf16 on one machine is
decoded with "auto" on another, at whatever that machine runs fastest.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

import torch

from .config import RecipeError

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute in bf16 natively


def pick_device(requested: str, key: str = "train.device") -> torch.device:
    """"auto" is the GPU when torch sees one, else the CPU; under torchrun each process takes GPU LOCAL_RANK."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "cuda":
        raise RecipeError(f"{key}: got {requested!r}, expected one of 'auto', 'cpu', 'cuda'")
    if not torch.cuda.is_available():
        raise RecipeError(f"{key}: 'cuda', but torch sees no CUDA device on this machine (use auto or cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """The processor a figure was measured on: the GPU's name, or the CPU's with its relevant flags."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    flags = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in cpu_flags()]
    return f"{cpu_name()}, {torch.get_num_threads()} threads, flags: {' '.join(flags) or 'none of interest'}"


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16", "fp16" or "int8" (int8 weights, decoding on the CPU only)
    reason: str  # why: "asked for", or what auto saw

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32 and int8."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def resolve_precision(requested: str, device: torch.device, small_batches: bool = False) -> Precision:
    """The precision to run at: an explicit one as asked, "auto" the fastest that keeps quality here.

    `small_batches`: decoding that sees a few sentences at a time, as a service does. oneDNN's bf16 matmuls
    cost about 30 us a call however few their rows, and fp32 served more sentences a second than bf16
    at 1 and at 32 clients on both CPUs with native bf16 measured (docs/deployment.md, sessions 40-42)."""
    if requested == "int8" and device.type != "cpu":
        raise RecipeError("decode.precision: int8 runs on the CPU only (torch's dynamic quantization); use bf16 or fp16 on a GPU")
    if requested != "auto":
        return Precision(requested, "asked for")
    if device.type == "cuda":
        # by compute capability: torch.cuda.is_bf16_supported() also says yes to bf16 emulated (T4, V100)
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} runs bf16 natively")
        return Precision("fp16", f"auto: {torch.cuda.get_device_name(device)} has no native bf16")
    native = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    if native and small_batches:
        return Precision("fp32", f"auto for small batches: bf16 is native here ({', '.join(native)}), but its calls cost more at few rows")
    if native:
        return Precision("bf16", f"auto: this CPU runs bf16 natively ({', '.join(native)})")
    return Precision("fp32", "auto: no native bf16 on this CPU")


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock read after it counts it (benchmarks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the system.

    By default glibc serves blocks over 128 KB (a threshold that adapts up to 32 MB) with mmap and
    unmaps them on free, and trims its heap, so a training step's activations and a beam step's K/V
    copies come back as fresh pages that fault in one at a time. Kept, bench/train.py's steps ran
    1.1-1.4x and beam search 1.16x faster, a whole training run about 1.07x, greedy search within
    noise (AMD EPYC Zen 4, runs interleaved with and without: docs/deployment.md). PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for this;
    two mallopt calls do it inside the process. The price: the process keeps its peak memory.
    Left alone where the user set glibc's malloc variables, and outside glibc. Returns whether it acted."""
    if any(name in os.environ for name in GLIBC_MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: macOS, Windows
        return False
    limit = 2**31 - 1  # mallopt takes an int; larger blocks than this are rare enough to map
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))


ONEDNN_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")  # the second: oneDNN's older name
ONEDNN_KERNELS_KEPT = 4096


@functools.cache
def keep_compiled_kernels() -> bool:
    """Have oneDNN keep up to ONEDNN_KERNELS_KEPT compiled kernels, instead of the last 1,024.

    On a CPU with native bf16, torch runs each bf16 matmul through oneDNN, which compiles a kernel for each
    new shape (about 0.1-3 ms) and caches it. A decoding step's shapes follow its row count and cache length:
    a greedy search over 500 sentences compiles about 300, a beam search about 500, so a process that runs
    both (a service, bench/decode.py) evicted and compiled them again. Kept, a worker running that mix ran
    bf16 greedy search 1.3x and beam search 1.15x faster, and int8 (oneDNN's output projection) 1.1x, with
    less memory, not more (Intel Xeon with AMX: docs/deployment.md, session 39). oneDNN reads the variable
    when it first compiles: set before that, it holds for the process and the workers it forks. Left alone
    where the user set it. Returns whether it acted."""
    if any(name in os.environ for name in ONEDNN_CACHE_ENV):
        return False
    os.environ[ONEDNN_CACHE_ENV[0]] = str(ONEDNN_KERNELS_KEPT)
    return True


def kept_kernels() -> str:
    """How many compiled kernels oneDNN keeps, as the environment says (for benchmarks' headers)."""
    return next((os.environ[name] for name in ONEDNN_CACHE_ENV if name in os.environ), "its default")
