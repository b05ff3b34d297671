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
"""

from __future__ import annotations

import copy
import warnings

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
        quantized = quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
        output = nn.Linear(model.d_model, model.embedding.num_embeddings, bias=False)
        output.weight, output.qconfig = model.embedding.weight, per_channel_dynamic_qconfig
        # The copy's own `logits` (outputs (..., D) -> (..., V)), in its __dict__ so that it wins over the
        # method; nn.Module's __setattr__ would file it among the submodules, where the method shadows it.
        object.__setattr__(quantized, "logits", Int8Linear.from_float(output))
    return quantized


def weights_version(model: nn.Module) -> tuple[int, ...]:
    """Changes whenever a weight is written in place (an optimizer step, load_state_dict), which makes
    a lower-precision copy stale: a Translator over a model still being trained, or loaded anew."""
    return tuple(p._version for p in model.parameters())
