"""Copies of a model at a lower precision, for decoding on the CPU.

bf16: every weight cast to bf16 once. Under autocast each step would cast every weight again,
the tied output projection's D x V table included: the copy decodes 4-8% faster in single-thread
workers (the same speed in one process of 2 threads; Multi30k model, AMD EPYC with avx512_bf16,
docs/deployment.md).

int8: every matmul with a weight (the Linear layers and the tied output
projection) runs on int8 weights, one scale per output row, with the activations quantized
per call from their range (torch's dynamic quantization; fbgemm uses VNNI where the CPU has it).

The tied output projection is an `F.linear` over the embedding table, not an `nn.Linear`, so
quantize_dynamic would leave it in fp32, and it is the largest matmul of a decoding step (D x V
per token): it gets its own quantized Linear over the same table. The embedding lookups stay fp32.

torch has two int8 engines on x86, its default ("x86", fbgemm's kernels for Linear) and oneDNN, and
which one runs the output projection faster depends on the CPU: on an AMD EPYC (Zen 4) oneDNN ran the
256 x 8k projection of 300 rows 1.5x faster, while fbgemm ran most of the model's smaller matmuls
faster (docs/deployment.md). So the projection's shape is timed under each engine once per process
and runs on the faster; TRANSLATOR_INT8_ENGINE names one instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
import warnings
import weakref

import torch
from torch import nn

from .ensemble import Ensemble
from .model import Transformer


def bf16_model(model: Transformer | Ensemble) -> Transformer | Ensemble:
    """A copy of `model` whose weights and activations are bf16 (the original is untouched)."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def int8_model(model: Transformer | Ensemble) -> Transformer | Ensemble:
    """A copy of `model` whose weights are int8, for decoding on the CPU (the original is untouched)."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 decoding runs on the CPU only (torch's dynamic quantization); use bf16 or fp16 on a GPU")
    if isinstance(model, Ensemble):  # each member's output projection is its own table
        return Ensemble([int8_model(member) for member in model.members])
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch marks torch.ao.quantization deprecated for torchao; it is still its fbgemm path
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
        output = nn.Linear(model.d_model, model.embedding.num_embeddings, bias=False)
        output.weight, output.qconfig = model.embedding.weight, per_channel_dynamic_qconfig
        # The copy's own `logits` (outputs (..., D) -> (..., V)), in its __dict__ so that it wins over the
        # method; nn.Module's __setattr__ would file it among the submodules, where the method shadows it.
        object.__setattr__(quantized, "logits", fastest_int8_linear(output, Int8Linear.from_float))
    return quantized


ENGINE_VARIABLE = "TRANSLATOR_INT8_ENGINE"  # set: the output projection's engine, untimed (reproducible int8 outputs)


def int8_engines() -> list[str]:
    """The int8 engines the output projection may run on: torch's default and oneDNN, where this torch has them."""
    default = torch.backends.quantized.engine
    return [e for e in dict.fromkeys((default, "onednn")) if e in torch.backends.quantized.supported_engines]


def fastest_int8_linear(linear: nn.Linear, quantize) -> nn.Module:
    """`quantize(linear)` under the engine that $TRANSLATOR_INT8_ENGINE names, else under the one that ran
    its shape faster in this process (the two engines agree to float rounding, not bit
    for bit: one process decodes one way). Torch's engine setting is left as it was."""
    engine = os.environ.get(ENGINE_VARIABLE) or _fastest_engine(linear.in_features, linear.out_features, torch.get_num_threads(), quantize)
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if engine not in supported:
        raise ValueError(f"{ENGINE_VARIABLE}={engine!r}: expected one of this torch's int8 engines: {', '.join(supported)}")
    with _engine(engine):
        return quantize(linear)


@functools.cache
@torch.no_grad()
def _fastest_engine(in_features: int, out_features: int, threads: int, quantize) -> str:
    """The engine that runs `quantize` of a random Linear of this shape faster on 256 rows (best of 3, a few ms)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    engines = int8_engines()
    if len(engines) == 1:
        return engines[0]
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)  # no draw from the global generator
    linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
    linear.qconfig = per_channel_dynamic_qconfig
    rows = torch.randn(256, in_features, generator=generator)
    seconds = {}
    for engine in engines:
        with _engine(engine):
            candidate = quantize(linear)
            candidate(rows)  # the first call allocates and warms the caches: not timed
            seconds[engine] = min(_seconds(candidate, rows) for _ in range(3))
    return min(engines, key=seconds.get)


@contextlib.contextmanager
def _engine(name: str):
    default = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = default


def _seconds(module: nn.Module, rows: torch.Tensor) -> float:
    start = time.perf_counter()
    module(rows)
    return time.perf_counter() - start


class WeightsVersion:
    """Which weights a lower-precision copy (or a decoding worker) was made from: the same parameter
    objects, at the same count of in-place writes. It changes with an optimizer step or load_state_dict,
    in place or with assign=True (new tensors, whose counts start again at 0), so the copy is stale:
    a Translator over a model still being trained, or loaded anew. Torch counts no write through
    `.data`, nor any to a tensor made under inference_mode (compared by identity alone)."""

    def __init__(self, model: nn.Module):
        # Held weakly: a replaced weight is freed; a dead reference never matches a live parameter.
        self._weights = [(weakref.ref(p), 0 if p.is_inference() else p._version) for p in model.parameters()]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, WeightsVersion) and len(self._weights) == len(other._weights)
                and all(a() is not None and a() is b() and m == n for (a, m), (b, n) in zip(self._weights, other._weights)))
